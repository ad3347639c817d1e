"""Optimizer: optax's Adafactor with T5X's defaults and a constant learning rate.

Adafactor's parameter scale and update clipping are RMS over a whole array.
For the stacked parameters of a scanned layer stack that would mix layers, so
`per_parameter` applies the optimizer to each parameter on its own and, for
stacked ones, to each layer on its own (vmapped over the leading 'layers'
axis, as T5X's Adafactor does with its factor rules). A scanned model then
trains exactly like the unrolled one, and its optimizer state converts
between the two layouts like the parameters (`flan_jax.model.scan`).
"""

from __future__ import annotations

from typing import Any

import gin
import jax
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
) -> optax.GradientTransformation:
    """Adafactor as T5X configures it for finetuning (Flan used lr 1e-3, constant).

    `decay_rate` 0.8 gives the second-moment decay 1 - (step + 1)**-0.8;
    `multiply_by_parameter_scale` scales updates by each parameter's RMS, so
    the learning rate is relative. An optional linear warmup precedes the
    constant rate. The result works per parameter (`per_parameter`), so scanned and unrolled
    models train alike.
    """
    schedule: optax.Schedule = optax.constant_schedule(learning_rate)
    if warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), schedule], [warmup_steps]
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
