"""The training loop: packed batches -> jit train step on a mesh -> checkpoints and evals.

One function, `train`, configured by gin. It resumes from the latest
checkpoint in `model_dir`, logs to TensorBoard and `metrics.jsonl`, evaluates
held-out tasks every `eval_every` steps, keeps the best checkpoint, and
returns a `TrainSummary`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from clu import metric_writers

from flan_jax import checkpoints as ckpt_lib
from flan_jax import data as data_lib
from flan_jax import errors
from flan_jax import evaluation
from flan_jax import flops
from flan_jax import formats
from flan_jax import inference
from flan_jax import optim
from flan_jax import partitioning
from flan_jax import preemption
from flan_jax import step as step_lib
from flan_jax.errors import UserError
from flan_jax.model import T5Config, Transformer, scan

PyTree = Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train on and for how long."""

    model_dir: str
    mixture_or_task_name: str
    num_steps: int
    task_feature_lengths: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"inputs": 512, "targets": 128}
    )
    batch_size: int = 32  # global, across all devices and hosts
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    loss_normalizing_factor: float | None = None
    # Pretrained weights to start from (HF directory, T5X checkpoint or flan-jax
    # run); ignored once model_dir holds a checkpoint of its own.
    init_checkpoint: str | None = None
    # Continue init_checkpoint's optimizer state where it has one, as T5X's
    # finetuning does (it restores the whole train state): a T5X checkpoint's
    # Adafactor second moments and step, a flan-jax run's optimizer state. The
    # learning-rate schedule and the step count start at 0. False starts the
    # optimizer afresh, as checkpoints without its state (HF, converted) do.
    init_optimizer_state: bool = True
    # Also save the input pipeline's state with each checkpoint, so a resume
    # restores it in seconds instead of re-reading the consumed batches. Costs
    # tens of MB and seconds per save (see data.TrainIterator).
    save_input_state: bool = False
    # Split each batch into this many microbatches and accumulate gradients:
    # the same update as the whole batch, with the activation memory of one
    # microbatch.
    num_microbatches: int = 1
    # How the hosts of a multi-host run share out the global batch (see
    # flan_jax/data.py): "source" (each host reads its own shard of the
    # examples; scalable) or "global_batch" (each host builds the whole global
    # batch and keeps its rows; the same batches for any host count and mesh).
    input_sharding: str = "source"
    # What a non-finite loss or gradient norm does: "stop" the run (naming the
    # step and batch) or "skip" that update and go on, counting skipped steps.
    # Either way the update is not applied (see step.make_train_step).
    on_nonfinite: str = "stop"
    # Suites (e.g. ("gsm8k_cot",)) whose evaluation questions training must not see: training examples sharing
    # a 13-word n-gram with one are dropped in the input pipeline and counted (flan_jax/commands/train.py).
    exclude_overlap_with: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        errors.require_fields(
            self, model_dir=errors.PATH, mixture_or_task_name=errors.NAME, num_steps=errors.POSITIVE_INT,
            task_feature_lengths=errors.FEATURE_LENGTHS, batch_size=errors.POSITIVE_INT, seed=errors.NON_NEGATIVE_INT,
            log_every=errors.POSITIVE_INT, eval_every=errors.NON_NEGATIVE_INT, z_loss=errors.NON_NEGATIVE_NUMBER,
            label_smoothing=errors.FRACTION, loss_normalizing_factor=errors.optional(errors.POSITIVE_NUMBER),
            init_checkpoint=errors.optional(errors.PATH), init_optimizer_state=errors.BOOL, save_input_state=errors.BOOL,
            num_microbatches=errors.POSITIVE_INT, input_sharding=errors.one_of(*data_lib.INPUT_SHARDINGS),
            on_nonfinite=errors.one_of("stop", "skip"),
        )
        if self.batch_size % self.num_microbatches:
            raise UserError(
                f"TrainConfig.num_microbatches={self.num_microbatches} does not divide "
                f"TrainConfig.batch_size={self.batch_size}"
            )

    def loss_config(self) -> step_lib.LossConfig:
        return step_lib.LossConfig(self.z_loss, self.label_smoothing, self.loss_normalizing_factor)


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


