"""The run directory (flan_jax/run_dir.py): what it holds, and the input position saved in each checkpoint step."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, cli_env, train_flags

from flan_jax import run_dir

# `flan-jax train`, recording a digest of every batch the pipeline delivers (BATCH_LOG) and, with
# KILL_AT, dying the moment the checkpoint of that step is committed: before the next step.
DRIVER = """
import hashlib, os, sys
from flan_jax import checkpoints, cli, data
from flan_jax.commands import process

next_batch, save = data.TrainIterator.__next__, checkpoints.Checkpointer.save

def recorded(self):
    batch = next_batch(self)
    digest = hashlib.sha256(b"".join(batch[k].tobytes() for k in sorted(batch))).hexdigest()
    with open(os.environ["BATCH_LOG"], "a") as f:
        f.write(f"{self.position} {digest}\\n")
    return batch

def save_then_die(self, step, *args, **kwargs):
    held = save(self, step, *args, **kwargs)
    if step == int(os.environ.get("KILL_AT", -1)):
        self.wait()
        os._exit(137)
    return held

data.TrainIterator.__next__, checkpoints.Checkpointer.save = recorded, save_then_die
process.exit_without_collecting()
cli.main(sys.argv[1:])
"""


def _train(model_dir, steps: int, log, *, kill_at: int | None = None,
           save_input_state: bool = True) -> subprocess.CompletedProcess:
    flags = train_flags({"TrainConfig.model_dir": str(model_dir), "TrainConfig.num_steps": steps,
                         "TrainConfig.save_input_state": save_input_state, "CheckpointConfig.save_every": 2})
    env = cli_env(BATCH_LOG=str(log), **({"KILL_AT": str(kill_at)} if kill_at else {}))
    return subprocess.run([sys.executable, "-c", DRIVER, "train", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _batches(log) -> dict[int, str]:
    """Batch position -> digest, as recorded; a position recorded twice must have the same batch."""
    seen: dict[int, str] = {}
    for line in log.read_text().splitlines():
        position, digest = line.split()
        assert seen.setdefault(int(position), digest) == digest, f"batch {position} differs between sessions"
    return seen


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The batches of an uninterrupted 4-step run."""
    root = tmp_path_factory.mktemp("uninterrupted")
    result = _train(root / "run", 4, root / "batches.log")
    assert result.returncode == 0, result.stderr[-3000:]
    return _batches(root / "batches.log")


@pytest.fixture(scope="module")
def killed_at_2(tmp_path_factory):
    """A run killed between the save of step 2 and step 3: (its directory, its batch log)."""
    root = tmp_path_factory.mktemp("killed")
    killed = _train(root / "run", 4, root / "batches.log", kill_at=2)
    assert killed.returncode == 137, killed.stderr[-3000:]
    return root / "run", root / "batches.log"


def _copy(run, tmp_path):
    """A copy of a run (directory, batch log) in tmp_path, to resume there."""
    model_dir, log = tmp_path / "run", tmp_path / "batches.log"
    shutil.copytree(run[0], model_dir)
    shutil.copy(run[1], log)
    return model_dir, log


def test_killed_after_a_save_resumes_with_the_same_batches(uninterrupted, killed_at_2, tmp_path):
    """Killed between the save of step 2 and step 3, the rerun restores the position from step 2 itself."""
    model_dir, log = _copy(killed_at_2, tmp_path)
    step = model_dir / "checkpoints" / "2"
    assert {p.name for p in step.iterdir()} >= {"params", "opt_state", "meta", "input_state"}
    resumed = _train(model_dir, 4, log)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert "reading and dropping" not in resumed.stderr  # restored, not re-read
    assert _batches(log) == {p: uninterrupted[p] for p in _batches(log)}
    assert set(range(1, 5)) <= set(_batches(log))
    held = sorted((model_dir / "checkpoints").glob("*/input_state/process_0/spec.json"))
    assert [p.parts[-4] for p in held] == ["2", "4"]  # one per checkpoint step, the resumed run's too
    assert not (model_dir / "input_state").exists()  # nowhere else


def test_a_run_with_the_old_input_state_directory_resumes(uninterrupted, killed_at_2, tmp_path):
    """A run saved before 0.2 (input position in MODEL_DIR/input_state/process_0/<step>/, its spec.json the
    data settings alone, checkpoint steps without it) resumes from that position."""
    model_dir, log = _copy(killed_at_2, tmp_path)
    saved = model_dir / "checkpoints" / "2" / "input_state"
    old = model_dir / "input_state" / "process_0" / "2"
    shutil.copytree(saved / "process_0", old)
    shutil.rmtree(saved)
    spec = old / "spec.json"
    spec.write_text(json.dumps(json.loads(spec.read_text())["spec"]))

    resumed = _train(model_dir, 4, log)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    assert "reading and dropping" not in resumed.stderr
    assert _batches(log) == {p: uninterrupted[p] for p in _batches(log)}
    assert set(range(1, 5)) <= set(_batches(log))


def test_without_a_saved_position_the_rerun_reads_and_drops_to_the_same_batches(uninterrupted, tmp_path):
    log = tmp_path / "batches.log"
    assert _train(tmp_path / "run", 4, log, kill_at=2, save_input_state=False).returncode == 137
    assert not (tmp_path / "run" / "checkpoints" / "2" / "input_state").exists()
    resumed = _train(tmp_path / "run", 4, log, save_input_state=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "reading and dropping 2 batches" in resumed.stderr
    assert _batches(log) == {p: uninterrupted[p] for p in _batches(log)}


def test_the_readme_lists_the_run_directory_as_run_dir_does():
    readme = (REPO / "README.md").read_text()
    assert run_dir.layout_text("runs/smoke/") in readme
