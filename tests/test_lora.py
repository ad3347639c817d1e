"""LoRA (issue 18): step 0 is the base model, training touches only the
adapters (and only they are saved), every mesh trains alike, kill -9 resumes
exactly, the adapters alone learn a task, bad input is one line, and eval and
infer take a LoRA run like any checkpoint.

The bases are tiny random models saved as flan-jax checkpoints: `CONFIG` is
gin/models/tiny.gin with the `CLI_MODEL` overrides, so `flan-jax train` runs
build the same model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    RESUMABLE_TRAIN,
    SMALL_MIXTURE,
    main_in_process,
    run_on_8_devices,
    start_cli,
    train_flags,
)
from flax import traverse_util

from flan_jax import peft
from flan_jax.errors import UserError
from flan_jax.model import T5Config, Transformer
from flan_jax.model.lora import LORA_ATTENTION_MLP, LORA_QUERY_VALUE, LoraConfig

CONFIG = T5Config(vocab_size=1024, emb_dim=32, num_heads=2, head_dim=16, num_encoder_layers=2, num_decoder_layers=2,
                  mlp_dim=64, mlp_activations=("gelu", "linear"), logits_via_embedding=False, dropout_rate=0.0)
CLI_MODEL = ["--gin.T5Config.emb_dim=32", "--gin.T5Config.num_heads=2", "--gin.T5Config.head_dim=16",
             "--gin.T5Config.mlp_dim=64"]
# The q,v preset's adapters (gin/peft/lora.gin), at a smaller rank.
LORA = dataclasses.replace(CONFIG, lora=LoraConfig(rank=4, alpha=8, dropout=0.05), frozen_dtype="bfloat16")
LENGTHS = {"inputs": 32, "targets": 16}
TRAIN_STEPS = 6


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items()}


def _batch(batch_size: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    enc = rng.integers(2, CONFIG.vocab_size, (batch_size, 12)).astype(np.int32)
    tgt = rng.integers(2, CONFIG.vocab_size, (batch_size, 6)).astype(np.int32)
    dec = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], axis=1)
    return jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(tgt)


def _init(config: T5Config, seed: int) -> dict:
    import flax.linen as nn

    init = jax.jit(lambda key: nn.unbox(Transformer(config).init(key, *_batch())["params"]))
    return jax.device_get(init(jax.random.key(seed)))


def _logits_fn(config: T5Config):
    """params -> teacher-forced logits of `_batch()`, without dropout."""
    apply = jax.jit(lambda params: Transformer(config).apply({"params": params}, *_batch(), enable_dropout=False))
    return lambda params: np.asarray(apply(params))


# ------------------------------------------------------------ 1. step 0


@functools.cache
def _base_and_logits(scan_layers: bool) -> tuple[dict, np.ndarray]:
    """A random base in either layer layout and its logits (shared by both target sets)."""
    config = dataclasses.replace(CONFIG, scan_layers=scan_layers)
    base = _init(config, seed=0)
    return base, _logits_fn(config)(base)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("targets, adapted", [
    (LORA_QUERY_VALUE, {"query", "value"}),
    (LORA_ATTENTION_MLP, {"query", "key", "value", "out", "wi_0", "wi_1", "wo"}),
], ids=["query_value", "attention_mlp"])
def test_step_zero_logits_equal_the_base_models(scan_layers, targets, adapted):
    config = dataclasses.replace(CONFIG, scan_layers=scan_layers, lora=LoraConfig(rank=4, dropout=0.05, targets=targets))
    base, base_logits = _base_and_logits(scan_layers)
    # Fresh adapters (another seed) on a copy of the base.
    params = peft.combine(peft.trainable(config, _init(config, seed=1)), base)
    flat = _flat(params)
    kernels = {path[:-1] for path in _flat(base) if path[-1] == "kernel" and path[-2] in adapted}
    assert {path[:-1] for path in flat if path[-1] == "lora_a"} == kernels
    assert {path[:-1] for path in flat if path[-1] == "lora_b"} == kernels

    logits = _logits_fn(config)
    np.testing.assert_array_equal(logits(params), base_logits)

    # Nonzero B: the adapters do enter the logits (so the equality above can fail).
    keys = iter(jax.random.split(jax.random.key(2), len(flat)))
    bumped = {k: (0.1 * jax.random.normal(next(keys), v.shape) if k[-1] == "lora_b" else v) for k, v in flat.items()}
    difference = np.abs(logits(traverse_util.unflatten_dict(bumped)) - base_logits).max()
    assert difference > 1e-3, difference


# ------------------------------------------- 2. only the adapters train


def _save_base_of(config: T5Config, directory: Path, seed: int = 0) -> Path:
    """A random model of `config` saved as a flan-jax run directory with the built-in vocabulary."""
    from flan_jax import formats
    from tasks import vocab

    return Path(formats.save_flan_jax(str(directory), config, _init(config, seed), vocab.default_vocabulary_path(), 0))


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> tuple[Path, Path]:
    """Two random tiny bases (seeds 0 and 1), as flan-jax run directories."""
    root = tmp_path_factory.mktemp("bases")
    return _save_base_of(CONFIG, root / "base", 0), _save_base_of(CONFIG, root / "other_base", 1)


@dataclasses.dataclass
class LoraRun:
    """A LoRA run trained in this process, with its state at the last step as it was in memory."""

    run_dir: Path
    base_dir: Path
    params: dict
    opt_state: object


def _train(model_dir: Path, base_dir: Path, config: T5Config = LORA, **overrides):
    """trainer.train of `config` on the base in `base_dir`, with the LoRA preset's optimizer at lr 1e-2."""
    import tasks
    from flan_jax import checkpoints as ckpt_lib
    from flan_jax import optim, trainer

    tasks.register()
    settings = dict(mixture_or_task_name=SMALL_MIXTURE, num_steps=TRAIN_STEPS, task_feature_lengths=LENGTHS,
                    batch_size=4, log_every=2)
    optimizer = optim.adafactor(learning_rate=1e-2, multiply_by_parameter_scale=False)
    return trainer.train(
        trainer.TrainConfig(model_dir=str(model_dir), init_checkpoint=str(base_dir), **{**settings, **overrides}),
        model_config=config, optimizer=optimizer,
        checkpoint_config=ckpt_lib.CheckpointConfig(save_every=3, best_metric=None), show_progress=False,
    )


