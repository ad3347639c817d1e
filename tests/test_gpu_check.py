"""launch/gpu_check.sh, the one prepared command for a bare GPU machine: its
CPU dry run (the same steps on the tiny model) within its deadline, its few
files in OUT, and the one line it stops with when gin-config is missing."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import gin

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "gpu_check.sh"
FILES = {"env.txt", "attention_check.json", "matrix.json", "summary.md", "logs.tar.gz"}


def test_cpu_dry_run_writes_its_files_within_its_deadline(tmp_path):
    """One attention variant (cuDNN's, which falls back to XLA here: a few seconds, where
    Pallas's interpreter takes a minute) keeps this cheap; the steps are the GPU run's."""
    out, deadline = tmp_path / "out", 200
    env = {**os.environ, "VARIANTS": "cudnn_packed", "DEADLINE_S": str(deadline), "TMPDIR": str(tmp_path)}
    start = time.monotonic()
    run = subprocess.run(["bash", str(SCRIPT), "--cpu", str(out)], check=False, env=env, capture_output=True, text=True,
                         timeout=deadline + 60)
    wall = time.monotonic() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert wall <= deadline
    files = {p.name for p in out.iterdir()}
    assert files == FILES and len(files) <= 8

    assert "backend cpu" in (out / "env.txt").read_text()
    checks = json.loads((out / "attention_check.json").read_text())
    assert list(checks) == ["cudnn_packed"] and checks["cudnn_packed"]["passed"]
    records = {r["variant"]: r for r in json.loads((out / "matrix.json").read_text())}
    assert records["baseline"]["status"] == "ok"
    timed = records["cudnn_packed"]
    assert timed["status"] == "ok" and timed["gradient_check"]["passed"]
    assert timed["gradient_check"]["reused"]  # step 2's check, not run twice
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = set(tar.getnames())
    assert {"gpu_check.log", "tiny_baseline.log", "tiny_cudnn_packed.log", "tiny_cudnn_packed_check.log"} <= logs
    summary = (out / "summary.md").read_text()
    assert "| tiny, 2 | baseline |" in summary and "cudnn_packed: agree" in summary


def _python_without_site_packages(tmp_path: Path) -> Path:
    """A `python3` first on PATH that sees no site-packages (so no gin-config), as on a bare GPU image."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python3.chmod(0o755)
    return bin_dir


def _env_without_gin(tmp_path: Path, wheel_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH")}
    return {**env, "PATH": f"{_python_without_site_packages(tmp_path)}:{env['PATH']}",
            "GIN_WHEEL_DIR": str(wheel_dir), "TMPDIR": str(tmp_path)}


def test_without_gin_config_or_its_wheel_it_stops_at_once_with_one_line(tmp_path):
    """The repository's gin/ folder imports as an empty namespace package: named as such."""
    (tmp_path / "wheels").mkdir()
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), str(out)], check=False,
                         env=_env_without_gin(tmp_path, tmp_path / "wheels"), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    line = next(x for x in (run.stdout + run.stderr).splitlines() if x.startswith("gin-config is missing"))
    assert "namespace package" in line
    assert "python3 -m pip download --no-deps -d .whl gin-config==0.5.0" in line
    assert "matrix" not in run.stdout and not (out / "matrix.json").exists()


def test_gin_config_is_installed_from_a_wheel(tmp_path):
    """A wheel is a zip of the package: one made from the installed gin-config stands in for the real one."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    package = Path(gin.__file__).parent
    with zipfile.ZipFile(wheels / "gin_config-0.5.0-py3-none-any.whl", "w") as wheel:
        for path in package.rglob("*.py"):
            wheel.write(path, str(path.relative_to(package.parent)))
    site = tmp_path / "site"
    script = (f'ROOT="{REPO}"; PYTHON=python3; source "{REPO}/launch/gin_check.sh"; ensure_gin "{site}" && '
              f'cd "$ROOT" && python3 -c "import gin; print(gin.configurable.__module__)"')
    run = subprocess.run(["bash", "-c", script], check=False, env=_env_without_gin(tmp_path, wheels),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    installed = f"gin-config installed from {wheels}/gin_config-0.5.0-py3-none-any.whl into {site}"
    assert run.stdout.splitlines() == [installed, "gin.config"]


def test_no_matrix_run_outlives_the_budget(monkeypatch, tmp_path):
    """Each process's time limit is the lesser of its own and what is left of BUDGET_S; none starts once it is spent."""
    spec = importlib.util.spec_from_file_location("bench_matrix", REPO / "launch" / "bench_matrix.py")
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    limits = []

    def run(command, **kwargs):
        limits.append(kwargs["timeout"])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(matrix.subprocess, "run", run)
    monkeypatch.setattr(matrix, "_deadline", time.perf_counter() + 30)
    monkeypatch.setenv("RUN_TIMEOUT_S", "150")
    matrix._subprocess(["bench", "train"], "a", tmp_path, "", "RUN_TIMEOUT_S", "150")
    assert 25 < limits[0] <= 30
    monkeypatch.setattr(matrix, "_deadline", time.perf_counter() + 0.5)
    assert matrix._subprocess(["bench", "train"], "b", tmp_path, "", "RUN_TIMEOUT_S", "150")[:2] == ("budget spent", 0.0)
    assert len(limits) == 1