class _MetricsLog:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, model_dir: str, enabled: bool) -> None:
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(model_dir, "tb")
        self.enabled = enabled
        self.writer = metric_writers.create_default_writer(self.tb_dir, just_logging=not enabled)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self.writer.write_scalars(step, scalars)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")

    def read(self) -> list[dict]:
        # Only the chief's file is complete; other hosts might catch it mid-line.
        if not self.enabled or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drops the entries of steps after `step`: a killed run logged past its last checkpoint."""
        records = self.read()
        kept = [r for r in records if r["step"] <= step]
        if len(kept) < len(records):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)  # Atomic: a kill now leaves the old file or the new one.

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _MetricWindow:
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


class NonFiniteLossError(UserError):
    """The loss or gradient norm of a step was NaN or infinite (TrainConfig.on_nonfinite='stop')."""


def _load_pretrained(
    path: str,
    model_config: T5Config,
    model: step_lib.Model,
    tx: optax.GradientTransformation,
    partitioner: partitioning.Partitioner,
    init_params: PyTree,
    init_opt_state: PyTree,
    init_optimizer_state: bool,
) -> tuple[PyTree, PyTree]:
    """Params from a pretrained checkpoint (any format), placed on the mesh, plus the optimizer
    state: the checkpoint's when it has one and `init_optimizer_state`, else fresh."""
    # load_checkpoint checks every parameter's name and shape against model_config.
    loaded = formats.load_checkpoint(path, config=model_config, shardings=model.params_shardings)
    params = jax.tree.map(lambda x, ref: x.astype(ref.dtype), loaded.params, init_params)
    # Fresh (`init_opt_state`, already initialised on the mesh) unless the checkpoint's continues.
    opt_state, continued = init_opt_state, ""
    if init_optimizer_state and loaded.format == "flan_jax":
        restored = _flan_jax_opt_state(path, loaded.step, model, params, init_opt_state, partitioner)
        if restored is not None:
            opt_state, continued = restored, "; its optimizer state continues"
    elif init_optimizer_state and loaded.format.startswith("t5x"):
        t5x_state = formats.read_adafactor_state(path)
        if t5x_state is not None:
            opt_state = jax.device_put(_t5x_opt_state(path, t5x_state, model_config, tx), model.opt_state_shardings)
            continued = f"; Adafactor statistics continue from its step {t5x_state[1]}"
    print(f"Initialised from {loaded.format} checkpoint {path} (its step {loaded.step}){continued}.")
    return params, opt_state


def _flan_jax_opt_state(path: str, step: int, model: step_lib.Model, params: PyTree, init_opt_state: PyTree,
                        partitioner: partitioning.Partitioner) -> PyTree | None:
    """A flan-jax run's optimizer state at `step`, its schedules restarted; None if it holds none."""
    checkpoint_dir, _, _ = formats.flan_jax_location(path)
    checkpointer = ckpt_lib.open_for_reading(checkpoint_dir)
    try:
        if not checkpointer.has_opt_state(step):
            return None
        try:
            _, opt_state, _ = _restore_state(checkpointer, step, model, params, init_opt_state, partitioner)
        except UserError as e:
            raise UserError(f"{e}; set TrainConfig.init_optimizer_state=False to start the optimizer afresh") from e
    finally:
        checkpointer.close()
    return jax.device_put(optim.restart_schedule(opt_state), model.opt_state_shardings)


def _t5x_opt_state(path: str, t5x_state: tuple[PyTree, int], model_config: T5Config,
                   tx: optax.GradientTransformation) -> PyTree:
    """`tx`'s state (on the host, in the model's layer layout) holding a T5X checkpoint's Adafactor statistics."""
    param_states, step = t5x_state
    unrolled = formats.abstract_params(dataclasses.replace(model_config, scan_layers=False))
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, unrolled))
    try:
        state = optim.with_t5x_statistics(fresh, param_states, step)
    except ValueError as e:
        raise UserError(f"{path}: cannot continue its Adafactor state: {e}; "
                        "set TrainConfig.init_optimizer_state=False to start it afresh") from e
    return scan.to_layout(state, model_config.scan_layers)


