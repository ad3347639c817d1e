"""Stopping a training run cleanly when it is preempted or interrupted.

On SIGTERM (what schedulers and spot-VM agents send before a kill) or SIGINT
(Ctrl-C), training finishes the step in flight, saves a checkpoint
synchronously and exits with `PREEMPTED_EXIT_CODE`; rerunning the same
command resumes from that checkpoint. A second SIGINT interrupts at once.

With several processes (jax.distributed) every process must stop after the
same step: JAX's preemption service catches SIGTERM on any host, and
`multihost_utils.reached_preemption_sync_point`, called after every step,
returns True on all hosts at the same step. SIGINT is handed to that
service as a SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
import types
from typing import Any

import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL from sysexits.h: "try again later". Tells a job scheduler that
# the run stopped early on purpose and should be started again.
PREEMPTED_EXIT_CODE = 75


class PreemptionWatcher:
    """A context manager: `should_stop(step)` is True once the run was asked to stop."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._multiprocess = jax.process_count() > 1

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python allows handlers in the main thread only.
        # With several processes JAX's own SIGTERM handler must stay in place.
        signals = (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # The second Ctrl-C: stop now, without saving.
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: finishing the current step, then saving a checkpoint.", flush=True)
        if self._multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption service, which tells every host.

    def should_stop(self, step: int) -> bool:
        """Call after every step, on every process, with the step just finished."""
        if self._multiprocess:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = self.signal_name or "SIGTERM"
                    return True
                return False
            except RuntimeError:  # The preemption service is off (jax_enable_preemption_service).
                pass
        return self.signal_name is not None
