"""The training loop: packed batches -> jit train step on a mesh -> checkpoints and evals.

One function, `train`, configured by gin. Its state comes from
`train_state.init_or_restore` (resumed from the latest checkpoint in
`model_dir`, else pretrained or fresh), its files go to a `run_dir.RunDir`
(config.gin, metrics.jsonl, TensorBoard, checkpoints). The loop runs the
train step and, after each step, the periodic actions that `_Loop.due`
picks: log, evaluate (held-out tasks every `eval_every` steps and at the
end), save (every `CheckpointConfig.save_every` steps, after each
evaluation, at the end; the best checkpoint is kept), preempt (save and
stop on SIGTERM/SIGINT). It returns a `TrainSummary`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
import tqdm

from flan_jax import checkpoints as ckpt_lib
from flan_jax import data as data_lib
from flan_jax import evaluation
from flan_jax.suites import CompositeSuite, Suite
from flan_jax.training_eval import Evaluator
from flan_jax import flops
from flan_jax import inference
from flan_jax import optim
from flan_jax import partitioning
from flan_jax import peft
from flan_jax import preemption
from flan_jax import step as step_lib
from flan_jax import train_state
from flan_jax.train_config import TrainConfig
from flan_jax.errors import UserError
from flan_jax.formats import DataPosition, StepMeta
from flan_jax.model import T5Config, Transformer
from flan_jax.model.config import with_segment_bound
from flan_jax.run_dir import RunDir, TrainSummary

__all__ = ["TrainConfig", "TrainSummary", "NonFiniteLossError", "train"]

class NonFiniteLossError(UserError):
    """The loss or gradient norm of a step was NaN or infinite (TrainConfig.on_nonfinite='stop')."""


@gin.configurable(denylist=["config"])
def train(
    config: TrainConfig | None = None,
    *,
    model_config: T5Config | None = None,
    optimizer: optax.GradientTransformation | None = None,
    partitioner: partitioning.Partitioner | None = None,
    checkpoint_config: ckpt_lib.CheckpointConfig | None = None,
    eval_config: evaluation.EvalConfig | None = None,
    suites: Sequence[Suite | CompositeSuite] = (),
    show_progress: bool = True,
    example_filter: data_lib.ExampleFilter | None = None,
) -> TrainSummary:
    """Finetunes (or trains from scratch) a T5 on a SeqIO mixture; see module doc.

    `suites` are EvalConfig.suites resolved, and `example_filter` is
    TrainConfig.exclude_overlap_with made into the input pipeline's filter
    (the train command builds both from the task catalog, which this library
    does not import). The filter's running counts are logged at each log
    step, and its report is written into the run directory at the end.
    """
    config = config or TrainConfig()
    model_config = model_config or T5Config()
    tx = optimizer or optim.adafactor()
    partitioner = partitioner or partitioning.Partitioner()
    eval_config = eval_config or evaluation.EvalConfig()
    vocabulary = _check_inputs(config, model_config, partitioner)
    if len(suites) != len(eval_config.suites):
        raise ValueError(f"EvalConfig.suites={eval_config.suites} needs the suites themselves (train(suites=...))")
    if bool(config.exclude_overlap_with) != (example_filter is not None):
        raise ValueError(f"TrainConfig.exclude_overlap_with={config.exclude_overlap_with} needs its filter, and only "
                         "it (train(example_filter=...), tasks.overlap.OverlapExclusion)")
    evaluator = (Evaluator(eval_config, dict(config.task_feature_lengths), suites, model_config.prompt_length)
                 if eval_config.enabled else None)
    is_chief = jax.process_index() == 0
    model_config = with_segment_bound(model_config, config.task_feature_lengths)
    module = Transformer(model_config)
    with RunDir(config.model_dir, checkpoint_config or ckpt_lib.CheckpointConfig(), is_chief=is_chief,
                pipeline_metrics=example_filter.metrics if example_filter else None) as run:
        batches = _input_pipeline(config, model_config, partitioner.data_layout(), example_filter)
        pretrained = train_state.Pretrained(config.init_checkpoint, config.init_optimizer_state) if config.init_checkpoint else None
        model, state = train_state.init_or_restore(
            module, tx, partitioner, dict(config.task_feature_lengths), seed=config.seed,
            checkpointer=run.checkpointer, pretrained=pretrained,
            input_state=batches if config.save_input_state else None,
        )
        if state.meta is not None:
            print(f"Resumed from {run.checkpoint_dir} at step {state.step}.")
        run.start(state.step, state.meta.metrics_window if state.meta else None)
        vocab_record = run.save_vocabulary(vocabulary)
        if state.step >= config.num_steps:
            return run.summary(state.step, state.step, already_complete=True)
        loop = _Loop(config, model, tx, partitioner, run, evaluator, vocab_record, show_progress)
        try:
            if config.save_input_state and batches.position != state.batches_consumed:
                batches.read_state(run.legacy_input_state(state.batches_consumed), position=state.batches_consumed)
            batches.skip_to(state.batches_consumed)
            summary = loop.train(state, batches)
        finally:
            # A tf.data iterator still alive at interpreter exit (say, held by a
            # traceback) can hang TensorFlow's shutdown: drop it here.
            batches = None
        if example_filter:
            run.write_exclusion(example_filter.report())
        return summary


def _check_inputs(config: TrainConfig, model_config: T5Config, partitioner: partitioning.Partitioner) -> seqio.Vocabulary:
    """Validates names and sizes before any work is done; returns the mixture's vocabulary."""
    task = data_lib.get_mixture_or_task(config.mixture_or_task_name)
    vocabulary = data_lib.targets_vocabulary(task)
    if vocabulary.vocab_size > model_config.vocab_size:
        raise UserError(
            f"the vocabulary of {config.mixture_or_task_name!r} has {vocabulary.vocab_size} ids but "
            f"T5Config.vocab_size is {model_config.vocab_size}; bind the model's own vocabulary "
            "(get_default_vocabulary.sentencepiece_model, or `flan-jax train --vocab`)"
        )
    if config.batch_size % partitioner.data_parallel_size:
        raise UserError(
            f"TrainConfig.batch_size={config.batch_size} is not divisible by the "
            f"{partitioner.data_parallel_size} data-parallel devices"
        )
    if config.input_sharding == "global_batch" and not partitioner.data_layout().contiguous:
        raise UserError(
            "TrainConfig.input_sharding='global_batch' needs each host's devices to hold consecutive rows "
            "of the batch, and this mesh spreads them; use input_sharding='source'"
        )
    return vocabulary


