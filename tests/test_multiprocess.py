"""Multi-host training on one machine (launch/multiprocess_local.sh).

Two `flan-jax train` processes with 2 fake CPU devices each form one JAX
distributed run (FSDP over 4 devices) with `input_sharding='global_batch'`;
it must follow the loss trajectory of one process on 4 devices exactly, and
its checkpoint must resume in one process on another mesh (2 x 2, tensor
parallel) and continue that trajectory.
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The `flan-jax` entry point of this environment (the launchers run it, not `python -m`).
FLAN_JAX = shutil.which("flan-jax", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
if FLAN_JAX is None:
    # Not installed (only importable from the checkout): a stand-in that runs
    # what the entry point runs, flan_jax.cli.main, from the repository root.
    _SHIM_DIR = Path(tempfile.mkdtemp(prefix="flan_jax_bin_"))
    FLAN_JAX = str(_SHIM_DIR / "flan-jax")
    Path(FLAN_JAX).write_text(f'#!/usr/bin/env bash\ncd "{REPO}" && exec "{sys.executable}" -m flan_jax.cli "$@"\n')
    os.chmod(FLAN_JAX, 0o755)
    atexit.register(shutil.rmtree, _SHIM_DIR, True)

# The smoke config, cut down: one task (a mixture of 28 costs ~10 s more per
# process to build), 8 x 64/32 batches.
FLAGS = [
    "--gin_file=runs/smoke.gin",
    "--gin.TrainConfig.mixture_or_task_name='builtin_arithmetic_zs_cot'",
    "--gin.TrainConfig.log_every=1",
    "--gin.TrainConfig.batch_size=8",
    "--gin.TrainConfig.task_feature_lengths={'inputs': 64, 'targets': 32}",
    "--gin.CheckpointConfig.save_every=3",
    "--gin.EvalConfig.mixture_or_task_name=None",
    "--gin.train.show_progress=False",
]
FSDP = ["--gin_file=partitioning/fsdp.gin"]
# Generous: the suite runs on 2 xdist workers, so these 3 processes share 2 cores with another test.
TIMEOUT = 480


def _xla_flags(*flags: str) -> str:
    """The XLA flags of this process (see tests/conftest.py) but its fake device count, plus `flags`."""
    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join([*inherited, *flags])


def _env(**extra: str) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = os.pathsep.join([os.path.dirname(FLAN_JAX), str(BIN), env.get("PATH", "")])
    for key in ("FLAN_JAX_DISTRIBUTED", "FLAN_JAX_COORDINATOR_ADDRESS", "FLAN_JAX_NUM_PROCESSES", "FLAN_JAX_PROCESS_ID"):
        env.pop(key, None)
    return env


def _start(args: list[str], env: dict) -> subprocess.Popen:
    # A session of its own, so a timeout can kill the command with whatever it started (see _stop).
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> str:
    """SIGTERM first (the launcher then stops its processes, which run in sessions of their own), then SIGKILL."""
    proc.terminate()
    try:
        return proc.communicate(timeout=10)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[0]


def _finish(proc: subprocess.Popen, what: str) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        out = _stop(proc)
        pytest.fail(f"{what} timed out after {TIMEOUT}s; output:\n{out[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{what} exited with status {proc.returncode}; output:\n{out[-6000:]}")
    return out


def _single_process(model_dir: Path, devices: int, *flags: str) -> subprocess.Popen:
    env = _env(XLA_FLAGS=_xla_flags(f"--xla_force_host_platform_device_count={devices}"))
    return _start(
        [FLAN_JAX, "train", *FLAGS, f"--gin.TrainConfig.model_dir='{model_dir}'", *flags], env
    )


def _losses(model_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"metrics.jsonl logs a step twice (more than one writer?): {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _assert_close(got: dict[int, float], want: dict[int, float], steps: range, rtol: float, what: str) -> None:
    table = "\n".join(f"  step {s}: {got.get(s)!r:>22} vs {want.get(s)!r:>22}" for s in steps)
    assert set(steps) <= got.keys() and set(steps) <= want.keys(), f"{what}: missing steps\n{table}"
    bad = [s for s in steps if abs(got[s] - want[s]) > rtol * abs(want[s])]
    assert not bad, f"{what}: losses differ by more than {rtol} (relative) at steps {bad}\n{table}"
    print(f"{what}:\n{table}")


def test_two_processes_match_one_and_resume_on_another_mesh(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    # The 2-process run and the 1-process reference run side by side.
    launcher = _start(
        ["bash", str(REPO / "launch" / "multiprocess_local.sh"), "2", *FLAGS, *FSDP,
         "--gin.TrainConfig.num_steps=6", "--gin.TrainConfig.input_sharding='global_batch'",
         "--gin.TrainConfig.save_input_state=True"],
        _env(FLAN_JAX_NO_SETUP="1", DEVICES_PER_PROCESS="2", MODEL_DIR=str(multi), LOG_DIR=str(tmp_path / "logs"),
             XLA_FLAGS=_xla_flags()),
    )
    reference = _single_process(single, 4, *FSDP, "--gin.TrainConfig.num_steps=9")
    launcher_out = _finish(launcher, "launch/multiprocess_local.sh 2")
    _finish(reference, "the 1-process reference run")

    assert "[process 0]" in launcher_out and "[process 1]" in launcher_out
    assert "all 2 processes finished" in launcher_out
    for i in range(2):
        assert (tmp_path / "logs" / f"process_{i}.log").stat().st_size > 0
    # Files outside orbax come from process 0 alone; orbax wrote both processes' shards.
    assert sorted(p.name for p in multi.iterdir() if p.suffix == ".gin") == ["config.gin"]
    assert (multi / "spiece.model").exists()
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert (multi / "checkpoints" / "6" / "params" / "ocdbt.process_1").exists()
    # Each process saved its own input position, in the checkpoint step.
    assert [sorted(p.name for p in (multi / "checkpoints" / step / "input_state").glob("process_*"))
            for step in ("3", "6")] == [["process_0", "process_1"]] * 2
    multi_losses, single_losses = _losses(multi), _losses(single)
    assert sorted(multi_losses) == [1, 2, 3, 4, 5, 6]
    _assert_close(multi_losses, single_losses, range(1, 7), 1e-5, "2 processes x 2 devices vs 1 process x 4 devices")

    # Resume the 2-process checkpoint in one process on a (2, 2) mesh: FSDP over
    # 'data', tensor parallel over 'model'. The input position saved by process 0
    # is for half batches, so it skips 6 batches instead.
    resumed = _finish(
        _single_process(
            multi, 4, "--gin_file=partitioning/2d.gin", "--gin.MODEL_PARALLEL=2", "--gin.TrainConfig.num_steps=9",
            "--gin.TrainConfig.save_input_state=True",
        ),
        "the resumed 1-process run",
    )
    assert "Resumed from" in resumed and "at step 6" in resumed, resumed[-3000:]
    resumed_losses = _losses(multi)
    assert sorted(resumed_losses) == list(range(1, 10))
    _assert_close(resumed_losses, single_losses, range(7, 10), 1e-5, "resumed on a 2x2 mesh vs 1 process x 4 devices")


def test_launcher_stops_the_others_when_one_fails(tmp_path):
    """Process 1 fails while process 0 would run on: the launcher stops 0 and exits with 1's status."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "flan-jax"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "$FLAN_JAX_PROCESS_ID of $FLAN_JAX_NUM_PROCESSES at $FLAN_JAX_COORDINATOR_ADDRESS: $*"\n'
        '[ "$FLAN_JAX_DISTRIBUTED" = 1 ] || exit 9\n'
        # Process 1 fails only once process 0 has started (and printed).
        '[ "$FLAN_JAX_PROCESS_ID" = 0 ] && { touch "$STARTED"; sleep 120; exit 0; }\n'
        'for _ in $(seq 200); do [ -e "$STARTED" ] && break; sleep 0.1; done\n'
        "echo failing; exit 3\n"
    )
    fake.chmod(0o755)
    env = _env(FLAN_JAX_NO_SETUP="1", MODEL_DIR=str(tmp_path / "run"), STARTED=str(tmp_path / "process_0_started"))
    env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "multiprocess_local.sh"), "2", "--gin.X=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out
    assert "[process 1] failing" in out and "process 1 exited with status 3" in out, out
    assert "[process 0] 0 of 2 at 127.0.0.1:" in out and "--gin.X=1" in out, out


