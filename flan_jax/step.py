"""The jit-compiled training step and the sharded initial state it starts from.

Kept apart from `flan_jax.trainer` (the loop: data, logging, checkpoints,
evaluation) so that `flan-jax bench train` and tests can build exactly the
step that training runs with nothing but jax, flax and optax installed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flan_jax import losses, partitioning, peft
from flan_jax.model import T5Config, Transformer, cudnn_attention

PyTree = Any
Batch = Mapping[str, jax.Array]
StepFn = Callable[[PyTree, PyTree, Batch, jax.Array, jax.Array], tuple[PyTree, PyTree, dict]]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the token losses are weighted and normalised (see `flan_jax.losses`)."""

    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    loss_normalizing_factor: losses.LossNormalizingFactor = losses.REAL_TOKENS


@dataclasses.dataclass
class Model:
    """The module plus the shardings of its parameters (all of them, frozen
    ones included) and of the optimizer state (of the trained ones: see
    `flan_jax.peft`)."""

    module: Transformer
    params_shardings: PyTree
    opt_state_shardings: PyTree

    @property
    def config(self) -> T5Config:
        return self.module.config


def dummy_batch(lengths: Mapping[str, int], batch_size: int = 1) -> dict[str, jnp.ndarray]:
    enc = jnp.ones((batch_size, lengths["inputs"]), jnp.int32)
    dec = jnp.ones((batch_size, lengths["targets"]), jnp.int32)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": dec}


def param_shardings(module: Transformer, partitioner: partitioning.Partitioner) -> PyTree:
    """The shardings of the module's parameters under the partitioner's rules."""
    return partitioner.params_shardings(jax.eval_shape(_init_fn(module, {"inputs": 1, "targets": 1}), jax.random.key(0)))


def abstract_state(
    module: Transformer,
    tx: optax.GradientTransformation,
    partitioner: partitioning.Partitioner,
    lengths: Mapping[str, int],
) -> tuple[Model, PyTree, PyTree]:
    """The model's shardings and the shapes of its params and optimizer state
    (ShapeDtypeStructs carrying their shardings; frozen parameters in their
    dtype); nothing is allocated, so a step can be compiled for any model size
    (see `bench train --compile_only`)."""
    config = module.config
    boxed = jax.eval_shape(_init_fn(module, lengths), jax.random.key(0))
    params_shardings = partitioner.params_shardings(boxed)
    abstract_params = nn.unbox(boxed)
    peft.check_targets(config, abstract_params)
    abstract_params = peft.cast_frozen(config, abstract_params)
    trained = peft.trainable(config, abstract_params)
    abstract_opt_state = jax.eval_shape(tx.init, trained)
    opt_state_shardings = partitioner.state_shardings(
        peft.trainable(config, params_shardings), trained, abstract_opt_state
    )

    def with_shardings(tree: PyTree, shardings: PyTree) -> PyTree:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    return (
        Model(module, params_shardings, opt_state_shardings),
        with_shardings(abstract_params, params_shardings),
        with_shardings(abstract_opt_state, opt_state_shardings),
    )


def initialize(
    module: Transformer,
    tx: optax.GradientTransformation,
    partitioner: partitioning.Partitioner,
    lengths: Mapping[str, int],
    seed: int,
) -> tuple[Model, PyTree, PyTree]:
    """Initialises params and optimizer state directly into their shardings
    (no device ever holds a full copy unless the rules replicate it)."""
    model, _, _ = abstract_state(module, tx, partitioner, lengths)
    init, config = _init_fn(module, lengths), module.config
    with partitioner.activate():
        params = jax.jit(lambda rng: peft.cast_frozen(config, nn.unbox(init(rng))), out_shardings=model.params_shardings)(
            jax.random.key(seed)
        )
        opt_state = jax.jit(tx.init, out_shardings=model.opt_state_shardings)(peft.trainable(config, params))
    return model, params, opt_state


