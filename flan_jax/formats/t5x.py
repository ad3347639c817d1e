"""Reads T5X checkpoints in both layouts into flan-jax's parameter tree.

- legacy (the published Flan-T5 / T5 v1.1 checkpoints): `checkpoint_<step>/`
  with a msgpack file `checkpoint` holding `{"version", "optimizer": {"target":
  params, "state": {"step", "param_states"}}}` in which each large array is a
  tensorstore spec pointing at a zarr directory beside it;
- orbax (what T5X writes today): a CheckpointManager step directory whose
  `state/` item is a PyTree with the same `target` and `state`.

T5X's parameter names are ours, so `target` is the params tree as it is.
Arrays are read straight into their shardings: with a sharded mesh each
device reads only its own slice.
"""

from __future__ import annotations

import os
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from flan_jax.errors import UserError

PyTree = Any


def detect_layout(path: str) -> str | None:
    """'t5x_legacy', 't5x_orbax' or None."""
    if os.path.isfile(os.path.join(path, "checkpoint")):
        return "t5x_legacy"
    if os.path.isdir(os.path.join(path, "state")) and os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")):
        with open(os.path.join(path, "_CHECKPOINT_METADATA")) as f:
            if "t5x" in f.read():
                return "t5x_orbax"
    return None


def _is_tensorstore_spec(node: Any) -> bool:
    return isinstance(node, dict) and "driver" in node and "kvstore" in node


def _open_spec(spec: dict, directory: str) -> ts.TensorStore:
    kvstore = dict(spec["kvstore"])
    if kvstore.get("driver") == "file" and not os.path.isabs(kvstore["path"]):
        # tensorstore refuses paths with '..' components: normalise first.
        kvstore["path"] = os.path.join(os.path.abspath(directory), kvstore["path"])
    try:
        return ts.open(dict(spec, kvstore=kvstore), read=True).result()
    except Exception as e:  # tensorstore raises ValueError/RuntimeError variants
        raise UserError(f"{directory}: cannot read array {kvstore['path']}: {e}") from None


def _read(node: Any, directory: str, sharding: jax.sharding.Sharding | None) -> Any:
    if _is_tensorstore_spec(node):
        store = _open_spec(node, directory)
        if sharding is None:
            return np.asarray(store.read().result())
        return jax.make_array_from_callback(tuple(store.shape), sharding, lambda idx: np.asarray(store[idx].read().result()))
    value = np.asarray(node)
    return value if sharding is None else jax.device_put(value, sharding)


def _read_tree(tree: PyTree, directory: str, shardings: PyTree | None, where: str) -> PyTree:
    """Reads a (sub)tree of specs and inline arrays; with shardings, only the keys they name."""
    if _is_tensorstore_spec(tree) or not isinstance(tree, dict):
        return _read(tree, directory, shardings)
    if shardings is not None:
        missing = set(shardings) - set(tree)
        if missing:
            raise UserError(f"T5X checkpoint {directory} lacks {sorted(f'{where}/{k}' for k in missing)}")
    return {
        key: _read_tree(sub, directory, None if shardings is None else shardings[key], f"{where}/{key}")
        for key, sub in tree.items()
        if shardings is None or key in shardings
    }


def load_legacy(directory: str, shardings: PyTree | None = None) -> tuple[PyTree, dict]:
    """(params, {"step", "param_states"}) of a legacy msgpack+tensorstore checkpoint."""
    path = os.path.join(directory, "checkpoint")
    try:
        with open(path, "rb") as f:
            state = flax.serialization.msgpack_restore(f.read())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable T5X msgpack checkpoint: {e}") from None
    if "optimizer" not in state or "target" not in state["optimizer"]:
        raise UserError(f"{path}: no optimizer/target in this T5X checkpoint (keys: {sorted(state)})")
    params = _read_tree(state["optimizer"]["target"], directory, shardings, "target")
    opt = state["optimizer"].get("state", {})
    return params, {"step": int(np.asarray(opt.get("step", 0))), "param_states": opt.get("param_states")}


def load_orbax(directory: str, shardings: PyTree | None = None) -> tuple[PyTree, dict]:
    """(params, {"step"}) of an orbax-layout T5X checkpoint, restored onto `shardings`."""
    item_dir = os.path.join(directory, "state")
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(item_dir).item_metadata.tree
    if "target" not in metadata:
        raise UserError(f"{item_dir}: no `target` in this T5X checkpoint (keys: {sorted(metadata)})")
    target_meta = metadata["target"]
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target_meta)
    item = {"target": jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), target_meta, shardings)}
    if "step" in metadata.get("state", {}):
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        item["state"] = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=one_device)}
    restored = checkpointer.restore(
        item_dir,
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )
    step = int(restored["state"]["step"]) if "state" in restored else 0
    return restored["target"], {"step": step}