@pytest.fixture(scope="module")
def lora_run(bases, tmp_path_factory) -> LoraRun:
    """TRAIN_STEPS steps of `LORA` on the first base; the train step is wrapped to keep its last output."""
    from flan_jax import step as step_lib

    make = step_lib.make_train_step
    last: dict = {}

    def make_recording(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def recording(*step_args):
            params, opt_state, metrics = step_fn(*step_args)
            last.update(params=params, opt_state=opt_state)
            return params, opt_state, metrics

        return recording

    run_dir = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step_lib, "make_train_step", make_recording)
        _train(run_dir, bases[0])
    return LoraRun(run_dir, bases[0], jax.device_get(last["params"]), jax.device_get(last["opt_state"]))


def _param_bytes(run_dir: Path, step: int) -> int:
    return sum(p.stat().st_size for p in (run_dir / "checkpoints" / str(step) / "params").rglob("*") if p.is_file())


def test_training_changes_only_the_adapters_and_saves_only_them(lora_run):
    from flan_jax import checkpoints as ckpt_lib
    from flan_jax import formats, optim, partitioning
    from flan_jax import step as step_lib

    base = _flat(formats.load_checkpoint(str(lora_run.base_dir)).params)
    trained = _flat(lora_run.params)
    adapters = {k: v for k, v in trained.items() if peft.is_adapter(k)}
    # In memory after the last step: the frozen base is the loaded one (in
    # bfloat16, LORA.frozen_dtype), bit for bit.
    assert set(trained) - set(adapters) == set(base)
    for path, value in base.items():
        assert trained[path].dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(trained[path], value.astype(jnp.bfloat16), err_msg=str(path))
    # The adapters did train: every B moved off zero, every A off its initial value.
    _, fresh, _ = step_lib.initialize(Transformer(LORA), optim.adafactor(), partitioning.Partitioner(), LENGTHS, seed=0)
    initial = _flat(peft.trainable(LORA, fresh))
    assert set(initial) == set(adapters) and len(adapters) == 2 * 6 * 2  # q and v of 6 attentions
    for path, value in adapters.items():
        assert value.dtype == np.float32 and not np.array_equal(value, initial[path]), path
        if path[-1] == "lora_b":
            assert np.abs(value).max() > 0, path

    # The optimizer state covers the adapters and nothing else.
    state_paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(lora_run.opt_state)]
    named = [p for p in state_paths if "'kernel'" in p or "'lora_" in p or "'embedding'" in p or "'scale'" in p]
    assert named and all("'lora_a'" in p or "'lora_b'" in p for p in named), named

    # The saved step holds the adapters alone, as they were in memory ...
    ckpt = ckpt_lib.open_for_reading(lora_run.run_dir / "checkpoints")
    saved, meta = ckpt.restore_params(TRAIN_STEPS)
    ckpt.close()
    saved = _flat(saved)
    assert set(saved) == set(adapters)
    for path, value in saved.items():
        np.testing.assert_array_equal(value, adapters[path], err_msg=str(path))
    assert meta["base"]["path"] == str(lora_run.base_dir)
    # ... so it is a fraction of the base's size on disk.
    ratio = _param_bytes(lora_run.run_dir, TRAIN_STEPS) / _param_bytes(lora_run.base_dir, 0)
    assert ratio < 0.35, ratio

    # Loading the run reads the recorded base, in the frozen dtype it trained in, and puts
    # the adapters on it: exactly the trained state.
    loaded = _flat(formats.load_checkpoint(str(lora_run.run_dir)).params)
    assert set(loaded) == set(trained)
    for path, value in loaded.items():
        np.testing.assert_array_equal(value, trained[path], err_msg=str(path))


