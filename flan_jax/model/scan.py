"""Converts parameter trees between the unrolled and the scanned layer layouts.

Unrolled (`T5Config.scan_layers=False`, and every HF / T5X checkpoint):
`encoder/layers_0/...`, `encoder/layers_1/...`. Scanned: `encoder/layers/...`
with every leaf stacked along a new leading axis of length num_layers.

The functions work on any tree whose top levels follow the parameter tree,
whatever lies below each parameter (e.g. flan-jax's per-parameter Adafactor
state, see `flan_jax.optim`), so one conversion serves parameters, optimizer
state, shardings and abstract shapes. Inside `jax.jit` (or `eval_shape`) they
stay on device; `stack_layers` on numpy leaves stays in numpy.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
STACKS = ("encoder", "decoder")
_LAYER_KEY = re.compile(r"layers_(\d+)$")


def is_scanned(tree: PyTree) -> bool:
    """Whether the tree's stacks hold a stacked `layers` subtree."""
    return any(isinstance(tree.get(s), dict) and "layers" in tree[s] for s in STACKS)


def _stack(*xs: Any) -> Any:
    if all(isinstance(x, np.ndarray | np.generic) for x in xs):
        return np.stack(xs)
    return jnp.stack(xs)


def stack_layers(tree: PyTree) -> PyTree:
    """Unrolled -> scanned: `layers_0 ... layers_{n-1}` become one `layers` subtree."""
    out = dict(tree)
    for stack in STACKS:
        if stack not in tree:
            continue
        sub = dict(tree[stack])
        indices = sorted(int(m.group(1)) for k in sub if (m := _LAYER_KEY.match(k)))
        if not indices:
            continue
        if indices != list(range(len(indices))):
            raise ValueError(f"{stack}: layer indices {indices} are not 0..{len(indices) - 1}")
        layers = [sub.pop(f"layers_{i}") for i in indices]
        sub["layers"] = jax.tree.map(_stack, *layers)
        out[stack] = sub
    return out


def unstack_layers(tree: PyTree) -> PyTree:
    """Scanned -> unrolled: the `layers` subtree is split along its leading axis."""
    out = dict(tree)
    for stack in STACKS:
        if stack not in tree or "layers" not in tree[stack]:
            continue
        sub = dict(tree[stack])
        layers = sub.pop("layers")
        num_layers = jax.tree.leaves(layers)[0].shape[0]
        for i in range(num_layers):
            sub[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], layers)
        out[stack] = sub
    return out


def to_layout(tree: PyTree, scanned: bool) -> PyTree:
    """The tree in the scanned or unrolled layout, converting only if needed."""
    if is_scanned(tree) == scanned:
        return tree
    return stack_layers(tree) if scanned else unstack_layers(tree)


def unstacked_shardings(shardings: PyTree, num_layers: dict[str, int]) -> PyTree:
    """Shardings of the unrolled tree from those of the scanned one: each layer
    gets its stacked parameter's sharding without the leading 'layers' axis.
    `num_layers` maps "encoder" and "decoder" to their depths."""

    def drop_layer_axis(s: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*tuple(s.spec)[1:]))

    out = dict(shardings)
    for stack in STACKS:
        if stack in shardings and "layers" in shardings[stack]:
            sub = dict(shardings[stack])
            layer = jax.tree.map(drop_layer_axis, sub.pop("layers"))
            sub.update({f"layers_{i}": layer for i in range(num_layers[stack])})
            out[stack] = sub
    return out
