"""The installed stack is the one setup.py pins."""

import re
from pathlib import Path

from conftest import SMALL_MIXTURE
from seqio import version as seqio_version


def test_installed_seqio_is_the_pinned_one():
    setup_py = (Path(__file__).resolve().parent.parent / "setup.py").read_text()
    pinned = re.search(r'SEQIO_VERSION = "(.+)"', setup_py).group(1)
    assert seqio_version.__version__ == pinned


def test_training_path_does_not_import_torch_or_transformers():
    import subprocess
    import sys

    code = (
        "import sys, flan_jax.trainer, flan_jax.cli, tasks;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_wheel_installs_with_its_gin_configs(tmp_path):
    """A wheel installed away from the checkout trains from its own gin configs.

    Builds the wheel from a copy of the sources (so no build/ or egg-info lands
    in the repo), installs it with --target (its dependencies are the ones
    already installed), and runs `flan-jax train --gin_file=runs/smoke.gin` for
    3 steps from an empty working directory with only that copy on PYTHONPATH.
    """
    import os
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    src, dist, site, work = (tmp_path / d for d in ("src", "dist", "site", "work"))
    src.mkdir()
    work.mkdir()
    shutil.copy(repo / "setup.py", src)
    for d in ("flan_jax", "tasks", "gin"):
        shutil.copytree(repo / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src], check=True, timeout=120)
    (wheel,) = dist.glob("flan_jax-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True, timeout=120)
    assert (site / "flan_jax" / "gin_configs" / "runs" / "smoke.gin").is_file()

    # PYTHONPATH comes before the editable install's finder (appended to sys.meta_path).
    env = dict(os.environ, PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="3")
    code = (
        "import importlib.util, flan_jax; from flan_jax import config_files; from flan_jax.commands import gin_flags;"
        "print(flan_jax.__file__); print(importlib.util.find_spec('tasks').origin);"  # (importing tasks is slow)
        "print(config_files.gin_config_dir()); print(*config_files.candidate_dirs(), sep=',');"
        "print(gin_flags.resolve_file('models/flan_t5_base.gin')); print(gin_flags.resolve_file('runs/smoke.gin'))"
    )
    check = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-3000:]
    flan_file, tasks_file, config_dir, candidates, base_gin, smoke_gin = check.stdout.splitlines()
    assert Path(flan_file) == site / "flan_jax" / "__init__.py"
    assert Path(tasks_file) == site / "tasks" / "__init__.py"
    assert Path(config_dir) == site / "flan_jax" / "gin_configs"
    assert candidates == str(site / "flan_jax" / "gin_configs")  # no guess at <site>/gin, gin-config's package
    assert Path(base_gin) == site / "flan_jax" / "gin_configs" / "models" / "flan_t5_base.gin"
    assert Path(smoke_gin) == site / "flan_jax" / "gin_configs" / "runs" / "smoke.gin"

    model_dir = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable, "-m", "flan_jax.cli", "train", "--gin_file=runs/smoke.gin",
            "--gin.TrainConfig.num_steps=3", f"--gin.TrainConfig.model_dir='{model_dir}'",
            f"--gin.TrainConfig.mixture_or_task_name='{SMALL_MIXTURE}'",
            "--gin.TrainConfig.task_feature_lengths={'inputs': 64, 'targets': 32}",
            "--gin.TrainConfig.batch_size=4", "--gin.TrainConfig.eval_every=0",
            "--gin.EvalConfig.mixture_or_task_name=None",
        ],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "steps           0 -> 3" in train.stdout
    assert "T5Config.emb_dim = 128" in (model_dir / "config.gin").read_text()  # models/tiny.gin, by include
    assert not any(work.iterdir())  # nothing was written to the working directory