def _init_fn(module: Transformer, lengths: Mapping[str, int]) -> Callable[[jax.Array], PyTree]:
    """rng -> the module's boxed params (nn.Partitioned, carrying logical axis names)."""

    def init_params(rng: jax.Array) -> PyTree:
        return module.init(rng, **dummy_batch(lengths), enable_dropout=False)["params"]

    return init_params


def _split_microbatches(batch: Batch, num_microbatches: int, sharding: jax.sharding.Sharding) -> Batch:
    """[B, ...] -> [n, B/n, ...], microbatch j taking rows j, j + n, j + 2n, ...

    Strided rather than contiguous, so each microbatch is spread over every
    data-parallel device (the batch is split over them in contiguous blocks).
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(split, batch)


class FallbackJit:
    """`build(module)`, a jitted function of the model. Where the module's
    attention_kernel is 'cudnn' and XLA or cuDNN rejects its fused attention
    while lowering or compiling (at any call's new shapes, or in
    `lower(...).compile()`), it is built again with 'xla', logging one line:
    the one place such a rejection is handled (trace-time ones:
    `attention.cudnn_segment_attention`)."""

    def __init__(self, build: Callable[[Transformer], Any], module: Transformer) -> None:
        self._build, self.module = build, module
        self._jitted = build(module)

    def __call__(self, *args: Any) -> Any:
        try:
            return self._jitted(*args)
        except Exception as e:  # noqa: BLE001 (anything but cuDNN's rejection is raised again)
            # A deleted (donated) argument means the step ran: not a compile-time rejection.
            ran = any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(args))
            self._fall_back(e, ran)
            return self._jitted(*args)

    def lower(self, *args: Any) -> _FallbackLowered:
        try:
            lowered = self._jitted.lower(*args)
        except Exception as e:  # noqa: BLE001 (as in __call__)
            self._fall_back(e)
            lowered = self._jitted.lower(*args)
        return _FallbackLowered(self, args, lowered)

    def _fall_back(self, error: Exception, ran: bool = False) -> None:
        """Rebuilds with 'xla' where `error` is cuDNN's rejection; raises it otherwise."""
        cudnn = self.module.config.attention_kernel == "cudnn" and not ran
        reason = cudnn_attention.cudnn_rejection(error) if cudnn else None
        if reason is None:
            raise error
        logging.getLogger(__name__).warning(f"attention_kernel='cudnn' did not compile here ({reason}); using 'xla'")
        self.module = Transformer(dataclasses.replace(self.module.config, attention_kernel="xla"))
        self._jitted = self._build(self.module)


