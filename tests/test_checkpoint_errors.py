"""Bad checkpoint input ends in a UserError naming the file, key or parameter, never in another exception.

A property test corrupts small valid checkpoints of every format (HF safetensors,
sharded safetensors and pytorch_model.bin; T5X legacy and orbax; flan-jax run
directories) and random directories; targeted tests pin the messages.
"""

import dataclasses
import functools
import itertools
import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from flan_jax import checkpoints as ckpt_lib
from flan_jax import formats
from flan_jax.errors import UserError
from flan_jax.formats.torch_pickle import load_torch_state_dict
from flan_jax.model import T5Config, Transformer
from test_formats import FIXTURE, hf_model

torch = pytest.importorskip("torch")

CONFIG = T5Config(
    vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, num_encoder_layers=1, num_decoder_layers=2,
    mlp_dim=32, dropout_rate=0.0,
)
T5X_LAYOUTS = {"t5x_legacy": "legacy_tensorstore_msgpack", "t5x_orbax": "default_orbax"}
FORMATS = ["hf", "hf_bin", "hf_sharded", "flan_jax", *T5X_LAYOUTS]


def _writable_copy(src: Path, dst: Path) -> Path:
    """The ../shared fixture is read-only; corrupting needs writable files and directories.

    The legacy layout's Adafactor state (two thirds of its files) is left out: it is
    never read, so corrupting it tests nothing, and each case copies the directory.
    """
    shutil.copytree(src, dst, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns("state.param_states.*"))
    for root, dirs, _ in os.walk(dst):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    os.chmod(dst, 0o755)
    return dst


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    """One small valid checkpoint per format, built once for the module."""
    root = tmp_path_factory.mktemp("valid")
    model = hf_model(CONFIG)
    model.save_pretrained(root / "hf")
    model.save_pretrained(root / "hf_sharded", max_shard_size="8KB")
    assert (root / "hf_sharded" / "model.safetensors.index.json").exists()
    (root / "hf_bin").mkdir()
    shutil.copyfile(root / "hf" / "config.json", root / "hf_bin" / "config.json")
    torch.save(model.state_dict(), root / "hf_bin" / "pytorch_model.bin")
    loaded = formats.load_checkpoint(str(root / "hf"))
    formats.save_flan_jax(str(root / "flan_jax"), loaded.config, loaded.params, None, step=5)
    paths = {name: root / name for name in ("hf", "hf_bin", "hf_sharded", "flan_jax")}
    if FIXTURE.exists():
        for fmt, layout in T5X_LAYOUTS.items():
            paths[fmt] = _writable_copy(FIXTURE / layout / "checkpoint_20", root / fmt)
    return paths


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Fresh directory names: tensorstore caches what it read by path, so a path is never reused."""
    root = tmp_path_factory.mktemp("cases")
    counter = itertools.count()
    return lambda: root / f"case{next(counter)}"


def _base(valid: dict[str, Path], fmt: str) -> Path:
    if fmt not in valid:
        pytest.skip("T5X fixture not found")
    return valid[fmt]


@functools.lru_cache(maxsize=None)
def _model_shapes(config: T5Config) -> dict:
    """The shapes Transformer(config) itself makes, as an oracle independent of formats.abstract_params."""
    tokens = jnp.ones((1, 4), jnp.int32)
    abstract = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), tokens, tokens, tokens)["params"])
    return {jax.tree_util.keystr(k): x.shape for k, x in jax.tree.leaves_with_path(nn.unbox(abstract))}


def _load_or_user_error(path: Path) -> None:
    """The property: a load succeeds with params that fit its config, or ends in a
    one-line UserError that names the checkpoint's path."""
    try:
        loaded = formats.load_checkpoint(str(path))
    except UserError as e:
        message = str(e)
        assert "\n" not in message, message
        assert str(path) in message, message
        return
    got = {jax.tree_util.keystr(k): np.shape(x) for k, x in jax.tree.leaves_with_path(loaded.params)}
    assert got == _model_shapes(loaded.config)


# ---------------------------------------------------------------- mutations

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


