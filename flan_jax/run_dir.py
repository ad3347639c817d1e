"""A training run's directory, opened as a context manager by `trainer.train`.

`RunDir` writes every file in it; `LAYOUT` lists them (the README's listing
is `layout_text()`, a test checks it). A run's input position is an item of
each checkpoint step (flan_jax/input_checkpoint.py); `input_state/`, where
runs before flan-jax 0.2 kept it, is only read, to resume such a run.

`RunDir` also keeps what the run's summary reports: the metrics window
(sums since the last log step), throughput and model FLOPs utilisation,
checkpoint stalls. Files outside orbax are written by the first host alone
(orbax coordinates its own writes). Leaving the `with` block waits for the
last checkpoint save and closes the writers, on every exit path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import gin
import jax
import numpy as np
from clu import metric_writers

import seqio

from flan_jax import checkpoints as ckpt_lib
from flan_jax import data as data_lib

# MODEL_DIR's entries: (name, what it holds).
LAYOUT: tuple[tuple[str, str], ...] = (
    ("config.gin", "the operative gin config (a resumed run with other settings adds config_resumed_at_<step>.gin)"),
    ("metrics.jsonl", ("one JSON object per logged step: step, loss, cross_ent_loss, accuracy, tokens_per_sec, "
                       "fill rates, eval/...")),
    ("tb/", "TensorBoard event files (tensorboard --logdir MODEL_DIR/tb)"),
    ("spiece.model", "the vocabulary, so the run is usable alone"),
    ("checkpoints/<step>/", ("orbax: params, opt_state, meta, input_state (with TrainConfig.save_input_state); "
                             "the last 2 and the best 1 are kept")),
    ("excluded_overlap.json", "with TrainConfig.exclude_overlap_with: the training examples read and dropped, by source"),
)
EXCLUDED_FILE = "excluded_overlap.json"
LEGACY_INPUT_STATE = "input_state"  # Before 0.2: MODEL_DIR/input_state/process_<i>/<step>/.


def layout_text(model_dir: str = "MODEL_DIR/") -> str:
    """`LAYOUT` as the README lists it."""
    width = max(len(name) for name, _ in LAYOUT) + 2
    return "\n".join([model_dir] + [f"  {name:<{width}}{what}" for name, what in LAYOUT])


@dataclasses.dataclass
class TrainSummary:
    """What a run reports at its end."""

    first_step: int
    last_step: int
    first_loss: float | None
    last_loss: float | None
    tokens_per_sec: float | None
    eval_metrics: dict[str, float]
    checkpoint_dir: str
    best_step: int | None
    tensorboard_dir: str
    config_path: str
    already_complete: bool = False
    preempted_by: str | None = None  # the signal that stopped the run early
    skipped_steps: int = 0  # updates skipped for a non-finite loss (TrainConfig.on_nonfinite='skip')
    save_stalls: list[float] = dataclasses.field(default_factory=list)  # seconds training waited per save

    def format(self) -> str:
        lines = ["", "=" * 72]
        if self.already_complete:
            lines.append(f"Run already complete at step {self.last_step}; nothing to do.")
        if self.preempted_by:
            lines.append(
                f"Stopped by {self.preempted_by} at step {self.last_step}; checkpoint saved in "
                f"{self.checkpoint_dir}/{self.last_step}. Run the same command again to resume."
            )
        lines.append(f"steps           {self.first_step} -> {self.last_step}")
        if self.first_loss is not None:
            lines.append(f"loss            first {self.first_loss:.4f}   last {self.last_loss:.4f}")
        if self.skipped_steps:
            lines.append(f"skipped         {self.skipped_steps} updates with a non-finite loss or gradient")
        if self.tokens_per_sec:
            lines.append(f"throughput      {self.tokens_per_sec:,.0f} tokens/s")
        if self.save_stalls:
            lines.append(
                f"checkpointing   {len(self.save_stalls)} saves, training paused "
                f"{1e3 * float(np.median(self.save_stalls)):.0f} ms per save (median), {1e3 * max(self.save_stalls):.0f} ms at most"
            )
        if self.eval_metrics:
            lines.append("evaluation (exact-match accuracy, %):")
            for key, value in sorted(self.eval_metrics.items()):
                lines.append(f"  {key.removeprefix('eval/'):<56} {value:7.2f}")
        lines.append(f"checkpoints     {self.checkpoint_dir} (best step: {self.best_step})")
        lines.append(f"tensorboard     {self.tensorboard_dir}")
        lines.append(f"config          {self.config_path}")
        lines.append("=" * 72)
        return "\n".join(lines)


class MetricWindow:
    """The per-step metrics since the last log step, summed on the host when logged.

    Its sums travel in each checkpoint's metadata (`state()`), so a run
    resumed in the middle of a window logs at the window's end exactly what
    an uninterrupted run logs. Steps whose update was skipped (non-finite
    loss) are counted, not summed.
    """

    def __init__(self, saved: Mapping[str, Any] | None = None) -> None:
        saved = saved or {}
        self.sums: dict[str, float] = dict(saved.get("sums", {}))
        self.num_steps: int = saved.get("num_steps", 0)
        self.skipped_total: int = saved.get("skipped_total", 0)
        self._pending: list[tuple[int, dict]] = []  # (step, metrics on device), not yet fetched

    def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        self._pending.append((step, metrics))

    def sync(self) -> list[tuple[int, dict[str, float]]]:
        """Fetches pending metrics (one device sync) into the sums; returns the skipped steps' metrics."""
        skipped = []
        for step, metrics in jax.device_get(self._pending):
            values = {k: float(v) for k, v in metrics.items()}
            if values.pop("skipped"):
                skipped.append((step, values))
                continue
            for key, value in values.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
            self.num_steps += 1
        self._pending = []
        self.skipped_total += len(skipped)
        return skipped

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores (call after `sync`)."""
        return {"sums": dict(self.sums), "num_steps": self.num_steps, "skipped_total": self.skipped_total}

    def scalars(self) -> dict[str, float]:
        """The window's averages; then starts a new window."""
        sums, n = self.sums, max(self.num_steps, 1)
        tokens = max(sums.get("num_tokens", 0.0), 1.0)
        nan = float("nan")
        scalars = {
            "loss": sums.get("loss", nan) / n,
            "cross_ent_loss": sums.get("cross_ent_sum", nan) / tokens,
            "accuracy": sums.get("correct", nan) / tokens,
            "grad_norm": sums.get("grad_norm", nan) / n,
            "skipped_steps": float(self.skipped_total),
        }
        self.sums, self.num_steps = {}, 0
        return scalars