# ------------------------------------------------- 3. any mesh, 8 devices

MESH_SCRIPT = textwrap.dedent("""
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    from conftest import random_batch, relative_error as relative
    from flan_jax import optim, partitioning, peft, step
    from flan_jax.model import T5Config, Transformer
    from flan_jax.model.lora import LORA_ATTENTION_MLP, LoraConfig

    # Adapters on every attention and MLP kernel; no dropout, so that 4
    # microbatches compute what one batch does. The base is held in bfloat16.
    # One layer each side holds every kind of adapted kernel (self- and
    # cross-attention, MLP) and shards them as deeper stacks do, at a third
    # less compilation in each of the six step programs below.
    CONFIG = T5Config(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, num_encoder_layers=1,
                      num_decoder_layers=1, mlp_dim=64, mlp_activations=("gelu", "linear"), dropout_rate=0.0,
                      lora=LoraConfig(rank=4, alpha=8, dropout=0.0, targets=LORA_ATTENTION_MLP),
                      frozen_dtype="bfloat16")
    lengths = {"inputs": 16, "targets": 8}
    batch = random_batch(32, lengths["inputs"], lengths["targets"], CONFIG.vocab_size)
    RULES = {"standard": partitioning.STANDARD_LOGICAL_AXIS_RULES, "fsdp": partitioning.FSDP_LOGICAL_AXIS_RULES,
             "dp": partitioning.DATA_PARALLEL_LOGICAL_AXIS_RULES}
    tx = optim.adafactor(learning_rate=1e-2, multiply_by_parameter_scale=False)
    # The same starting weights everywhere: a one-device initialisation.
    INIT = jax.device_get(step.initialize(Transformer(CONFIG), tx, partitioning.Partitioner(devices=jax.devices()[:1]),
                                          lengths, seed=0)[1])

    def two_steps(mesh_shape, rules, microbatches=1, devices=None):
        partitioner = partitioning.Partitioner(mesh_shape, RULES[rules], devices=devices)
        model = step.abstract_state(Transformer(CONFIG), tx, partitioner, lengths)[0]
        params = jax.device_put(INIT, model.params_shardings)
        losses = []
        with partitioner.activate():
            opt_state = jax.jit(tx.init, out_shardings=model.opt_state_shardings)(peft.trainable(CONFIG, params))
            train_step = step.make_train_step(model, tx, partitioner, num_microbatches=microbatches)
            for i in range(2):
                params, opt_state, metrics = train_step(params, opt_state, partitioner.shard_batch(batch),
                                                        jax.random.key(0), jnp.asarray(i))
                losses.append(float(metrics["loss"]))
        return losses, params

    def flat(tree):
        return {"/".join(k): np.asarray(v) for k, v in
                __import__("flax").traverse_util.flatten_dict(jax.device_get(tree)).items()}

    ref_losses, ref_params = two_steps((1, 1), "dp", devices=jax.devices()[:1])
    init, ref = flat(INIT), flat(ref_params)
    adapters = [k for k in ref if k.endswith(("lora_a", "lora_b"))]
    assert len(adapters) == 2 * (3 * 4 + 2 * 3), len(adapters)  # A and B of 3 attentions' and 2 MLPs' kernels
    assert min(relative(ref[k], init[k]) for k in adapters) > 1e-3  # both steps moved every A and B
    cases = {
        "1x1, 4 microbatches": dict(mesh_shape=(1, 1), rules="dp", devices=jax.devices()[:1], microbatches=4),
        "8-way FSDP": dict(mesh_shape=(8, 1), rules="fsdp"),
        "8-way FSDP, 4 microbatches": dict(mesh_shape=(8, 1), rules="fsdp", microbatches=4),
        "2x4": dict(mesh_shape=(2, 4), rules="standard"),
        "2x4, 4 microbatches": dict(mesh_shape=(2, 4), rules="standard", microbatches=4),
    }
    worst = 0.0
    for name, kwargs in cases.items():
        losses, params = two_steps(**kwargs)
        if name == "2x4":
            lora_b = params["decoder"]["layers_0"]["mlp"]["wi_0"]["lora_b"]
            assert tuple(lora_b.sharding.spec) == (None, "model"), lora_b.sharding.spec
        got = flat(params)
        assert set(got) == set(ref), name
        for k in got:
            if k not in adapters:  # the frozen base: untouched, bit for bit
                assert got[k].dtype == init[k].dtype == jnp.bfloat16 and np.array_equal(got[k], init[k]), (name, k)
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        adapter_diff = max(relative(got[k], ref[k]) for k in adapters)
        print(f"{name:28s} losses {losses} (rel diff {loss_diff:.1e}), adapters max rel diff {adapter_diff:.1e}")
        # Adafactor divides each update by the gradient's RMS, so an element whose
        # gradient is rounding noise (summed in another order) still moves by
        # ~lr: the adapters agree to 1e-4, the losses to 1e-5.
        assert loss_diff <= 1e-5 and adapter_diff <= 1e-4, name
        worst = max(worst, loss_diff, adapter_diff)
    for k in init:
        if k not in adapters:
            assert np.array_equal(ref[k], init[k]), k
    print(f"reference losses {ref_losses}; all {len(cases)} cases within {worst:.1e}")
""")


