"""Optimizer: optax's Adafactor with T5X's defaults and a constant learning rate.

Adafactor's parameter scale and update clipping are RMS over a whole array.
For the stacked parameters of a scanned layer stack that would mix layers, so
`per_parameter` applies the optimizer to each parameter on its own and, for
stacked ones, to each layer on its own (vmapped over the leading 'layers'
axis, as T5X's Adafactor does with its factor rules). A scanned model then
trains exactly like the unrolled one, and its optimizer state converts
between the two layouts like the parameters (`flan_jax.model.scan`).

`fused_adafactor` computes the same updates without vmap, treating the
layer axis of stacked parameters as a batch axis in the factored moments and
in the RMS statistics (as T5X's factor rules do), in one function XLA can
fuse; its state is `per_parameter`'s, so checkpoints, shardings and layout
conversions are shared. `adafactor(fused_stacked=True)` selects it.

`with_t5x_statistics` puts a T5X checkpoint's Adafactor second moments and
step into that state, so finetuning from T5X continues them as T5X does;
`restart_schedule` lets a finetune continue a flan-jax run's state likewise.
"""

from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


def is_stacked(path: tuple) -> bool:
    """Whether a parameter path lies in a scanned stack (`.../layers/...`)."""
    return any(getattr(key, "key", None) == "layers" for key in path)


