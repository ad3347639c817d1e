"""Checkpoint import and export: HF directories (safetensors, shards, .bin), round trips, T5X onto a mesh."""

import dataclasses
import os
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import formats
from flan_jax.errors import UserError
from flan_jax.formats import hf
from flan_jax.formats.torch_pickle import load_torch_state_dict
from flan_jax.model import T5Config, Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V1_1 = T5Config(
    vocab_size=128, emb_dim=32, num_heads=2, head_dim=16, num_encoder_layers=2, num_decoder_layers=3,
    mlp_dim=64, dropout_rate=0.0,
)
ORIGINAL = dataclasses.replace(V1_1, mlp_activations=("relu",), logits_via_embedding=True)


def hf_model(config: T5Config, seed: int = 0):
    """A randomly initialised transformers T5 of `config` (test_checkpoint_errors uses it too)."""
    torch.manual_seed(seed)
    hf_config = transformers.T5Config(**{**hf.config_to_hf(config), "architectures": None})
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    if not config.logits_via_embedding:
        # transformers 5.x ties lm_head to `shared` even with tie_word_embeddings=False.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.emb_dim) * 0.5)
    return model


def _batch(vocab: int):
    rng = np.random.default_rng(0)
    enc = rng.integers(2, vocab, (2, 12)).astype(np.int32)
    enc[1, 7:] = 0
    tgt = rng.integers(2, vocab, (2, 6)).astype(np.int32)
    dec = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], 1)
    return enc, dec, tgt


def _hf_logits(model, enc, dec) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0), decoder_input_ids=torch.tensor(dec)
        ).logits.numpy()


def _our_logits(config, params, enc, dec, tgt) -> np.ndarray:
    return np.asarray(Transformer(config).apply({"params": params}, enc, dec, tgt, enable_dropout=False))


@pytest.mark.parametrize("config", [V1_1, ORIGINAL], ids=["v1_1", "original"])
def test_hf_round_trip_gives_identical_logits(config, tmp_path):
    src = hf_model(config)
    src.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "spiece.model").write_bytes(b"not a real model, only copied")
    loaded = formats.load_checkpoint(str(tmp_path / "src"))
    assert loaded.format == "hf" and loaded.config == config
    enc, dec, tgt = _batch(config.vocab_size)
    want = _hf_logits(src, enc, dec)
    np.testing.assert_allclose(_our_logits(config, loaded.params, enc, dec, tgt), want, atol=1e-4)

    hf.save_hf_directory(str(tmp_path / "dst"), loaded.params, loaded.config, formats.vocab_file_of(loaded))
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "dst").eval()
    assert (tmp_path / "dst" / "spiece.model").read_bytes() == b"not a real model, only copied"
    untied = not torch.equal(back.lm_head.weight, back.shared.weight)
    assert untied == (not config.logits_via_embedding)
    np.testing.assert_array_equal(_hf_logits(back, enc, dec), want)


def test_sharded_safetensors_and_bin_load_like_the_model(tmp_path):
    src = hf_model(V1_1)
    want = {k: v.detach().numpy() for k, v in src.state_dict().items()}
    src.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    # transformers 5 writes only safetensors; a .bin is torch.save of the state dict.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(src.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for directory in ("sharded", "bin"):
        state = hf.load_state_dict(str(tmp_path / directory))
        for name in ("shared.weight", "lm_head.weight", "decoder.block.2.layer.2.DenseReluDense.wo.weight"):
            np.testing.assert_array_equal(state[name], want[name])
        params = hf.params_from_hf_state_dict(state, V1_1)
        enc, dec, tgt = _batch(V1_1.vocab_size)
        np.testing.assert_allclose(_our_logits(V1_1, params, enc, dec, tgt), _hf_logits(src, enc, dec), atol=1e-4)


def test_bin_reader_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Exploit()}, protocol=2))
    with pytest.raises(UserError, match="refusing to load global .*system"):
        load_torch_state_dict(path)
    assert not marker.exists()

    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(UserError, match="legacy format"):
        load_torch_state_dict(legacy)


def test_missing_weights_and_unknown_paths_are_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(UserError, match="model.safetensors"):
        hf.load_state_dict(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        formats.detect_format(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a recognised checkpoint"):
        formats.detect_format(str(tmp_path / "empty"))


def test_flan_jax_export_round_trip_and_no_overwrite(tmp_path):
    params = Transformer(V1_1).init(jax.random.key(0), *[jnp.ones((1, 4), jnp.int32)] * 3)["params"]
    formats.save_flan_jax(str(tmp_path / "run"), V1_1, params, None, step=7)
    loaded = formats.load_checkpoint(str(tmp_path / "run"))
    assert (loaded.format, loaded.step, loaded.config) == ("flan_jax", 7, V1_1)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(UserError, match="refusing to overwrite"):
        formats.save_flan_jax(str(tmp_path / "run"), V1_1, params, None, step=8)


FIXTURE = Path(os.environ.get("FLAN_JAX_FIXTURES_DIR", Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "t5x"


@pytest.mark.skipif(not FIXTURE.exists(), reason="T5X fixture not found")
def test_t5x_checkpoints_restore_onto_a_sharded_mesh():
    """On 8 fake CPU devices (4 data x 2 model), each array lands in its T5X sharding."""
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        import dataclasses
        import jax, numpy as np
        from flan_jax import formats, partitioning, step, optim
        from flan_jax.model import Transformer, scan
        part = partitioning.Partitioner(mesh_shape=(4, 2), logical_axis_rules=partitioning.STANDARD_LOGICAL_AXIS_RULES)
        assert len(jax.devices()) == 8
        models = {{}}  # config -> the shardings step.initialize gives it (both layouts hold one checkpoint)
        for layout in ("legacy_tensorstore_msgpack", "default_orbax"):
            path = "{FIXTURE}/" + layout + "/checkpoint_20"
            reference = formats.load_checkpoint(path)
            for scan_layers in (False, True):
                config = dataclasses.replace(reference.config, scan_layers=scan_layers)
                if config not in models:
                    models[config] = step.initialize(Transformer(config), optim.adafactor(), part, {{"inputs": 8, "targets": 8}}, 0)[0]
                model = models[config]
                sharded = formats.load_checkpoint(path, config=config, shardings=model.params_shardings)
                layers = sharded.params["encoder"]["layers" if scan_layers else "layers_0"]
                q = layers["attention"]["query"]["kernel"]
                want = (None, None, "model") if scan_layers else (None, "model")
                assert q.sharding.spec == jax.sharding.PartitionSpec(*want), q.sharding
                assert q.addressable_shards[0].data.shape[-2:] == (64, 32)
                expected = scan.to_layout(reference.params, scan_layers)
                assert jax.tree.structure(expected) == jax.tree.structure(sharded.params)
                for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(sharded.params)):
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("OK")


@pytest.mark.skipif(not FIXTURE.exists(), reason="T5X fixture not found")
def test_relative_paths_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for layout in ("default_orbax", "legacy_tensorstore_msgpack"):
        relative = os.path.relpath(FIXTURE / layout / "checkpoint_20")
        assert ".." in relative
        assert formats.load_checkpoint(relative).step == 20
    params = Transformer(V1_1).init(jax.random.key(0), *[jnp.ones((1, 4), jnp.int32)] * 3)["params"]
    formats.save_flan_jax("run", V1_1, params, None, step=3)
    assert formats.load_checkpoint("run").step == 3