def test_two_lora_steps_are_the_same_on_every_mesh_and_microbatching():
    assert "all 5 cases within" in run_on_8_devices(MESH_SCRIPT)


# ------------------------------------------- 4. kill -9, then resume exactly

KILL_STEPS = 40
CLI_TRAIN = [
    *train_flags({"TrainConfig.task_feature_lengths": LENGTHS, "TrainConfig.num_steps": KILL_STEPS, **RESUMABLE_TRAIN},
                 gin_files=["peft/lora.gin"]),
    *CLI_MODEL,
]
# What the interrupted run must log exactly as the uninterrupted one does (the rest are timings).
EXACT = ("loss", "cross_ent_loss", "accuracy", "grad_norm", "skipped_steps")


def _cli_train(model_dir: Path, base_dir: Path, log: Path) -> subprocess.Popen:
    """`flan-jax train` with the LoRA preset (rank 16 on q and v, dropout 0.05, bfloat16 base) on `base_dir`."""
    return start_cli(["train", *CLI_TRAIN, f"--gin.TrainConfig.model_dir='{model_dir}'",
                      f"--gin.TrainConfig.init_checkpoint='{base_dir}'"], log)


def _finish(proc: subprocess.Popen, log: Path) -> str:
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    return log.read_text()


def _logged(model_dir: Path) -> dict[int, tuple]:
    """{step: exact metrics} from metrics.jsonl; fails on a duplicated step."""
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: tuple(r[k] for k in EXACT) for r in records}


