"""Process set-up of the `flan-jax` command, before any command runs.

Huge pages for glibc's large allocations on CPU hosts (`huge_page_environment`,
applied by re-executing the process once), joining a multi-process run,
quiet TensorFlow/absl logs, fake CPU devices for planning a mesh, and an exit
that does not walk the heap.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


def exit_without_collecting() -> None:
    """Lets the interpreter exit without a garbage collection over the whole heap.

    With TensorFlow and JAX imported, the collections of Python's shutdown walk
    millions of objects: 2-4 s of CPU after the command is done, on every
    command. `gc.freeze()` at exit (after the other exit handlers, so that they
    run as usual) leaves them out; the operating system reclaims the memory.
    Everything the commands write is flushed and closed before they return.
    """
    atexit.register(gc.freeze)  # Exit handlers run last-registered first: this one after the rest.


def init_distributed() -> None:
    """Joins a multi-process run (FLAN_JAX_DISTRIBUTED=1) before JAX touches a device.

    On Cloud TPU slices and under SLURM, jax.distributed.initialize() finds the
    coordinator, the process count and this process's id by itself. Elsewhere
    (e.g. launch/multiprocess_local.sh) set FLAN_JAX_COORDINATOR_ADDRESS
    (host:port of process 0), FLAN_JAX_NUM_PROCESSES and FLAN_JAX_PROCESS_ID;
    any of them that is set overrides auto-detection. On CPU the processes
    exchange collectives over TCP with gloo (jax's default; set here so that a
    JAX_CPU_COLLECTIVES_IMPLEMENTATION=none in the environment cannot break it).
    """
    if os.environ.get("FLAN_JAX_DISTRIBUTED") != "1":
        return
    import jax

    explicit: dict = {}
    if address := os.environ.get("FLAN_JAX_COORDINATOR_ADDRESS"):
        explicit["coordinator_address"] = address
    for key, name in (("num_processes", "FLAN_JAX_NUM_PROCESSES"), ("process_id", "FLAN_JAX_PROCESS_ID")):
        if value := os.environ.get(name):
            try:
                explicit[key] = int(value)
            except ValueError:
                raise SystemExit(f"flan-jax: error: {name}={value!r} is not an integer") from None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**explicit)


# An INFO line of absl's C++ logging ("I0000 00:00:1795783688.436051   18202 port.cc:153] ..."),
# of TensorFlow's own format before 2.19 ("2025-01-01 10:00:00.000001: I tensorflow/...:12] ..."),
# and absl's notice that such lines go to stderr until absl::InitializeLog() is called.
_NATIVE_INFO_LINE = re.compile(
    r"I\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|\d{4}-\d\d-\d\d [\d:.]+: I \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
)


@contextlib.contextmanager
def _native_info_lines_dropped() -> Iterator[None]:
    """Holds back what is written to file descriptor 2 meanwhile, then passes it on without INFO lines.

    (Should the process die inside, what was held is lost: TF_CPP_MIN_LOG_LEVEL=0 shows it.)
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True)
                    if not _NATIVE_INFO_LINE.match(line.decode(errors="replace"))]
            os.write(2, b"".join(kept))


def quiet_backends() -> None:
    """Keeps TensorFlow to the CPU input pipeline and its logs quiet.

    TF_CPP_MIN_LOG_LEVEL quiets TensorFlow's C++ logging once it is set up, but
    TensorFlow >= 2.19 logs INFO lines (oneDNN, CUDA drivers) through absl while
    its shared libraries load, before absl::InitializeLog(); absl then writes
    every line to stderr and reads no environment variable. So those lines
    are filtered out of stderr during the import; warnings and errors pass.
    TF_CPP_MIN_LOG_LEVEL=0 keeps everything.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with contextlib.nullcontext() if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" else _native_info_lines_dropped():
        import tensorflow as tf
    from absl import logging as absl_logging

    # SeqIO warns once per task about uncached sources; only errors matter here.
    absl_logging.set_verbosity(absl_logging.ERROR)

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already runs in this process (main() called in-process); too late.
        pass


def fake_cpu_devices(count: int) -> None:
    """`count` CPU devices (before JAX starts), to compile for a mesh this machine lacks."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


def _accelerator_plugin_installed() -> bool:
    """Whether a JAX GPU/TPU plugin is installed (checked without starting a backend)."""
    from importlib import metadata, util

    return bool(metadata.entry_points(group="jax_plugins")) or util.find_spec("libtpu") is not None


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_page_environment() -> dict[str, str] | None:
    """The environment under which glibc backs large allocations with huge pages, or None.

    XLA's CPU runtime allocates each step's temporaries (2 GB for the d256
    4+4-layer benchmark model) afresh; glibc maps such blocks with new pages
    and unmaps them when freed, so every step faults its working set in again,
    4 KiB at a time: 540k page faults and a second of system time per step
    there, a sixth of the step. With the tunable glibc.malloc.hugetlb=1
    (glibc 2.35+) those blocks ask for transparent huge pages, 512x fewer
    faults. Tunables are read at process start, so `reexec_with_huge_pages`
    re-executes the process with it. None when it is set already, where the
    platform lacks it (not glibc 2.35+, huge pages off), where a GPU/TPU
    plugin is installed (its host allocations differ, unmeasured) or with
    FLAN_JAX_HUGE_PAGES=0.
    """
    import platform

    if os.environ.get("FLAN_JAX_HUGE_PAGES", "1") == "0" or HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
        return None
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    if "[never]" in mode:
        return None
    if os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0] != "cpu" or _accelerator_plugin_installed():
        return None
    tunables = ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), HUGE_PAGES_TUNABLE)))
    return {**os.environ, "GLIBC_TUNABLES": tunables}


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command line under `huge_page_environment`; returns where that is None."""
    environment = huge_page_environment()
    if environment is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environment)