def test_launcher_fails_when_the_real_processes_fail(tmp_path):
    proc = _start(
        ["bash", str(REPO / "launch" / "multiprocess_local.sh"), "2", "--no_such_flag"],
        _env(FLAN_JAX_NO_SETUP="1", MODEL_DIR=str(tmp_path / "run"), XLA_FLAGS=_xla_flags()),
    )
    out = _finish_expecting_failure(proc)
    assert "no_such_flag" in out and "exited with status 2" in out, out[-3000:]


def _finish_expecting_failure(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _stop(proc)
        pytest.fail("the launcher did not stop after its processes failed")
    assert proc.returncode != 0, out[-3000:]
    return out


def _fake_mesh(process_of: list[list[int]]):
    """A stand-in for a (data, model) Mesh whose device [i][j] belongs to process process_of[i][j]."""
    from types import SimpleNamespace

    import numpy as np

    devices = np.empty((len(process_of), len(process_of[0])), object)
    for (i, j), p in np.ndenumerate(np.asarray(process_of)):
        devices[i, j] = SimpleNamespace(process_index=int(p))
    return SimpleNamespace(devices=devices, axis_names=("data", "model"), shape={"data": devices.shape[0], "model": devices.shape[1]})


def test_data_layout_follows_the_mesh():
    from flan_jax.partitioning import DataLayout, data_layout

    fsdp = _fake_mesh([[0], [0], [1], [1]])  # 2 hosts x 2 devices, (4, 1)
    assert [data_layout(fsdp, p) for p in (0, 1)] == [DataLayout(0, 2), DataLayout(1, 2)]
    two_d = _fake_mesh([[0, 0], [1, 1]])  # (2, 2): one row of the batch per host
    assert [data_layout(two_d, p) for p in (0, 1)] == [DataLayout(0, 2), DataLayout(1, 2)]
    tensor = _fake_mesh([[0, 0, 1, 1]])  # (1, 4): both hosts feed the whole batch
    assert [data_layout(tensor, p) for p in (0, 1)] == [DataLayout(0, 1), DataLayout(0, 1)]
    model_across = _fake_mesh([[0, 1], [0, 1], [2, 3], [2, 3]])  # 'model' spans hosts 0-1 and 2-3
    assert [data_layout(model_across, p).shard_index for p in range(4)] == [0, 0, 1, 1]
    spread = _fake_mesh([[0], [1], [0], [1]])  # a host's rows not consecutive
    assert data_layout(spread, 0) == DataLayout(0, 2, contiguous=False)
    with pytest.raises(ValueError, match="unevenly"):
        data_layout(_fake_mesh([[0, 0], [0, 1], [1, 1]]), 0)


def test_global_batch_shards_concatenate_to_the_one_host_batch():
    import numpy as np

    import tasks
    from flan_jax import data

    tasks.register()

    def batches(**kwargs) -> list[dict]:
        ds = data.get_train_dataset("builtin_arithmetic_zs_cot", {"inputs": 64, "targets": 32}, seed=3, **kwargs)
        return [{k: v.numpy() for k, v in b.items()} for b in ds.take(3)]

    whole = batches(batch_size=8)
    halves = [batches(batch_size=4, shard_index=i, num_shards=2, input_sharding="global_batch") for i in range(2)]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            np.testing.assert_array_equal(np.concatenate([h[step][key] for h in halves]), value)
    # Sharding the source instead gives other (equally valid) batches.
    source = batches(batch_size=4, shard_index=0, num_shards=2)
    assert not np.array_equal(source[0]["encoder_input_tokens"], whole[0]["encoder_input_tokens"][:4])
    with pytest.raises(data.UserError, match="input_sharding"):
        batches(batch_size=4, input_sharding="rows")