def _json_files(directory: Path, fmt: str) -> list[Path]:
    """The JSON files whose values the loaders interpret."""
    if fmt.startswith("hf"):
        return sorted(directory.glob("*.json"))
    if fmt == "flan_jax":
        return sorted(directory.glob("checkpoints/*/meta/metadata"))
    if fmt == "t5x_legacy":
        return sorted(directory.glob("target.*/.zarray"))
    return [directory / "state" / "_METADATA", directory / "state" / "array_metadatas" / "process_0"]


def _objects(value) -> list[dict]:
    """Every JSON object inside a JSON value, outermost first."""
    if isinstance(value, list):
        return [o for item in value for o in _objects(item)]
    if isinstance(value, dict):
        return [value, *(o for item in value.values() for o in _objects(item))]
    return []


def _mutate(data: st.DataObject, directory: Path, fmt: str) -> str:
    """Applies one drawn corruption to `directory`; returns what it did (for the failure report)."""
    kind = data.draw(st.sampled_from(["truncate", "overwrite_bytes", "random_file", "delete", "json_value", "json_document"]))
    if kind.startswith("json"):
        target = data.draw(st.sampled_from(_json_files(directory, fmt)))
        if kind == "json_document":
            # A flan-jax meta file that is not a JSON object is a known failure of checkpoints.py,
            # pinned by test_flan_jax_meta_that_is_not_an_object_is_a_user_error.
            document = st.dictionaries(st.text(max_size=8), _JSON, max_size=4) if fmt == "flan_jax" else _JSON
            target.write_text(json.dumps(data.draw(document)))
            return f"{kind} {target}"
        document = json.loads(target.read_text())
        obj = data.draw(st.sampled_from(_objects(document)))
        key = data.draw(st.sampled_from(sorted(obj)) | st.text(max_size=8)) if obj else data.draw(st.text(max_size=8))
        if key in obj and data.draw(st.booleans()):
            del obj[key]
        else:
            obj[key] = data.draw(_JSON | st.integers(-3, 3))
        target.write_text(json.dumps(document))
        return f"{kind} {target} [{key!r}]"
    target = data.draw(st.sampled_from(sorted(p for p in directory.rglob("*") if p.is_file())))
    content = target.read_bytes()
    if kind == "truncate":
        target.write_bytes(content[: data.draw(st.integers(0, max(len(content) - 1, 0)))])
    elif kind == "overwrite_bytes":
        buffer = bytearray(content)
        for _ in range(data.draw(st.integers(1, 8))):
            if buffer:
                buffer[data.draw(st.integers(0, len(buffer) - 1))] = data.draw(st.integers(0, 255))
        target.write_bytes(bytes(buffer))
    elif kind == "random_file":
        target.write_bytes(data.draw(st.binary(max_size=512)))
    else:
        target.unlink()
    return f"{kind} {target}"