@dataclasses.dataclass(frozen=True)
class _Due:
    """The periodic actions due after a step, in the order they run."""

    log: bool
    evaluate: bool
    save: bool
    preempt: bool


class _Loop:
    """The training loop (`train`) and its periodic actions, which `due` alone schedules."""

    def __init__(self, config: TrainConfig, model: step_lib.Model, tx: optax.GradientTransformation,
                 partitioner: partitioning.Partitioner, run: RunDir, evaluator: Evaluator | None,
                 vocab_record: dict, show_progress: bool) -> None:
        self.config, self.model, self.partitioner, self.run = config, model, partitioner, run
        self.evaluator, self.vocab_record, self.show_progress = evaluator, vocab_record, show_progress
        self.train_step = step_lib.make_train_step(model, tx, partitioner, config.loss_config(), config.num_microbatches)
        self.runner = inference.ModelRunner(model.module, partitioner) if evaluator else None
        self.layout = partitioner.data_layout()  # this host's rows of each global batch (all of them with one host)
        self.watcher = preemption.PreemptionWatcher()

    def train(self, state: train_state.TrainState, batches: data_lib.TrainIterator) -> TrainSummary:
        """Trains from `state` on `batches` (at its position) to TrainConfig.num_steps (or a preemption);
        returns the summary."""
        config, run, start_step = self.config, self.run, state.step
        rng = jax.random.key(config.seed + 1, impl=config.rng_impl)
        self.progress = tqdm.tqdm(
            total=config.num_steps, initial=start_step, disable=not (self.show_progress and run.is_chief),
            unit="step", dynamic_ncols=True,
        )
        lengths, model_config = config.task_feature_lengths, self.model.module.config
        step_flops = flops.train_flops_per_step(model_config, config.batch_size, lengths["inputs"], lengths["targets"])
        run.start_clock(step_flops, flops.system_peak_flops(model_config.dtype)[0])
        eval_metrics: dict[str, float] = {}
        try:
            with self.partitioner.activate(), self.watcher:
                for host_batch in batches:
                    if state.step >= config.num_steps:
                        break
                    check_segment_bound(host_batch, model_config)
                    run.throughput.add_step(data_lib.num_real_tokens(host_batch) * self.layout.num_shards)
                    step = jnp.asarray(state.step, jnp.int32)
                    params, opt_state, metrics = self.train_step(
                        state.params, state.opt_state, self.partitioner.shard_batch(host_batch), rng, step
                    )
                    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
                    run.window.add(state.step, metrics)
                    self.progress.update(1)
                    due = self.due(state.step)
                    if due.log:
                        self.log(state.step, host_batch)
                    if due.evaluate:
                        eval_metrics = self.evaluate(state)
                    if due.save:
                        self.save(state, batches, eval_metrics if due.evaluate else None)
                    if due.preempt:
                        self.preempt(state, batches)
                        break
        finally:
            # A tf.data iterator still alive at interpreter exit (say, held by a
            # traceback) can hang TensorFlow's shutdown: drop it here.
            batches = None  # noqa: F841
            self.progress.close()  # Also on an error: a bar closed at exit would redraw after its message.
        if state.step == start_step:
            raise UserError(f"the dataset of {config.mixture_or_task_name!r} yielded no batch")
        stopped = self.watcher.signal_name if state.step < config.num_steps else None
        return run.summary(start_step, state.step, preempted_by=stopped)

    def due(self, step: int) -> _Due:
        """Which periodic actions run after `step`: decided here and nowhere else."""
        config, is_last = self.config, step == self.config.num_steps
        evaluate = self.evaluator is not None and (is_last or bool(config.eval_every and step % config.eval_every == 0))
        return _Due(
            log=step == 1 or step % config.log_every == 0 or is_last,
            evaluate=evaluate,
            save=evaluate or is_last or step % self.run.checkpoint_config.save_every == 0,
            preempt=not is_last and self.watcher.should_stop(step),
        )

    def log(self, step: int, host_batch: Mapping[str, np.ndarray]) -> None:
        self._check_finite()
        scalars = self.run.log_train(step, host_batch)
        self.progress.set_postfix(
            loss=f"{scalars['loss']:.3f}", tok_s=f"{scalars['tokens_per_sec']:,.0f}", mfu=f"{scalars['mfu']:.1%}"
        )

    def evaluate(self, state: train_state.TrainState) -> dict[str, float]:
        self.progress.write(f"Evaluating at step {state.step} on {len(self.evaluator.task_names)} tasks...")
        metrics = self.evaluator.evaluate(self.runner.fns(state.params), state.step)
        self.run.log_eval(state.step, metrics)
        self.progress.write("  " + ", ".join(f"{label} {metrics[key]:.2f}" for key, label in (
            ("eval/average_accuracy", "average accuracy"), ("eval/normalized_average", "normalized average"))
            if key in metrics))
        return metrics

    def save(self, state: train_state.TrainState, batches: data_lib.TrainIterator, metrics: Mapping[str, float] | None) -> None:
        self._check_finite()  # No checkpoint after an unnoticed non-finite step; the window's sums go in it.
        # Wait for the steps still in flight first: that is compute the loop
        # would wait for anyway, not a cost of saving.
        jax.block_until_ready((state.params, state.opt_state))
        start = time.perf_counter()
        config, checkpointer = self.config, self.run.checkpointer
        meta = StepMeta(
            state.step, self.model.config, self.vocab_record,
            DataPosition(config.mixture_or_task_name, config.seed, state.step), self.run.window.state(), state.base,
        )
        # With adapters only they are saved; the frozen base is `state.base`.
        trained = peft.trainable(self.model.config, state.params)
        checkpointer.save(state.step, trained, state.opt_state, meta.to_dict(), metrics=metrics,
                          input_state=batches if config.save_input_state else None)
        self.run.save_stalls.append(time.perf_counter() - start)

    def preempt(self, state: train_state.TrainState, batches: data_lib.TrainIterator) -> None:
        """Saves the step (unless just saved) and waits for it: the process is about to exit."""
        if state.step not in self.run.checkpointer.all_steps():
            self.save(state, batches, None)
        self.run.checkpointer.wait()
        self.progress.write(f"{self.watcher.signal_name}: saved step {state.step} in {self.run.checkpoint_dir}/{state.step}.")

    def _check_finite(self) -> None:
        """Fetches the window's metrics; stops the run at a non-finite step unless skipping."""
        skipped = self.run.window.sync()
        config = self.config
        if skipped and config.on_nonfinite == "stop":
            bad_step, values = skipped[0]
            self.run.checkpointer.wait()
            # The bar stays at the last good step, not at the steps dispatched past it; closed
            # now, it does not redraw after the error.
            self.progress.n = bad_step - 1
            self.progress.close()
            last = self.run.checkpointer.latest_step()
            saved = (f"Last good checkpoint: step {last} in {self.run.checkpoint_dir}" if last is not None
                     else f"No checkpoint was saved yet in {self.run.checkpoint_dir}")
            raise NonFiniteLossError(
                f"step {bad_step} has loss {values['loss']} and gradient norm {values['grad_norm']} "
                f"(batch index {bad_step - 1} of {config.mixture_or_task_name!r}, seed {config.seed}); "
                f"its update was not applied. {saved}. Set TrainConfig.on_nonfinite='skip' to skip such "
                "steps and go on"
            )
        for bad_step, values in skipped:
            self.progress.write(f"step {bad_step}: loss {values['loss']}, gradient norm {values['grad_norm']}; update skipped")


