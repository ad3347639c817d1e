"""Runs that survive preemption, SIGKILL and unreadable checkpoints, with the
metrics of an uninterrupted run (issue 8).

The training runs are `flan-jax train` subprocesses on a small smoke config;
one uninterrupted run is the reference for all of them.
"""

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    RESUMABLE_TRAIN,
    SMALL_MIXTURE,
    main_in_process,
    run_cli,
    start_cli,
    train_flags,
)

NUM_STEPS = 60
FLAGS = train_flags({"TrainConfig.num_steps": NUM_STEPS, **RESUMABLE_TRAIN})
# What an interrupted run must log exactly as the uninterrupted one does (the
# rest are timings).
EXACT = ("loss", "cross_ent_loss", "accuracy", "grad_norm", "skipped_steps", "fill_rate/inputs", "fill_rate/targets")


def _train_args(model_dir: Path, *extra: str) -> list[str]:
    return ["train", *FLAGS, f"--gin.TrainConfig.model_dir='{model_dir}'", *extra]


def _train(model_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run_cli(*_train_args(model_dir, *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train_here(model_dir: Path, *extra: str) -> None:
    """`flan-jax train` in this process (no interpreter, TensorFlow or JAX to start)."""
    main_in_process(_train_args(model_dir, *extra))


def _start(model_dir: Path, log: Path) -> subprocess.Popen:
    return start_cli(_train_args(model_dir), log)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"training exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _records(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


def _logged(model_dir: Path) -> dict[int, tuple]:
    """{step: exact metrics} from metrics.jsonl; fails on a duplicated step."""
    steps = [r["step"] for r in _records(model_dir)]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: tuple(r[k] for k in EXACT) for r in _records(model_dir)}


def _final_params(model_dir: Path) -> list[np.ndarray]:
    import jax

    from flan_jax import checkpoints as ckpt_lib

    ckpt = ckpt_lib.open_for_reading(model_dir / "checkpoints")
    params, _ = ckpt.restore_params(NUM_STEPS)
    ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run, in this process (the interrupted ones, which must match it, run in their own)."""
    model_dir = tmp_path_factory.mktemp("reference") / "run"
    _train_here(model_dir)
    return model_dir


def _assert_same_run(model_dir: Path, reference: Path) -> None:
    want = _logged(reference)
    assert sorted(want) == [1, *range(5, NUM_STEPS + 1, 5)]
    assert _logged(model_dir) == want  # bit for bit: JSON floats round-trip exactly
    for a, b in zip(_final_params(model_dir), _final_params(reference)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_where_it_stopped_and_the_rerun_matches(reference, tmp_path):
    from flan_jax import preemption

    model_dir = tmp_path / "run"
    proc = _start(model_dir, tmp_path / "log.txt")
    # Past the first periodic checkpoint, so the stop lands mid-window.
    _wait_for(lambda: (model_dir / "checkpoints" / "10").is_dir(), proc, "the step-10 checkpoint")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == preemption.PREEMPTED_EXIT_CODE
    output = (tmp_path / "log.txt").read_text()
    stopped = max(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert 10 <= stopped < NUM_STEPS, output[-2000:]
    assert f"Stopped by SIGTERM at step {stopped}" in output
    assert f"{model_dir / 'checkpoints'}/{stopped}" in output
    assert "Traceback" not in output

    rerun = _train(model_dir)
    assert f"Resumed from {model_dir / 'checkpoints'} at step {stopped}" in rerun.stdout
    _assert_same_run(model_dir, reference)


def test_sigkill_then_rerun_logs_one_entry_per_step_as_uninterrupted(reference, tmp_path):
    model_dir = tmp_path / "run"
    proc = _start(model_dir, tmp_path / "log.txt")
    _wait_for(lambda: (model_dir / "checkpoints" / "10").is_dir(), proc, "the step-10 checkpoint")
    time.sleep(random.uniform(0.0, 1.0))  # a random step after the first checkpoint
    proc.kill()
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _train(model_dir)
    _assert_same_run(model_dir, reference)


def _truncate_newest(run_dir: Path) -> tuple[int, Path]:
    """Truncates the largest parameter data file of the newest step; returns (step, file)."""
    checkpoints = run_dir / "checkpoints"
    newest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    files = [p for p in (checkpoints / str(newest) / "params").rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size // 2)
    return newest, target


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def test_unreadable_newest_step_is_set_aside_for_infer_eval_and_resume(reference, tmp_path, capsys):
    from flan_jax import inference

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    newest, target = _truncate_newest(run_dir)
    before = _tree(run_dir)

    # infer and eval both load through inference.load_model.
    model = inference.load_model(str(run_dir))
    previous = newest - 10
    assert model.step == previous
    warning = capsys.readouterr().err
    assert f"step {newest} in {run_dir / 'checkpoints'} cannot be read" in warning
    aside = run_dir / "checkpoints" / f"{newest}.unreadable"
    assert f"moved it to {aside}" in warning
    # Nothing deleted: the same files, one directory renamed.
    assert _tree(run_dir) == sorted((name.replace(f"checkpoints/{newest}/", f"checkpoints/{newest}.unreadable/"), size) for name, size in before)

    # The CLI says the same on stderr and answers from the previous step.
    shutil.rmtree(run_dir)
    shutil.copytree(reference, run_dir)
    _truncate_newest(run_dir)
    answer = run_cli("infer", f"--model_dir={run_dir}", "--max_decode_length=4", "Hi")
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert f"step {newest} in {run_dir / 'checkpoints'} cannot be read" in answer.stderr
    assert "Traceback" not in answer.stderr

    # Training resumes from the previous step and finishes the run again.
    shutil.rmtree(run_dir)
    shutil.copytree(reference, run_dir)
    _truncate_newest(run_dir)
    resumed = _train(run_dir)
    assert f"Resumed from {run_dir / 'checkpoints'} at step {previous}" in resumed.stdout
    assert f"step {newest} in {run_dir / 'checkpoints'} cannot be read" in resumed.stderr
    assert (run_dir / "checkpoints" / f"{newest}.unreadable").is_dir()
    _assert_same_run(run_dir, reference)


# ---------------------------------------------------------------- in-process


def _small_train_config(model_dir: Path, **overrides):
    from flan_jax import trainer

    return trainer.TrainConfig(
        model_dir=str(model_dir), mixture_or_task_name=SMALL_MIXTURE, num_steps=12,
        task_feature_lengths={"inputs": 32, "targets": 16}, batch_size=4, log_every=4, **overrides,
    )


def _poison_step(monkeypatch, at_step: int) -> None:
    """Makes the loss of step `at_step` NaN, the way a bad batch would (NaN loss weights)."""
    import jax.numpy as jnp

    from flan_jax import step as step_lib

    make = step_lib.make_train_step

    def make_poisoned(*args, **kwargs):
        step_fn = make(*args, **kwargs)

        def poisoned(params, opt_state, batch, rng, step):
            weights = batch["decoder_loss_weights"].astype(jnp.float32)
            if int(step) + 1 == at_step:  # `step` counts the steps done before this one
                weights = weights * jnp.nan
            return step_fn(params, opt_state, dict(batch, decoder_loss_weights=weights), rng, step)

        return poisoned

    monkeypatch.setattr(step_lib, "make_train_step", make_poisoned)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_stops_or_is_skipped(tmp_path, tiny_config, monkeypatch, mode):
    import dataclasses

    import jax

    import tasks
    from flan_jax import checkpoints as ckpt_lib
    from flan_jax import optim, trainer

    tasks.register()

    _poison_step(monkeypatch, at_step=7)
    model_dir = tmp_path / "run"
    run = lambda: trainer.train(  # noqa: E731
        _small_train_config(model_dir, on_nonfinite=mode),
        model_config=dataclasses.replace(tiny_config, vocab_size=1024),  # the built-in vocabulary's size
        optimizer=optim.adafactor(learning_rate=1e-2),
        checkpoint_config=ckpt_lib.CheckpointConfig(save_every=5, best_metric=None),
        show_progress=False,
    )
    if mode == "stop":
        with pytest.raises(trainer.NonFiniteLossError) as error:
            run()
        message = str(error.value)
        assert "step 7 has loss nan" in message
        assert f"batch index 6 of '{SMALL_MIXTURE}', seed 0" in message
        assert f"Last good checkpoint: step 5 in {model_dir / 'checkpoints'}" in message
        assert "on_nonfinite='skip'" in message
        assert sorted(p.name for p in (model_dir / "checkpoints").iterdir()) == ["5"]  # nothing saved after
        return
    summary = run()
    assert summary.last_step == 12 and summary.skipped_steps == 1
    records = _records(model_dir)
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(1, 0.0), (4, 0.0), (8, 1.0), (12, 1.0)]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    ckpt = ckpt_lib.open_for_reading(model_dir / "checkpoints")
    params, meta = ckpt.restore_params(12)
    assert meta["metrics_window"]["skipped_total"] == 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    ckpt.close()


def test_a_stop_before_any_checkpoint_says_so_and_its_progress_bar_stays_at_the_last_good_step(
        tmp_path, tiny_config, monkeypatch, capsys):
    """Poisoned at step 2 (noticed at the log of step 4), no checkpoint exists yet: the message says so,
    and the bar ends at 1/12 (the last good step), never redrawn at the steps dispatched past it."""
    import dataclasses

    import tasks
    from flan_jax import checkpoints as ckpt_lib
    from flan_jax import optim, trainer

    tasks.register()
    _poison_step(monkeypatch, at_step=2)
    model_dir = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteLossError) as error:
        trainer.train(_small_train_config(model_dir), model_config=dataclasses.replace(tiny_config, vocab_size=1024),
                      optimizer=optim.adafactor(learning_rate=1e-2),
                      checkpoint_config=ckpt_lib.CheckpointConfig(save_every=5, best_metric=None))
    assert f"No checkpoint was saved yet in {model_dir / 'checkpoints'}." in str(error.value)
    assert "step None" not in str(error.value)
    bar = capsys.readouterr().err
    assert "100%" not in bar
    assert " 1/12 " in bar.replace("\r", "\n").strip().splitlines()[-1]


def _tiny_state():
    import jax.numpy as jnp

    from flan_jax import optim

    params = {"encoder": {"layers_0": {"kernel": jnp.arange(64.0).reshape(8, 8)}}, "bias": jnp.ones((3,))}
    return params, optim.adafactor().init(params)


def test_a_model_that_does_not_fit_is_an_error_not_an_unreadable_step(tmp_path):
    import jax.numpy as jnp

    from flan_jax import checkpoints as ckpt_lib
    from flan_jax.errors import UserError

    params, opt_state = _tiny_state()
    ckpt = ckpt_lib.Checkpointer(tmp_path, ckpt_lib.CheckpointConfig(best_metric=None))
    ckpt.save(1, params, opt_state, {"step": 1})
    ckpt.wait()
    other = dict(params, bias=jnp.ones((4,)))
    with pytest.raises(UserError, match=r"parameter bias has shape \(3,\), the model wants \(4,\)"):
        ckpt.read_newest(lambda s: ckpt.restore(s, ckpt_lib.abstract_like(other), ckpt_lib.abstract_like(opt_state)))
    assert (tmp_path / "1").is_dir()  # not set aside


def test_no_readable_step_is_one_clear_error(tmp_path):
    from flan_jax import checkpoints as ckpt_lib
    from flan_jax.errors import UserError

    params, opt_state = _tiny_state()
    ckpt = ckpt_lib.Checkpointer(tmp_path, ckpt_lib.CheckpointConfig(best_metric=None))
    for step in (1, 2):
        ckpt.save(step, params, opt_state, {"step": step})
    ckpt.wait()
    for step in (1, 2):
        (tmp_path / str(step) / "meta" / "metadata").write_text("{not json")
    with pytest.raises(UserError, match=r"no readable checkpoint step in .*step 2 .* cannot be read.*step 1 .* cannot be read"):
        ckpt.read_newest(ckpt.meta)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("_")) == ["1.unreadable", "2.unreadable"]


def test_a_failed_save_names_its_cause_and_keeps_earlier_steps(tmp_path):
    """A write that fails part-way (here: the file-size limit, as a full disk would)."""
    import resource

    import jax

    from flan_jax import checkpoints as ckpt_lib

    params, opt_state = _tiny_state()
    ckpt = ckpt_lib.Checkpointer(tmp_path, ckpt_lib.CheckpointConfig(best_metric=None, keep_last=1))
    ckpt.save(1, params, opt_state, {"step": 1})
    ckpt.wait()
    big = jax.random.normal(jax.random.key(0), (512, 512))
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(ckpt_lib.CheckpointSaveError) as error:
            ckpt.save(2, dict(params, bias=big), opt_state, {"step": 2})
            ckpt.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(error.value)
    assert f"saving step 2 to {tmp_path} failed" in message and "the earlier steps [1] are intact" in message
    restored, meta = ckpt.restore_params(1)
    np.testing.assert_array_equal(np.asarray(restored["bias"]), np.asarray(params["bias"]))
    ckpt.close()


def test_an_unwritable_model_dir_is_named(tmp_path):
    from flan_jax import checkpoints as ckpt_lib
    from flan_jax.errors import UserError

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"cannot write to {tmp_path / 'file' / 'run'}"):
        ckpt_lib.check_writable(str(tmp_path / "file" / "run"))


def test_each_dropout_rng_impl_trains_and_resumes_exactly(tmp_path):
    """TrainConfig.rng_impl (T5X's hardware RNG): with dropout on, a run stopped at step 2 and
    resumed logs and ends as the uninterrupted one; each PRNG draws its own masks. (The
    default, threefry2x32, is the PRNG of the other tests here.) The stopped run is a copy of
    the uninterrupted one without its step-4 checkpoint: a run killed after step 4 was logged
    and before it was saved, which must resume at step 2 exactly as one stopped there."""
    flags = ["--gin.T5Config.dropout_rate=0.1", "--gin.TrainConfig.num_steps=4", "--gin.TrainConfig.log_every=1",
             "--gin.CheckpointConfig.save_every=2"]

    def run(model_dir: Path, *extra: str) -> dict[int, tuple]:
        """In this process: resuming across processes is the other tests' (threefry's key data is
        saved and restored as every PRNG's is)."""
        _train_here(model_dir, *flags, *extra)
        return _logged(model_dir)

    def stopped_at_step_2(model_dir: Path, copy: Path) -> Path:
        shutil.copytree(model_dir, copy)
        shutil.rmtree(copy / "checkpoints" / "4")
        assert sorted(p.name for p in (copy / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
        return copy

    def final(model_dir: Path) -> list[np.ndarray]:
        import jax

        from flan_jax import checkpoints as ckpt_lib

        ckpt = ckpt_lib.open_for_reading(model_dir / "checkpoints")
        params, _ = ckpt.restore_params(4)
        ckpt.close()
        return [np.asarray(x) for x in jax.tree.leaves(params)]

    logged = {}
    for impl in ("rbg", "unsafe_rbg"):
        choice = f"--gin.TrainConfig.rng_impl='{impl}'"
        logged[impl] = run(tmp_path / impl, choice)
        stopped_at_step_2(tmp_path / impl, tmp_path / f"{impl}_resumed")
        assert run(tmp_path / f"{impl}_resumed", choice) == logged[impl], impl
        for a, b in zip(final(tmp_path / f"{impl}_resumed"), final(tmp_path / impl)):
            np.testing.assert_array_equal(a, b)
    assert logged["rbg"] != logged["unsafe_rbg"]
