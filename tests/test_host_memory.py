"""`flan-jax` on CPU keeps freed host memory, so a step's temporaries do not fault in fresh pages each time."""

import json
import os
import subprocess
import sys

import pytest

# Allocates and frees 256 MiB from a worker thread (as XLA's CPU runtime does
# a step's temporaries) four times and reports the page faults of the last three.
PROBE = """
import ctypes, json, resource, sys, threading
from flan_jax import cli
applied = cli.keep_freed_host_memory() if sys.argv[1] == "tuned" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def step():
    block = libc.malloc(2**28)  # 256 MiB through malloc, written in full (numpy would ask for huge pages)
    ctypes.memset(block, 1, 2**28)
    libc.free(block)
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    worker = threading.Thread(target=step)
    worker.start(); worker.join()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""
PAGES = 2**28 // 4096  # pages in 256 MiB


def _probe(mode: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**os.environ, **env}, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_host_memory_is_reused_without_page_faults():
    plain = _probe("plain")
    # glibc maps such a block afresh each time and unmaps it when freed: every
    # round faults in all its pages (this is what the tuning removes).
    assert min(plain["faults"][1:]) > PAGES // 2, plain
    tuned = _probe("tuned", JAX_PLATFORMS="cpu")
    assert tuned["applied"]
    assert max(tuned["faults"][1:]) < PAGES // 20, tuned


def test_tuning_is_skipped_when_asked_or_off_cpu():
    assert not _probe("tuned", FLAN_JAX_KEEP_HOST_MEMORY="0")["applied"]
    assert not _probe("tuned", JAX_PLATFORMS="cuda")["applied"]