def per_parameter(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs `inner` on every parameter separately, and per layer on stacked ones.

    The state is a tree shaped like the parameters whose leaves are `inner`'s
    state for that parameter (with a leading 'layers' axis for stacked ones).
    Only optimizers that treat parameters independently (Adafactor, Adam, SGD;
    not global-norm clipping) give the same result as `inner` on the whole tree.
    """

    def init(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(
            lambda path, p: (jax.vmap(inner.init) if is_stacked(path) else inner.init)(p), params
        )

    def update(updates: PyTree, state: PyTree, params: PyTree | None = None) -> tuple[PyTree, PyTree]:
        if params is None:
            raise ValueError("per_parameter needs params (Adafactor scales updates by them)")
        paths_and_grads, treedef = jax.tree_util.tree_flatten_with_path(updates)
        states = treedef.flatten_up_to(state)
        leaves = treedef.flatten_up_to(params)
        new_updates, new_states = [], []
        for (path, grad), st, param in zip(paths_and_grads, states, leaves):
            fn = jax.vmap(inner.update) if is_stacked(path) else inner.update
            u, s = fn(grad, st, param)
            new_updates.append(u)
            new_states.append(s)
        return treedef.unflatten(new_updates), treedef.unflatten(new_states)

    return optax.GradientTransformation(init, update)


def _factored_axes(shape: tuple[int, ...], factored: bool, min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """(row-reduced axis d1, column-reduced axis d0): the two largest axes, as
    optax's Adafactor picks them (the same argsort, so ties break alike)."""
    if not factored or len(shape) < 2:
        return None
    order = np.argsort(shape)
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


def _per_layer(x: jax.Array, ndim: int, stacked: bool) -> jax.Array:
    """A per-layer value [L] (stacked) shaped to broadcast against an ndim array."""
    return jnp.reshape(x, x.shape + (1,) * (ndim - 1)) if stacked else x


def _block_rms(x: jax.Array, stacked: bool) -> jax.Array:
    """RMS over the whole array, or per layer (keepdims) for stacked ones."""
    axes = tuple(range(1 if stacked else 0, x.ndim))
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def fused_adafactor(
    learning_rate: optax.Schedule,
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    min_dim_size_to_factor: int = 128,
    factored: bool = True,
    epsilon: float = 1e-30,
) -> optax.GradientTransformation:
    """`per_parameter(optax.adafactor(...))` (no momentum or weight decay) computed
    without vmap: for stacked parameters the leading 'layers' axis is a batch axis
    of the factored moments, the update clipping and the parameter scale.

    The state is `per_parameter`'s (stacked leaves carry per-layer counts), so the
    two are interchangeable mid-run.
    """
    inner = optax.adafactor(
        learning_rate=learning_rate, decay_rate=decay_rate, clipping_threshold=clipping_threshold,
        multiply_by_parameter_scale=multiply_by_parameter_scale, min_dim_size_to_factor=min_dim_size_to_factor,
        factored=factored, eps=epsilon,
    )

    def leaf_update(grad: jax.Array, chain: tuple, param: jax.Array, stacked: bool) -> tuple[jax.Array, tuple]:
        b = 1 if stacked else 0
        moments = next(s for s in chain if isinstance(s, optax.FactoredState))
        t = moments.count.astype(jnp.float32) + 1.0
        decay = 1.0 - t**-decay_rate  # optax's power decay, per layer when stacked
        grad_sqr = jnp.square(grad) + epsilon
        axes = _factored_axes(grad.shape[b:], factored, min_dim_size_to_factor)
        new = {}
        if axes is not None:
            d1, d0 = axes[0] + b, axes[1] + b
            mix = lambda old, fresh: (  # noqa: E731
                _per_layer(decay, old.ndim, stacked) * old + (1.0 - _per_layer(decay, old.ndim, stacked)) * fresh
            )
            new["v_row"] = mix(moments.v_row, jnp.mean(grad_sqr, axis=d0)).astype(param.dtype)
            new["v_col"] = mix(moments.v_col, jnp.mean(grad_sqr, axis=d1)).astype(param.dtype)
            row_mean = jnp.mean(new["v_row"], axis=d1 - 1 if d1 > d0 else d1, keepdims=True)
            row_factor, col_factor = (new["v_row"] / row_mean) ** -0.5, new["v_col"] ** -0.5
            update = grad * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
        else:
            d = _per_layer(decay, grad.ndim, stacked)
            new["v"] = (d * moments.v + (1.0 - d) * grad_sqr).astype(param.dtype)
            update = grad * new["v"] ** -0.5
        if clipping_threshold is not None:
            update = update / jnp.maximum(1.0, _block_rms(update, stacked) / clipping_threshold)
        new_chain = []
        for s in chain:
            if isinstance(s, optax.FactoredState):
                s = s._replace(count=optax.safe_increment(s.count), **new)
            elif isinstance(s, optax.ScaleByScheduleState):
                rate = jnp.asarray(learning_rate(s.count), update.dtype)  # constant schedules give a float
                update = update * _per_layer(rate, update.ndim, stacked)
                s = s._replace(count=optax.safe_increment(s.count))
            new_chain.append(s)
        if multiply_by_parameter_scale:
            update = update * jnp.maximum(_block_rms(param, stacked), 1e-3)
        return -update, tuple(new_chain)

    def update(updates: PyTree, state: PyTree, params: PyTree | None = None) -> tuple[PyTree, PyTree]:
        if params is None:
            raise ValueError("fused_adafactor needs params (Adafactor scales updates by them)")
        paths_and_grads, treedef = jax.tree_util.tree_flatten_with_path(updates)
        results = [
            leaf_update(grad, chain, param, is_stacked(path))
            for (path, grad), chain, param in zip(
                paths_and_grads, treedef.flatten_up_to(state), treedef.flatten_up_to(params)
            )
        ]
        return treedef.unflatten([u for u, _ in results]), treedef.unflatten([s for _, s in results])

    return optax.GradientTransformation(per_parameter(inner).init, update)


@gin.configurable
def adafactor(
    learning_rate: float = 1e-3,
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    min_dim_size_to_factor: int = 128,
    momentum: float | None = None,
    weight_decay_rate: float | None = None,
    factored: bool = True,
    warmup_steps: int = 0,
    fused_stacked: bool = False,
) -> optax.GradientTransformation:
    """Adafactor as T5X configures it for finetuning (Flan used lr 1e-3, constant).

    `decay_rate` 0.8 gives the second-moment decay 1 - (step + 1)**-0.8;
    `multiply_by_parameter_scale` scales updates by each parameter's RMS, so
    the learning rate is relative. An optional linear warmup precedes the
    constant rate. The result works per parameter (`per_parameter`), so scanned and unrolled
    models train alike. `fused_stacked` computes the same without vmapping
    over stacked layers (`fused_adafactor`; no momentum or weight decay).
    """
    schedule: optax.Schedule = optax.constant_schedule(learning_rate)
    if warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), schedule], [warmup_steps]
        )
    if fused_stacked:
        if momentum is not None or weight_decay_rate is not None:
            raise ValueError("adafactor.fused_stacked supports neither momentum nor weight_decay_rate")
        return fused_adafactor(
            schedule, decay_rate=decay_rate, clipping_threshold=clipping_threshold,
            multiply_by_parameter_scale=multiply_by_parameter_scale, min_dim_size_to_factor=min_dim_size_to_factor,
            factored=factored,
        )
    return per_parameter(optax.adafactor(
        learning_rate=schedule,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold,
        momentum=momentum,
        weight_decay_rate=weight_decay_rate,
        factored=factored,
    ))