# derandomize: the same cases on every run, so a colleague's run never fails by chance.
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
# 222 cases (and 30 random directories, 60 damaged pickles below); fewer where a load costs more:
# orbax ~0.5 s, flan-jax ~0.4 s (checkpoints.py collects garbage after each read) against ~0.03 s.
EXAMPLES = {"hf": 60, "hf_bin": 40, "hf_sharded": 30, "flan_jax": 20, "t5x_legacy": 60, "t5x_orbax": 12}
assert sorted(EXAMPLES) == sorted(FORMATS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupted_checkpoint_loads_or_is_a_user_error(valid, scratch, fmt):
    base = _base(valid, fmt)

    @settings(FUZZ, max_examples=EXAMPLES[fmt])
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        case = scratch()
        shutil.copytree(base, case)
        note(_mutate(data, case, fmt))
        _load_or_user_error(case)
        shutil.rmtree(case)

    check()


_NAMES = [
    "config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "checkpoint",
    "_CHECKPOINT_METADATA", "state/_METADATA", "params/_METADATA", "checkpoints/1/meta/metadata", "spiece.model",
]


@settings(FUZZ, max_examples=30)
@given(files=st.dictionaries(
    st.sampled_from(_NAMES),
    st.binary(max_size=64) | _JSON.map(lambda v: json.dumps(v).encode()) | st.just(b'{"t5x": 1}'),
    max_size=4,
))
def test_random_directory_loads_or_is_a_user_error(scratch, files):
    case = scratch()
    case.mkdir()
    for name, content in files.items():
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_bytes(content)
    _load_or_user_error(case)


@pytest.mark.parametrize("document", ["0", "null", '"text"', "[1, 2]"])
def test_flan_jax_meta_that_is_not_an_object_is_a_user_error(valid, scratch, document):
    """A step whose meta item is JSON but not an object is unreadable."""
    case = scratch()
    shutil.copytree(valid["flan_jax"], case)
    (case / "checkpoints" / "5" / "meta" / "metadata").write_text(document)
    _load_or_user_error(case)


@pytest.mark.parametrize("document", ["[1]", "7"])
def test_flan_jax_step_metadata_that_is_not_an_object_is_a_user_error(valid, scratch, document):
    """orbax reads every step's _CHECKPOINT_METADATA when it opens the directory."""
    case = scratch()
    shutil.copytree(valid["flan_jax"], case)
    (case / "checkpoints" / "5" / "_CHECKPOINT_METADATA").write_text(document)
    _load_or_user_error(case)


def test_unreadable_newest_flan_jax_step_is_set_aside_and_the_previous_loads(valid, scratch):
    case = scratch()
    params = formats.load_checkpoint(str(valid["hf"])).params
    ckpt = ckpt_lib.Checkpointer(case / "checkpoints", ckpt_lib.CheckpointConfig(best_metric=None))
    for step in (3, 5):
        ckpt.save(step, params, None, {"step": step, "model_config": dataclasses.asdict(CONFIG), "vocabulary": None})
    ckpt.close()
    data = max((case / "checkpoints" / "5" / "params").rglob("d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:10])
    assert formats.load_checkpoint(str(case)).step == 3
    assert (case / "checkpoints" / "5.unreadable").is_dir()
    with pytest.raises(UserError, match=r"5\.unreadable: a step directory's name is its step number"):
        formats.load_checkpoint(str(case / "checkpoints" / "5.unreadable"))


# ---------------------------------------------------------------- the messages


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: (d / "config.json").write_text('{"vocab_size": 64,'), r"config\.json: not a readable JSON file: Expecting"),
    (lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}"), r"config\.json: not a readable JSON file: 'utf-8' codec"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), r"config\.json: expected a JSON object, found list"),
    (lambda d: _edit_config(d, vocab_size=None), r"config\.json: no 'vocab_size' \(expected a positive integer\)"),
    (lambda d: _edit_config(d, d_model="16"), r"config\.json: d_model='16': expected a positive integer"),
    (lambda d: _edit_config(d, num_heads=0), r"config\.json: num_heads=0: expected a positive integer"),
    (lambda d: _edit_config(d, num_layers=True), r"config\.json: num_layers=True: expected a positive integer"),
    (lambda d: _edit_config(d, feed_forward_proj=["relu"]),
     r"config\.json: feed_forward_proj=\['relu'\]: expected one of 'gated-gelu'"),
    (lambda d: _edit_config(d, model_type="bert"), r"config\.json: model_type='bert': expected one of 't5'"),
    (lambda d: _edit_config(d, d_ff=48),
     r"tensor 'encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight' \(encoder/layers_0/mlp/wi_0/kernel\) "
     r"has shape \(32, 16\), which does not fit the config: want \(48, 16\)"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
     r"model\.safetensors: not a readable safetensors file: SafetensorError: .*incomplete metadata"),
    (lambda d: (d / "model.safetensors").write_bytes(b"<html>not found</html>"), r"model\.safetensors: not a readable safetensors file"),
    (lambda d: safetensors.numpy.save_file({"shared.weight": np.zeros((64, 16), np.float32)}, d / "model.safetensors"),
     r"has no tensor 'encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight'"),
])
def test_bad_hf_directory_is_named(valid, scratch, edit, pattern):
    case = scratch()
    shutil.copytree(valid["hf"], case)
    edit(case)
    with pytest.raises(UserError, match=pattern) as error:
        formats.load_checkpoint(str(case))
    assert str(case) in str(error.value)