class _FallbackLowered:
    """A `jax.stages.Lowered` whose `compile` falls back as `FallbackJit` does."""

    def __init__(self, owner: FallbackJit, args: tuple, lowered: jax.stages.Lowered) -> None:
        self._owner, self._args, self._lowered = owner, args, lowered

    def compile(self, *args: Any, **kwargs: Any) -> jax.stages.Compiled:
        try:
            return self._lowered.compile(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (as in FallbackJit.__call__)
            self._owner._fall_back(e)
            return self._owner.lower(*self._args).compile(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lowered, name)


def make_train_step(
    model: Model,
    tx: optax.GradientTransformation,
    partitioner: partitioning.Partitioner,
    loss_config: LossConfig = LossConfig(),
    num_microbatches: int = 1,
) -> FallbackJit:
    """The train step, jitted (`_jit_train_step`) behind `FallbackJit`."""

    def build(module: Transformer) -> StepFn:
        return _jit_train_step(dataclasses.replace(model, module=module), tx, partitioner, loss_config, num_microbatches)

    return FallbackJit(build, model.module)


def _jit_train_step(
    model: Model,
    tx: optax.GradientTransformation,
    partitioner: partitioning.Partitioner,
    loss_config: LossConfig,
    num_microbatches: int,
) -> StepFn:
    """A jit-compiled (params, opt_state, batch, rng, step) -> (params, opt_state, metrics).

    Only the trained parameters (`peft.split`: all of them without adapters)
    get gradients and updates; the frozen ones pass through unchanged. A step whose
    loss or gradient norm is not finite applies no update and reports `skipped` = 1.

    With `num_microbatches` > 1 the batch is split and the gradients of the
    summed token losses are accumulated in a `lax.scan`, then normalised once
    (`loss_config.loss_normalizing_factor`, counted over the whole batch): the
    same update as one large batch (dropout aside: each microbatch draws its
    own masks).
    """
    config = model.config

    def summed_loss(trained: PyTree, frozen: PyTree, batch: Batch, dropout_rng: jax.Array) -> tuple[jax.Array, dict]:
        logits = model.module.apply(
            {"params": peft.combine(trained, frozen)},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"),
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"),
            decoder_positions=batch.get("decoder_positions"),
            enable_dropout=True,
            rngs={"dropout": dropout_rng},
        )
        with jax.named_scope("loss"):  # named scopes label `bench train --profile_dir`
            _, metrics = losses.cross_entropy_loss(
                logits,
                batch["decoder_target_tokens"],
                batch["decoder_loss_weights"],
                z_loss=loss_config.z_loss,
                label_smoothing=loss_config.label_smoothing,
                loss_normalizing_factor=loss_config.loss_normalizing_factor,
                segment_ids=batch.get("decoder_segment_ids"),
            )
        return metrics["objective_sum"], metrics

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def accumulated(trained: PyTree, frozen: PyTree, batch: Batch, dropout_rng: jax.Array) -> tuple[PyTree, dict]:
        if num_microbatches == 1:
            (_, metrics), grads = grad_fn(trained, frozen, batch, dropout_rng)
            return grads, metrics
        micro = _split_microbatches(batch, num_microbatches, partitioner.sharding(jax.sharding.PartitionSpec(None, "data")))

        def body(carry, xs):
            index, microbatch = xs
            (_, metrics), grads = grad_fn(trained, frozen, microbatch, jax.random.fold_in(dropout_rng, index))
            return jax.tree.map(jnp.add, carry, (grads, metrics)), None

        first = jax.tree.map(lambda x: x[0], micro)
        metrics_shape = jax.eval_shape(summed_loss, trained, frozen, first, dropout_rng)[1]
        zero_grads = jax.lax.with_sharding_constraint(
            jax.tree.map(jnp.zeros_like, trained), peft.trainable(config, model.params_shardings)
        )
        init = (zero_grads, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
        (grads, metrics), _ = jax.lax.scan(body, init, (jnp.arange(num_microbatches), micro))
        return grads, metrics

    def train_step(params, opt_state, batch, rng, step):
        params, frozen = peft.split(config, params)
        grads, metrics = accumulated(params, frozen, batch, jax.random.fold_in(rng, step))
        # The summed objective divided once, so that its gradient is the loss's.
        loss = losses.normalize(loss_config.loss_normalizing_factor, metrics["objective_sum"],
                                metrics["normalizer_count"])
        scale = losses.normalize(loss_config.loss_normalizing_factor, jnp.ones((), jnp.float32),
                                 metrics["normalizer_count"])
        with jax.named_scope("optimizer"):
            grads = jax.tree.map(lambda g: g * scale, grads)
            grad_norm = optax.tree.norm(grads)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            # A non-finite loss or gradient leaves params and optimizer state as
            # they were (the trainer then stops or counts the skip). Not
            # optax.apply_if_finite: its state would wrap the per-parameter
            # tree that checkpoints convert between layer layouts.
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), (new_params, new_opt_state), (params, opt_state)
            )
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, skipped=1.0 - finite.astype(jnp.float32))
        return peft.combine(params, frozen), opt_state, metrics

    batch_sharding = partitioner.batch_sharding()
    replicated = partitioner.replicated()
    return jax.jit(
        train_step,
        in_shardings=(model.params_shardings, model.opt_state_shardings, batch_sharding, replicated, replicated),
        out_shardings=(model.params_shardings, model.opt_state_shardings, replicated),
        donate_argnums=(0, 1),
    )