def _saved_adapters(model_dir: Path, step: int) -> dict:
    from flan_jax import checkpoints as ckpt_lib

    ckpt = ckpt_lib.open_for_reading(model_dir / "checkpoints")
    params, _ = ckpt.restore_params(step)
    ckpt.close()
    return _flat(params)


def test_sigkill_and_rerun_gives_the_uninterrupted_runs_adapters(bases, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # Both start together (the machine's cores are shared either way).
    reference_proc = _cli_train(reference, bases[0], tmp_path / "reference.txt")
    proc = _cli_train(killed, bases[0], tmp_path / "killed.txt")
    deadline = time.monotonic() + 500
    while not (killed / "checkpoints" / "10").is_dir():
        assert proc.poll() is None, (tmp_path / "killed.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for the step-10 checkpoint"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.1))  # a random step after the first checkpoint (steps are quick)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "checkpoints" / str(KILL_STEPS)).exists(), "the run ended before it was killed"
    _finish(reference_proc, tmp_path / "reference.txt")

    output = _finish(_cli_train(killed, bases[0], tmp_path / "rerun.txt"), tmp_path / "rerun.txt")
    assert f"Resumed from {killed / 'checkpoints'}" in output
    want = _logged(reference)
    assert sorted(want) == [1, *range(5, KILL_STEPS + 1, 5)]
    assert _logged(killed) == want  # bit for bit: JSON floats round-trip exactly
    adapters, expected = _saved_adapters(killed, KILL_STEPS), _saved_adapters(reference, KILL_STEPS)
    assert set(adapters) == set(expected) and all(peft.is_adapter(k) for k in adapters)
    for path, value in expected.items():
        np.testing.assert_array_equal(adapters[path], value, err_msg=str(path))


# ------------------------------------------------------ 6. bad input


def test_a_target_that_matches_no_kernel_is_named():
    from flan_jax import optim, partitioning
    from flan_jax import step as step_lib

    config = dataclasses.replace(CONFIG, lora=LoraConfig(targets=("attention/query/kernel$", "nothing_here")))
    with pytest.raises(UserError) as error:
        step_lib.initialize(Transformer(config), optim.adafactor(), partitioning.Partitioner(), LENGTHS, seed=0)
    message = str(error.value)
    assert "LoraConfig.targets: 'nothing_here' matches no kernel" in message and "\n" not in message, message


@pytest.mark.parametrize("flag, message", [
    ("--gin.LoraConfig.rnak=4", "rnak"),
    ("--gin.LoraConfig.rank=0", "LoraConfig.rank=0: expected"),
    ("--gin.LoraConfig.rank=-2", "LoraConfig.rank=-2: expected"),
])
def test_a_bad_lora_setting_is_one_line(tmp_path, capfd, flag, message):
    import gin
    from flan_jax import cli

    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--gin_file=runs/smoke.gin", "--gin_file=peft/lora.gin", flag,
                      f"--gin.TrainConfig.model_dir='{tmp_path / 'run'}'"])
    finally:
        gin.clear_config()
    line = str(exit_info.value.code)
    assert line.startswith("flan-jax: error:") and message in line and "\n" not in line, line
    assert "Traceback" not in capfd.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resuming_adapters_on_another_base_names_both_fingerprints(lora_run, bases, tmp_path):
    from flan_jax import formats

    run_dir = tmp_path / "run"
    shutil.copytree(lora_run.run_dir, run_dir)
    trained_on, other = (peft.fingerprint(formats.load_checkpoint(str(b)).params) for b in bases)
    assert trained_on != other
    with pytest.raises(UserError) as error:
        _train(run_dir, bases[1], num_steps=TRAIN_STEPS + 2)
    message = str(error.value).splitlines()[0]  # what the CLI prints; gin adds where it called train
    assert f"belongs to base {bases[0]} (fingerprint {trained_on})" in message, message
    assert f"{bases[1]}, has fingerprint {other}" in message, message
    assert max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == TRAIN_STEPS