@pytest.mark.parametrize("edit, pattern", [
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), r"pytorch_model\.bin: a damaged \(truncated\?\) zip archive"),
    (lambda p: p.write_bytes(b"garbage" * 10), r"pytorch_model\.bin: neither a zip-format torch checkpoint nor a legacy torch pickle"),
    (lambda p: p.write_bytes(pickle.dumps({"x": 1}, protocol=2)), r"pytorch_model\.bin: not a zip-format torch checkpoint \(torch < 1\.6"),
])
def test_bad_pytorch_model_bin_is_named(valid, scratch, edit, pattern):
    case = scratch()
    shutil.copytree(valid["hf_bin"], case)
    edit(case / "pytorch_model.bin")
    with pytest.raises(UserError, match=pattern):
        formats.load_checkpoint(str(case))


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_corrupt_pickle_in_an_intact_zip_is_a_user_error(valid, scratch, data):
    """The zip's CRCs catch most damage to pytorch_model.bin; here the pickle itself is damaged."""
    with zipfile.ZipFile(valid["hf_bin"] / "pytorch_model.bin") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in members if n.endswith("data.pkl"))
    pickled = bytearray(members[name])
    for _ in range(data.draw(st.integers(1, 6))):
        pickled[data.draw(st.integers(0, len(pickled) - 1))] = data.draw(st.integers(0, 255))
    members[name] = bytes(pickled[: data.draw(st.integers(1, len(pickled)))])
    path = scratch()
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    try:
        state = load_torch_state_dict(path)
    except UserError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
    else:
        assert all(isinstance(k, str) for k in state)


def test_torch_tensor_layout_overrunning_its_storage_is_refused(tmp_path):
    """as_strided would read memory beyond the storage; the layout is checked first."""

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):  # what torch pickles for a tensor: a rebuild call over a persistent storage
            return torch._utils._rebuild_tensor_v2, (Storage(), 0, (1_000_000,), (1,), False, {})

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, Storage) else None

    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        with archive.open("archive/data.pkl", "w") as f:
            Pickler(f, protocol=2).dump({"shared.weight": Tensor()})
        archive.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
    with pytest.raises(UserError, match=r"size \(1000000,\), stride \(1,\) at offset 0 overruns its storage of 4 elements"):
        load_torch_state_dict(path)


def _t5x_case(valid, scratch, fmt: str) -> Path:
    case = scratch()
    shutil.copytree(_base(valid, fmt), case)
    return case


QUERY = "target.encoder.layers_0.attention.query.kernel"


