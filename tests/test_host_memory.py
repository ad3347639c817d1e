"""`flan-jax` on CPU backs large host allocations with huge pages, so a step's
temporaries do not fault in 4 KiB pages afresh each step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flan_jax.commands import process

REPO = Path(__file__).resolve().parent.parent

# Allocates, writes and frees 256 MiB through malloc from a worker thread (as
# XLA's CPU runtime does a step's temporaries) three times; prints the page faults of each.
PROBE = """
import ctypes, json, os, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def step():
    block = libc.malloc(2**28)
    ctypes.memset(block, 1, 2**28)
    libc.free(block)
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    worker = threading.Thread(target=step)
    worker.start(); worker.join()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""
PAGES = 2**28 // 4096  # 4 KiB pages in 256 MiB


def _probe(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plain_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FLAN_JAX_HUGE_PAGES")}
    return {**env, **extra}


def test_huge_pages_remove_the_per_step_page_faults(monkeypatch):
    monkeypatch.setattr(os, "environ", _plain_env(JAX_PLATFORMS="cpu"))
    tuned = process.huge_page_environment()
    if tuned is None:
        pytest.skip("this host has no glibc 2.35+ or no transparent huge pages")
    plain = _probe(_plain_env())
    # Without it every round faults in all 65,536 pages (what the tuning removes).
    assert min(plain["faults"]) > PAGES // 2, plain
    got = _probe(tuned)
    assert process.HUGE_PAGES_TUNABLE in got["tunables"]
    assert max(got["faults"]) < PAGES // 20, got


@pytest.mark.parametrize("extra, applies", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"FLAN_JAX_HUGE_PAGES": "0"}, False),
    ({"JAX_PLATFORMS": "cuda"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, False),  # already applied: no second re-exec
], ids=["cpu", "opted_out", "gpu", "already_set"])
def test_huge_page_environment_applies_only_on_cpu_once(monkeypatch, extra, applies):
    monkeypatch.setattr(os, "environ", _plain_env(**extra))
    if applies and process.huge_page_environment() is None:
        pytest.skip("this host has no glibc 2.35+ or no transparent huge pages")
    assert (process.huge_page_environment() is not None) == applies


def test_other_glibc_tunables_are_kept(monkeypatch):
    monkeypatch.setattr(os, "environ", _plain_env(GLIBC_TUNABLES="glibc.malloc.arena_max=2"))
    env = process.huge_page_environment()
    if env is None:
        pytest.skip("this host has no glibc 2.35+ or no transparent huge pages")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + process.HUGE_PAGES_TUNABLE


def test_run_re_executes_itself_once_under_the_tunable():
    """`run` execs the same command line with GLIBC_TUNABLES set; the new process
    (which runs this same code again) goes straight on to `main`."""
    code = ("import os, sys; from flan_jax import cli; sys.argv = ['flan-jax', 'data', 'list']; "
            "cli.main = lambda: print('main:', os.environ.get('GLIBC_TUNABLES')); cli.run()")
    out = subprocess.run([sys.executable, "-c", code], env=_plain_env(JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "environ", _plain_env(JAX_PLATFORMS="cpu"))
        expected = process.HUGE_PAGES_TUNABLE if process.huge_page_environment() is not None else "None"
    assert out.stdout.splitlines() == [f"main: {expected}"]