# ------------------------------------------ 7. eval and infer on a LoRA run


def _cli(capfd, *args: str) -> str:
    """`flan-jax ARGS` in this process (what is tested is how the commands load the run): its stdout."""
    capfd.readouterr()
    main_in_process(args)
    out, err = capfd.readouterr()
    assert "Traceback" not in err
    return out


def test_infer_and_eval_load_the_recorded_base(lora_run, capfd):
    from flan_jax import inference
    from tasks import vocab

    prompt = "Q: What is 3 plus 4?"
    answer = _cli(capfd, "infer", f"--model_dir={lora_run.run_dir}", "--max_decode_length=8", prompt)
    # The answer of the trained model as it was in memory (base and adapters).
    model = inference.LoadedModel(Transformer(LORA), lora_run.params, vocab.get_default_vocabulary(), TRAIN_STEPS, "test")
    expected = inference.generate(model, [prompt], max_decode_length=8)[0]
    assert f"> {prompt}\n{expected}\n" in answer, (answer, expected)

    evaluated = _cli(capfd, "eval", f"--checkpoint={lora_run.run_dir}", "--gin_file=runs/smoke.gin",
                     "--gin.TrainConfig.task_feature_lengths={'inputs': 64, 'targets': 16}",
                     "--gin.EvalConfig.num_examples=2", "--gin.EvalConfig.batch_size=2")
    assert f"step {TRAIN_STEPS}" in evaluated and "average_accuracy" in evaluated, evaluated


# ------------------------------------------------------- 5. LoRA learns

LEARN_STEPS = 60


def test_lora_alone_fits_a_held_in_task(tmp_path):
    """A random base (not pretrained: a tiny.gin-sized model, emb_dim 128, so
    that its frozen logits layer can express a confident answer) with the
    attention+MLP preset (rank 16, alpha 32, dropout 0.05, bfloat16 base,
    absolute Adafactor steps of 1e-2) fits builtin_boolean_expressions_zs_noopt,
    whose targets are "True" or "False": the adapters alone take the loss from
    the random base's ~7 (ln of the 1024-token vocabulary) to about 0.5 by step
    20 (the answer's form and the labels' frequencies; chance on the label is
    ln 2 / 2 per token), and the last logged loss is under a quarter of the
    first. (A task with 3-digit answers was tried first: its loss stays at a
    noisy 3.2-4.3 for 240 steps, too close to half the first to test.)"""
    config = dataclasses.replace(CONFIG, emb_dim=128, head_dim=32, mlp_dim=128)
    base_dir = _save_base_of(config, tmp_path / "base")
    lora = dataclasses.replace(config, lora=LoraConfig(rank=16, alpha=32, dropout=0.05, targets=LORA_ATTENTION_MLP),
                               frozen_dtype="bfloat16")
    summary = _train(tmp_path / "run", base_dir, lora, mixture_or_task_name="builtin_boolean_expressions_zs_noopt",
                     num_steps=LEARN_STEPS, task_feature_lengths={"inputs": 64, "targets": 16}, batch_size=8,
                     log_every=20)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 1 + LEARN_STEPS // 20 and summary.last_step == LEARN_STEPS
    assert losses[-1] < losses[0] / 4, losses