def _restore_state(
    checkpointer: ckpt_lib.Checkpointer,
    step: int,
    model: step_lib.Model,
    params: PyTree,
    opt_state: PyTree,
    partitioner: partitioning.Partitioner,
) -> tuple[PyTree, PyTree, dict]:
    """Restores params, optimizer state and metadata onto the current shardings.

    A checkpoint saved with the other layer layout (scanned vs unrolled) is
    read in its own layout and converted: both the parameters and the
    per-parameter optimizer state follow the parameter tree.
    """
    saved = formats.config_from_dict(checkpointer.meta(step)["model_config"])
    scanned = model.module.config.scan_layers
    if saved.scan_layers == scanned:
        return checkpointer.restore(step, ckpt_lib.abstract_like(params), ckpt_lib.abstract_like(opt_state))
    print(f"Step {step} was saved with scan_layers={saved.scan_layers}; converting to scan_layers={scanned}.")
    replicated = partitioner.replicated()
    def to_layout(trees: tuple, scan_layers: bool) -> tuple:
        return tuple(scan.to_layout(t, scan_layers) for t in trees)

    as_saved = jax.eval_shape(lambda t: to_layout(t, saved.scan_layers), (params, opt_state))
    as_saved = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), as_saved)
    params, opt_state, meta = checkpointer.restore(step, *as_saved)
    convert = jax.jit(
        lambda t: to_layout(t, scanned), out_shardings=(model.params_shardings, model.opt_state_shardings)
    )
    params, opt_state = convert((params, opt_state))
    return params, opt_state, meta


def _save_config(model_dir: str, step: int, write: bool = True) -> str:
    """Writes the operative gin config; an existing config.gin is never overwritten.

    `write=False` (every host but the first) writes nothing and returns config.gin's path.
    """
    path = os.path.join(model_dir, "config.gin")
    if not write:
        return path
    text = gin.operative_config_str()
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return path
        path = os.path.join(model_dir, f"config_resumed_at_{step}.gin")
    with open(path, "w") as f:
        f.write(text)
    return path


def _summary_from_log(records: list[dict]) -> tuple[float | None, float | None, float | None, dict[str, float]]:
    losses_ = [r["loss"] for r in records if "loss" in r]
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    last_eval = {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}
    return (
        losses_[0] if losses_ else None,
        losses_[-1] if losses_ else None,
        float(np.median(speeds)) if speeds else None,
        last_eval,
    )


