"""`TrainConfig`: what a run trains on, for how long and how its loss is made.

Apart from the loop (`flan_jax.trainer`) so that commands without the data
stack (`bench train`, which never imports TensorFlow or SeqIO) can read a run
file's settings (batch size, lengths, microbatches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import gin

from flan_jax import errors, losses
from flan_jax import step as step_lib
from flan_jax.errors import UserError

# How the hosts of a multi-host run share out the global batch (flan_jax/data.py).
INPUT_SHARDINGS = ("source", "global_batch")
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")  # jax.random's PRNG implementations, by name


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
    # T5X's choices (flan_jax/losses.py): a number, 'NUM_REAL_TARGET_TOKENS',
    # 'NUM_TOTAL_TARGET_TOKENS', 'AVERAGE_PER_SEQUENCE', or None (the summed loss).
    loss_normalizing_factor: losses.LossNormalizingFactor = losses.REAL_TOKENS
    # Pretrained weights to start from (HF directory, T5X checkpoint or flan-jax
    # run); ignored once model_dir holds a checkpoint of its own.
    init_checkpoint: str | None = None
    # Continue init_checkpoint's optimizer state where it has one, as T5X's
    # finetuning does (it restores the whole train state): a T5X checkpoint's
    # Adafactor second moments and step, a flan-jax run's optimizer state. The
    # learning-rate schedule and the step count start at 0. False starts the
    # optimizer afresh, as checkpoints without its state (HF, converted) do.
    init_optimizer_state: bool = True
    # Also save the input pipeline's state in each checkpoint step, so a resume
    # restores it in seconds instead of re-reading the consumed batches. Costs
    # tens of MB and seconds per save (see data.TrainIterator, input_checkpoint).
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
    # The PRNG behind dropout (T5X's use_hardware_rng): "threefry2x32" (JAX's
    # default, the same bits on every backend), "rbg" or "unsafe_rbg" (the
    # accelerator's random-bit generator: faster, backend-specific bits).
    # Each is deterministic for a seed, so a resumed run repeats its masks.
    rng_impl: str = "threefry2x32"
    # Suites (e.g. ("gsm8k_cot",)) whose evaluation questions training must not see: training examples sharing
    # a 13-word n-gram with one are dropped in the input pipeline and counted: the train command makes them
    # the pipeline's `data.ExampleFilter` (tasks/overlap.py OverlapExclusion), which `trainer.train` requires.
    exclude_overlap_with: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        errors.require_fields(
            self, model_dir=errors.PATH, mixture_or_task_name=errors.NAME, num_steps=errors.POSITIVE_INT,
            task_feature_lengths=errors.FEATURE_LENGTHS, batch_size=errors.POSITIVE_INT, seed=errors.NON_NEGATIVE_INT,
            log_every=errors.POSITIVE_INT, eval_every=errors.NON_NEGATIVE_INT, z_loss=errors.NON_NEGATIVE_NUMBER,
            label_smoothing=errors.FRACTION, loss_normalizing_factor=losses.NORMALIZING_FACTOR,
            init_checkpoint=errors.optional(errors.PATH), init_optimizer_state=errors.BOOL, save_input_state=errors.BOOL,
            num_microbatches=errors.POSITIVE_INT, input_sharding=errors.one_of(*INPUT_SHARDINGS),
            on_nonfinite=errors.one_of("stop", "skip"), rng_impl=errors.one_of(*RNG_IMPLS),
        )
        if self.batch_size % self.num_microbatches:
            raise UserError(
                f"TrainConfig.num_microbatches={self.num_microbatches} does not divide "
                f"TrainConfig.batch_size={self.batch_size}"
            )

    def loss_config(self) -> step_lib.LossConfig:
        return step_lib.LossConfig(self.z_loss, self.label_smoothing, self.loss_normalizing_factor)