@pytest.mark.parametrize("fmt, edit, pattern", [
    ("t5x_legacy", lambda d: (d / "checkpoint").write_bytes((d / "checkpoint").read_bytes()[:100]),
     r"checkpoint: not a readable T5X msgpack checkpoint: ValueError: Unpack failed: incomplete input"),
    ("t5x_legacy", lambda d: (d / "checkpoint").write_bytes(bytes(range(256))),
     r"checkpoint: not a readable T5X msgpack checkpoint"),
    ("t5x_legacy", lambda d: (d / QUERY / ".zarray").unlink(),
     r"cannot open array target/encoder/layers_0/attention/query/kernel \(.*\): NOT_FOUND"),
    ("t5x_legacy", lambda d: (d / QUERY / "0.0").write_bytes((d / QUERY / "0.0").read_bytes()[:100]),
     r"cannot read array target/encoder/layers_0/attention/query/kernel: .*truncated"),
    ("t5x_legacy", lambda d: (d / QUERY / ".zarray").write_text(
        (d / QUERY / ".zarray").read_text().replace('"shape":[64,64]', '"shape":[64,65]')),
     r"cannot open array target/encoder/layers_0/attention/query/kernel .*Expected \"shape\" of \[64,64\] but received: \[64,65\]"),
    ("t5x_orbax", lambda d: (d / "state" / "_METADATA").write_text("{"), r"state: unreadable orbax metadata: JSONDecodeError"),
    ("t5x_orbax", lambda d: (d / "state" / "manifest.ocdbt").unlink(), r"state: unreadable orbax metadata: ValueError: NOT_FOUND"),
    ("t5x_orbax", lambda d: max((d / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size).write_bytes(b""),
     r"state: cannot read the arrays: .*target\."),
])
def test_bad_t5x_checkpoint_is_named(valid, scratch, fmt, edit, pattern):
    case = _t5x_case(valid, scratch, fmt)
    edit(case)
    with pytest.raises(UserError, match=pattern) as error:
        formats.load_checkpoint(str(case))
    assert str(case) in str(error.value)


def test_shapes_that_disagree_with_the_given_config_name_the_parameter(valid):
    """load_checkpoint(path, config=...) checks every format against the config, with both shapes."""
    wider = dataclasses.replace(CONFIG, mlp_dim=48)
    want = r"parameter decoder/layers_0/mlp/wi_0/kernel has shape \(16, 32\), the model wants \(16, 48\)"
    for fmt in ("hf", "hf_bin", "flan_jax"):
        with pytest.raises(UserError, match=want):
            formats.load_checkpoint(str(valid[fmt]), config=wider)
    # With shardings, orbax is told the model's shapes and compares before reading.
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one_device, formats.abstract_params(wider))
    with pytest.raises(UserError, match=want):
        formats.load_checkpoint(str(valid["flan_jax"]), config=wider, shardings=shardings)
    deeper = dataclasses.replace(CONFIG, num_encoder_layers=2)
    with pytest.raises(UserError, match=r"lacks the parameter encoder/layers_1/"):
        formats.load_checkpoint(str(valid["hf"]), config=deeper)
    if "t5x_legacy" in valid:
        t5x_config = formats.load_checkpoint(str(valid["t5x_legacy"])).config
        for fmt in T5X_LAYOUTS:
            with pytest.raises(UserError, match=r"decoder/logits_dense/kernel has shape \(64, 512\), the model wants \(64, 500\)"):
                formats.load_checkpoint(str(valid[fmt]), config=dataclasses.replace(t5x_config, vocab_size=500))


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_abstract_params_are_the_models(scan_layers):
    config = dataclasses.replace(CONFIG, scan_layers=scan_layers)
    want = _model_shapes(config)
    got = {jax.tree_util.keystr(k): x.shape for k, x in jax.tree.leaves_with_path(formats.abstract_params(config))}
    assert got == want


# ---------------------------------------------------------------- the CLI


@pytest.fixture
def cli_main():
    """flan_jax.cli.main in this process (a subprocess costs ~10 s of imports); gin is cleared afterwards."""
    import gin

    from flan_jax import cli

    yield cli.main
    gin.clear_config()


@pytest.mark.parametrize("command", ["infer", "convert"])
@pytest.mark.parametrize("edit, named", [
    (lambda d: (d / "config.json").write_text('{"d_model": 16, "vocab_'), r"config\.json: not a readable JSON file: "),
    (lambda d: _edit_config(d, vocab_size=None), r"config\.json: no 'vocab_size'"),
], ids=["malformed_json", "no_vocab_size"])
def test_cli_reports_a_bad_hf_config_in_one_line(valid, scratch, cli_main, capfd, command, edit, named):
    case = scratch()
    shutil.copytree(valid["hf"], case)
    edit(case)
    argv = ["infer", f"--checkpoint={case}", "hello"] if command == "infer" else ["convert", str(case), str(scratch())]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    message = exit_info.value.code  # what Python prints to stderr as the process exits with it
    assert isinstance(message, str) and "\n" not in message, message
    assert re.match(rf"flan-jax: error: {re.escape(str(case))}/{named}", message), message
    err = capfd.readouterr().err  # (may hold native log lines of TensorFlow's import, e.g. cuInit)
    assert "Traceback" not in err and str(case) not in err, err  # reported once, by the exit message