@gin.configurable(denylist=["config"])
def train(
    config: TrainConfig | None = None,
    *,
    model_config: T5Config | None = None,
    optimizer: optax.GradientTransformation | None = None,
    partitioner: partitioning.Partitioner | None = None,
    checkpoint_config: ckpt_lib.CheckpointConfig | None = None,
    eval_config: evaluation.EvalConfig | None = None,
    show_progress: bool = True,
) -> TrainSummary:
    """Finetunes (or trains from scratch) a T5 on a SeqIO mixture; see module doc."""
    config = config or TrainConfig()
    model_config = model_config or T5Config()
    tx = optimizer or optim.adafactor()
    partitioner = partitioner or partitioning.Partitioner()
    checkpoint_config = checkpoint_config or ckpt_lib.CheckpointConfig()
    eval_config = eval_config or evaluation.EvalConfig()
    lengths = dict(config.task_feature_lengths)
    is_chief = jax.process_index() == 0

    # Validate names and sizes before any work is done.
    task = data_lib.get_mixture_or_task(config.mixture_or_task_name)
    vocabulary = data_lib.targets_vocabulary(task)
    if vocabulary.vocab_size > model_config.vocab_size:
        raise UserError(
            f"the vocabulary of {config.mixture_or_task_name!r} has {vocabulary.vocab_size} ids but "
            f"T5Config.vocab_size is {model_config.vocab_size}"
        )
    if config.batch_size % partitioner.data_parallel_size:
        raise UserError(
            f"TrainConfig.batch_size={config.batch_size} is not divisible by the "
            f"{partitioner.data_parallel_size} data-parallel devices"
        )
    # This host's rows of each global batch (all of them with one host).
    layout = partitioner.data_layout()
    if config.input_sharding == "global_batch" and not layout.contiguous:
        raise UserError(
            "TrainConfig.input_sharding='global_batch' needs each host's devices to hold consecutive rows "
            "of the batch, and this mesh spreads them; use input_sharding='source'"
        )
    evaluator = evaluation.Evaluator(eval_config, lengths) if eval_config.mixture_or_task_name else None

    ckpt_lib.check_writable(config.model_dir)
    checkpoint_dir = os.path.join(config.model_dir, "checkpoints")
    checkpointer = ckpt_lib.Checkpointer(checkpoint_dir, checkpoint_config)
    log = _MetricsLog(config.model_dir, enabled=is_chief)

    module = Transformer(model_config)
    model, params, opt_state = step_lib.initialize(module, tx, partitioner, lengths, config.seed)
    start_step, restored_meta = 0, {}
    if checkpointer.all_steps():
        # The newest readable step; unreadable ones are reported and set aside.
        start_step, (params, opt_state, restored_meta) = checkpointer.read_newest(
            lambda step: _restore_state(checkpointer, step, model, params, opt_state, partitioner)
        )
        print(f"Resumed from {checkpoint_dir} at step {start_step}.")
    elif config.init_checkpoint:
        params, opt_state = _load_pretrained(
            config.init_checkpoint, model_config, model, tx, partitioner, params, opt_state, config.init_optimizer_state
        )
    # The input position saved with the checkpoint: iteration is deterministic,
    # so skipping that many batches continues exactly.
    start_batch = restored_meta.get("data", {}).get("batches_consumed", start_step)
    window = _MetricWindow(restored_meta.get("metrics_window"))
    # Files outside orbax are written by the first host alone (orbax coordinates its own writes).
    if is_chief:
        log.truncate_after(start_step)
    config_path = _save_config(config.model_dir, start_step, write=is_chief)
    vocab_record = data_lib.save_vocabulary(vocabulary, config.model_dir, write=is_chief)

    def meta(step: int) -> dict:
        return {
            "step": step,
            "model_config": dataclasses.asdict(model_config),
            "vocabulary": vocab_record,
            "data": {"mixture_or_task_name": config.mixture_or_task_name, "seed": config.seed, "batches_consumed": step},
            "metrics_window": window.state(),
        }

    if start_step >= config.num_steps:
        best_step = checkpointer.best_step()
        checkpointer.close()
        log.close()
        first, last, speed, last_eval = _summary_from_log(log.read())
        return TrainSummary(
            start_step, start_step, first, last, speed, last_eval, checkpoint_dir,
            best_step, log.tb_dir, config_path, already_complete=True, skipped_steps=window.skipped_total,
        )

    train_step = step_lib.make_train_step(model, tx, partitioner, config.loss_config(), config.num_microbatches)
    runner = inference.ModelRunner(module, partitioner) if evaluator else None
    rng = jax.random.key(config.seed + 1)
    progress = tqdm.tqdm(
        total=config.num_steps, initial=start_step, disable=not (show_progress and is_chief),
        unit="step", dynamic_ncols=True,
    )
    step_flops = flops.train_flops_per_step(model_config, config.batch_size, lengths["inputs"], lengths["targets"])
    peak_flops, _ = flops.system_peak_flops(model_config.dtype)
    window_tokens, window_start, window_steps = 0, time.perf_counter(), 0
    last_loss = None
    speeds: list[float] = []
    save_stalls: list[float] = []
    eval_metrics: dict[str, float] = {}

    step = start_step
    batches = data_lib.TrainIterator(
        config.mixture_or_task_name,
        lengths,
        config.batch_size // layout.num_shards,
        start_batch=start_batch,
        state_dir=os.path.join(config.model_dir, "input_state") if config.save_input_state else None,
        process_index=jax.process_index(),
        seed=config.seed,
        shard_index=layout.shard_index,
        num_shards=layout.num_shards,
        input_sharding=config.input_sharding,
    )

    def check_finite() -> None:
        """Fetches the window's metrics; stops the run at a non-finite step unless skipping."""
        skipped = window.sync()
        if skipped and config.on_nonfinite == "stop":
            bad_step, values = skipped[0]
            checkpointer.wait()
            raise NonFiniteLossError(
                f"step {bad_step} has loss {values['loss']} and gradient norm {values['grad_norm']} "
                f"(batch index {bad_step - 1} of {config.mixture_or_task_name!r}, seed {config.seed}); "
                f"its update was not applied. Last good checkpoint: step {checkpointer.latest_step()} in "
                f"{checkpoint_dir}. Set TrainConfig.on_nonfinite='skip' to skip such steps and go on"
            )
        for bad_step, values in skipped:
            progress.write(f"step {bad_step}: loss {values['loss']}, gradient norm {values['grad_norm']}; update skipped")

    def log_window(step: int, host_batch: Mapping[str, np.ndarray]) -> None:
        nonlocal window_tokens, window_start, window_steps, last_loss
        check_finite()
        elapsed = time.perf_counter() - window_start
        scalars = {
            **window.scalars(),
            "tokens_per_sec": window_tokens / elapsed,
            # Model FLOPs utilisation (flan_jax.flops); the first window includes compilation.
            "mfu": window_steps * step_flops / elapsed / peak_flops,
            **data_lib.fill_rates(host_batch),
        }
        if step > start_step + window_steps:  # The first window includes compilation.
            speeds.append(scalars["tokens_per_sec"])
        log.write(step, scalars)
        last_loss = scalars["loss"]
        progress.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{scalars['tokens_per_sec']:,.0f}", mfu=f"{scalars['mfu']:.1%}")
        window_tokens, window_start, window_steps = 0, time.perf_counter(), 0

    def save(step: int, metrics: Mapping[str, float] | None) -> None:
        check_finite()  # No checkpoint after an unnoticed non-finite step; the window's sums go in it.
        # Wait for the steps still in flight first: that is compute the loop
        # would wait for anyway, not a cost of saving.
        jax.block_until_ready((params, opt_state))
        start = time.perf_counter()
        checkpointer.save(step, params, opt_state, meta(step), metrics=metrics)
        batches.save(keep=checkpointer.all_steps())
        save_stalls.append(time.perf_counter() - start)

    watcher = preemption.PreemptionWatcher()
    try:
        with partitioner.activate(), watcher:
            for host_batch in batches:
                if step >= config.num_steps:
                    break
                window_tokens += data_lib.num_real_tokens(host_batch) * layout.num_shards  # hosts feeding distinct rows
                batch = partitioner.shard_batch(host_batch)
                params, opt_state, metrics = train_step(params, opt_state, batch, rng, jnp.asarray(step, jnp.int32))
                step += 1
                window_steps += 1
                window.add(step, metrics)
                progress.update(1)
                if step == 1 or step % config.log_every == 0 or step == config.num_steps:
                    log_window(step, host_batch)
                is_last = step == config.num_steps
                eval_now = evaluator is not None and (is_last or (config.eval_every and step % config.eval_every == 0))
                if eval_now:
                    progress.write(f"Evaluating at step {step} on {len(evaluator.task_names)} tasks...")
                    eval_metrics = evaluator.evaluate(runner.fns(params), step)
                    log.write(step, eval_metrics)
                    progress.write(f"  average accuracy {eval_metrics.get('eval/average_accuracy', float('nan')):.2f}")
                    window_start = time.perf_counter()
                if eval_now or is_last or step % checkpoint_config.save_every == 0:
                    save(step, eval_metrics if eval_now else None)
                if not is_last and watcher.should_stop(step):
                    if step not in checkpointer.all_steps():
                        save(step, None)
                    checkpointer.wait()  # Synchronous: the process is about to exit.
                    progress.write(f"{watcher.signal_name}: saved step {step} in {checkpoint_dir}/{step}.")
                    break
    finally:
        # A tf.data iterator still alive at interpreter exit (say, held by a
        # traceback) can hang TensorFlow's shutdown: drop it here.
        batches = None  # noqa: F841
    progress.close()
    best_step = checkpointer.best_step()
    checkpointer.close()  # Waits for the last save; raises if it failed.
    log.close()
    first_loss, logged_last, _, _ = _summary_from_log(log.read())  # The run's, across resumes.
    if step == start_step:
        raise UserError(f"the dataset of {config.mixture_or_task_name!r} yielded no batch")
    return TrainSummary(
        start_step, step, first_loss, last_loss if last_loss is not None else logged_last,
        float(np.median(speeds)) if speeds else None,
        eval_metrics, checkpoint_dir, best_step, log.tb_dir, config_path,
        preempted_by=watcher.signal_name if step < config.num_steps else None,
        skipped_steps=window.skipped_total, save_stalls=save_stalls,
    )