def check_segment_bound(host_batch: Mapping[str, np.ndarray], model_config: T5Config) -> None:
    """Stops before a step whose packed rows hold more examples than the cuDNN
    route's slots (T5Config.max_segments_per_row): it would give NaN."""
    bound = model_config.max_segments_per_row
    if model_config.attention_kernel != "cudnn" or not bound:
        return
    # seqio's segment ids count a row's examples: 1, 2, ...
    most = max((int(np.max(host_batch[k], initial=0)) for k in ("encoder_segment_ids", "decoder_segment_ids")
                if k in host_batch), default=0)
    if most > bound:
        raise UserError(
            f"a packed row holds {most} examples, more than T5Config.max_segments_per_row={bound} "
            "(attention_kernel='cudnn'); raise it"
        )


def _input_pipeline(config: TrainConfig, model_config: T5Config, layout: partitioning.DataLayout,
                    example_filter: data_lib.ExampleFilter | None) -> data_lib.TrainIterator:
    """This host's rows of the global batches, from the first (iteration is deterministic); built at first use."""
    return data_lib.TrainIterator(
        config.mixture_or_task_name,
        dict(config.task_feature_lengths),
        config.batch_size // layout.num_shards,
        example_filter=example_filter,
        seed=config.seed,
        shard_index=layout.shard_index,
        num_shards=layout.num_shards,
        input_sharding=config.input_sharding,
        prompt_length=model_config.prompt_length,
    )