class Throughput:
    """Tokens per second and model FLOPs utilisation (flan_jax.flops) per log window."""

    def __init__(self, flops_per_step: float, peak_flops: float) -> None:
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.speeds: list[float] = []  # of the windows after the first (which includes compilation)
        self._first = True
        self._tokens, self._steps, self._start = 0, 0, time.perf_counter()

    def restart_clock(self) -> None:
        """Times the window from now (after time spent on other things: evaluation)."""
        self._start = time.perf_counter()

    def add_step(self, tokens: int) -> None:
        self._tokens += tokens
        self._steps += 1

    def window(self) -> dict[str, float]:
        """The window's tokens/s and MFU; then starts a new window."""
        elapsed = time.perf_counter() - self._start
        scalars = {"tokens_per_sec": self._tokens / elapsed, "mfu": self._steps * self.flops_per_step / elapsed / self.peak_flops}
        if not self._first:
            self.speeds.append(scalars["tokens_per_sec"])
        self._first = False
        self._tokens, self._steps, self._start = 0, 0, time.perf_counter()
        return scalars

    def median(self) -> float | None:
        return float(np.median(self.speeds)) if self.speeds else None


class RunDir:
    """config.gin, metrics.jsonl, TensorBoard and the checkpointer of one run (module doc)."""

    def __init__(self, model_dir: str, checkpoint_config: ckpt_lib.CheckpointConfig, *, is_chief: bool,
                 pipeline_metrics: Callable[[], Mapping[str, float]] | None = None) -> None:
        """`pipeline_metrics()`, if given, returns the input pipeline's running counts (say
        `data/overlap_excluded`), logged with each train step's scalars. The tf.data pipeline
        reads ahead of training, so they count what it has processed so far in this process,
        a little more than the steps consumed."""
        self.model_dir, self.checkpoint_config, self.is_chief = model_dir, checkpoint_config, is_chief
        self.pipeline_metrics = pipeline_metrics
        self.checkpoint_dir = os.path.join(model_dir, "checkpoints")
        self.metrics_path = os.path.join(model_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(model_dir, "tb")
        self.config_path = os.path.join(model_dir, "config.gin")
        self.excluded_path = os.path.join(model_dir, EXCLUDED_FILE)
        self.window = MetricWindow()
        self.throughput: Throughput | None = None
        self.last_loss: float | None = None  # of this session's last log step
        self.eval_metrics: dict[str, float] = {}  # of this session's last evaluation
        self.save_stalls: list[float] = []

    def __enter__(self) -> RunDir:
        ckpt_lib.check_writable(self.model_dir)
        self.checkpointer = ckpt_lib.Checkpointer(self.checkpoint_dir, self.checkpoint_config)
        self.writer = metric_writers.create_default_writer(self.tb_dir, just_logging=not self.is_chief)
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, traceback: Any) -> None:
        try:
            self.checkpointer.close()  # Waits for the last save; raises if it failed.
        except Exception:
            if exc is None:
                raise  # Otherwise the error already on its way is the one to report.
        finally:
            self.writer.flush()
            self.writer.close()

    def start(self, step: int, metrics_window: Mapping[str, Any] | None) -> None:
        """Picks up at `step`: log entries past it are dropped (a killed run logged past its last
        checkpoint), the operative config is written, the metrics window is the checkpoint's."""
        self.window = MetricWindow(metrics_window)
        if self.is_chief:
            self._truncate_log_after(step)
            self.config_path = self._write_config(step)

    def save_vocabulary(self, vocabulary: seqio.Vocabulary) -> dict:
        """Copies the vocabulary into the run (spiece.model); returns the record each step's metadata keeps."""
        return data_lib.save_vocabulary(vocabulary, self.model_dir, write=self.is_chief)

    def legacy_input_state(self, batch: int) -> str:
        """Where a run before flan-jax 0.2 saved this process's input position at `batch`."""
        return os.path.join(self.model_dir, LEGACY_INPUT_STATE, f"process_{jax.process_index()}", str(batch))

    def write_exclusion(self, report: Mapping[str, Any]) -> None:
        """excluded_overlap.json: what the overlap exclusion read and dropped (`data.ExampleFilter.report`)."""
        if self.is_chief:
            with open(self.excluded_path, "w") as f:
                json.dump(dict(report), f, indent=1)

    def start_clock(self, flops_per_step: float, peak_flops: float) -> None:
        """Throughput is measured from now."""
        self.throughput = Throughput(flops_per_step, peak_flops)

    def log_train(self, step: int, host_batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Logs the window's averages, throughput, fill rates and pipeline counts (call after `window.sync()`)."""
        scalars = {**self.window.scalars(), **self.throughput.window(), **data_lib.fill_rates(host_batch),
                   **(self.pipeline_metrics() if self.pipeline_metrics else {})}
        self.write(step, scalars)
        self.last_loss = scalars["loss"]
        return scalars

    def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        self.eval_metrics = dict(metrics)
        self.write(step, metrics)
        self.throughput.restart_clock()

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """One line of metrics.jsonl and the same scalars to TensorBoard."""
        scalars = {k: float(v) for k, v in scalars.items()}
        self.writer.write_scalars(step, scalars)
        if self.is_chief:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def read(self) -> list[dict]:
        # Only the chief's file is complete; other hosts might catch it mid-line.
        if not self.is_chief or not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def summary(self, first_step: int, last_step: int, *, already_complete: bool = False,
                preempted_by: str | None = None) -> TrainSummary:
        """The run's summary: losses across resumes from metrics.jsonl; throughput and evaluation
        this session's (a run found already complete reports its log's)."""
        records = self.read()
        losses = [r["loss"] for r in records if "loss" in r]
        first_loss, last_loss = (losses[0], losses[-1]) if losses else (None, None)
        if already_complete:
            speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
            evals = [r for r in records if any(k.startswith("eval/") for k in r)]
            speed = float(np.median(speeds)) if speeds else None
            eval_metrics = {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
        else:
            last_loss = self.last_loss if self.last_loss is not None else last_loss
            speed, eval_metrics = self.throughput.median(), self.eval_metrics
        return TrainSummary(
            first_step, last_step, first_loss, last_loss, speed, eval_metrics, self.checkpoint_dir,
            self.checkpointer.best_step(), self.tb_dir, self.config_path, already_complete=already_complete,
            preempted_by=preempted_by, skipped_steps=self.window.skipped_total, save_stalls=list(self.save_stalls),
        )

    def _truncate_log_after(self, step: int) -> None:
        records = self.read()
        kept = [r for r in records if r["step"] <= step]
        if len(kept) < len(records):
            tmp = self.metrics_path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.metrics_path)  # Atomic: a kill now leaves the old file or the new one.

    def _write_config(self, step: int) -> str:
        """Writes the operative gin config; an existing config.gin is never overwritten."""
        text = gin.operative_config_str()
        path = self.config_path
        if os.path.exists(path):
            with open(path) as f:
                if f.read() == text:
                    return path
            path = os.path.join(self.model_dir, f"config_resumed_at_{step}.gin")
        with open(path, "w") as f:
            f.write(text)
        return path