def with_t5x_statistics(state: PyTree, param_states: PyTree, step: int) -> PyTree:
    """`state` (`per_parameter` Adafactor state, layers unrolled, numpy or jax leaves) with T5X's
    second moments and step.

    param_states: T5X's `state/param_states`, shaped like the params with
    {'v_row', 'v_col', 'v'} at each leaf. Both optimizers factor a matrix
    the same way (the smaller of its two largest dimensions is the row; on a
    tie the first), keep size-1 placeholders for what they do not use, and
    decay the moments by 1 - (step + 1)**-0.8: with `count` set to T5X's step,
    the next update is the one T5X would make. The learning-rate schedule's
    own count is left at 0 (a warmup, if any, starts with the finetune).
    Momentum (`m`) is not carried over. A ValueError names the first
    parameter whose statistics are missing or shaped differently (for example
    another `min_dim_size_to_factor`).
    """
    params_state, treedef = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, tuple) and not hasattr(x, "_fields"))

    def t5x_entry(path: tuple) -> dict:
        node = param_states
        for key in path:
            name = getattr(key, "key", None)
            if not isinstance(node, dict) or name not in node:
                raise ValueError(f"{_name(path)}: no Adafactor statistics for this parameter in the T5X checkpoint")
            node = node[name]
        if not isinstance(node, dict) or not {"v_row", "v_col", "v"} <= set(node):
            raise ValueError(f"{_name(path)}: the T5X checkpoint's Adafactor state has no v_row/v_col/v here")
        return node

    def fill(path: tuple, chain_state: tuple) -> tuple:
        entry = t5x_entry(path)
        found = False

        def replace(s: Any) -> Any:
            nonlocal found
            if not isinstance(s, optax.FactoredState):
                return s
            found = True
            fields = {}
            for field in ("v_row", "v_col", "v"):
                ours, theirs = getattr(s, field), np.asarray(entry[field], np.float32)
                if np.shape(ours) != theirs.shape:
                    raise ValueError(
                        f"{_name(path)}: T5X's Adafactor {field} is {theirs.shape}, this optimizer's is "
                        f"{np.shape(ours)} (is it factored alike? adafactor.min_dim_size_to_factor, .factored)"
                    )
                fields[field] = theirs
            return s._replace(count=np.asarray(step, np.asarray(s.count).dtype), **fields)

        new = tuple(replace(s) for s in chain_state)
        if not found:
            raise ValueError(f"{_name(path)}: the optimizer keeps no Adafactor second moments to put T5X's into")
        return new

    return jax.tree_util.tree_unflatten(treedef, [fill(path, s) for path, s in params_state])


def restart_schedule(state: PyTree) -> PyTree:
    """`state` with each learning-rate schedule's count at 0 (a warmup starts again); the
    second moments and their decay's count are kept."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda s: s._replace(count=s.count * 0) if is_schedule(s) else s, state, is_leaf=is_schedule)


def _name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")
