"""Reads T5X checkpoints in both layouts into flan-jax's parameter tree.

- legacy (the published Flan-T5 / T5 v1.1 checkpoints): `checkpoint_<step>/`
  with a msgpack file `checkpoint` holding `{"version", "optimizer": {"target":
  params, "state": {"step", "param_states"}}}` in which each large array is a
  tensorstore spec pointing at a zarr directory beside it;
- orbax (what T5X writes today): a CheckpointManager step directory whose
  `state/` item is a PyTree with the same `target` and `state`.

T5X's parameter names are ours, so `target` is the params tree as it is.
Reading is two steps: `open_checkpoint` reads the metadata (each array's
shape, the step), so shapes can be checked against a model before any array
is read; `T5XCheckpoint.read` then reads the arrays straight into their
shardings: with a sharded mesh each device reads only its own slice.
Anything unreadable or corrupt is a UserError naming the file or array.

`read_adafactor_state` reads T5X's Adafactor second moments from
`state/param_states` (`v_row`, `v_col`, `v` per parameter), so a finetune
can continue them as T5X's own finetuning does (see `flan_jax.optim`).
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from flan_jax import checkpoints as ckpt_lib
from flan_jax.errors import UserError

PyTree = Any


def detect_layout(path: str) -> str | None:
    """'t5x_legacy', 't5x_orbax' or None."""
    if os.path.isfile(os.path.join(path, "checkpoint")):
        return "t5x_legacy"
    if os.path.isdir(os.path.join(path, "state")) and os.path.isfile(os.path.join(path, "_CHECKPOINT_METADATA")):
        with open(os.path.join(path, "_CHECKPOINT_METADATA"), "rb") as f:  # bytes: a damaged file may not be UTF-8
            if b"t5x" in f.read():
                return "t5x_orbax"
    return None


def _reason(error: BaseException) -> str:
    """The first line of an error, without the tensorstore spec it appends (often kilobytes)."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=", 1)[0] if lines else type(error).__name__
    return text if len(text) <= 400 else text[:400] + "..."


class T5XCheckpoint(abc.ABC):
    """An opened T5X checkpoint: its parameters' shapes, the arrays not yet read."""

    directory: str
    shapes: PyTree  # jax.ShapeDtypeStruct per parameter, T5X names, layers unrolled

    @abc.abstractmethod
    def read(self, shardings: PyTree | None = None) -> tuple[PyTree, int]:
        """(params, step): the params as numpy arrays, or onto `shardings` (a tree like `shapes`)."""

    @abc.abstractmethod
    def read_adafactor_state(self) -> tuple[PyTree, int] | None:
        """(param_states, step) as numpy arrays, or None if the checkpoint holds no optimizer state.

        param_states is shaped like the params, with {'v_row', 'v_col', 'v'} (the second
        moments) at each leaf; momentum (`m`, parameter-sized where used) is not read. The
        arrays are small (factored statistics) except `v` of unfactored parameters.
        """


def open_checkpoint(directory: str, layout: str) -> T5XCheckpoint:
    """Opens a checkpoint of `layout` ('t5x_legacy' or 't5x_orbax', see detect_layout)."""
    return LegacyCheckpoint(directory) if layout == "t5x_legacy" else OrbaxCheckpoint(directory)


# --- legacy: msgpack + one tensorstore (zarr) per array ------------------------


class LegacyCheckpoint(T5XCheckpoint):
    def __init__(self, directory: str) -> None:
        self.directory = directory
        path = os.path.join(directory, "checkpoint")
        try:
            with open(path, "rb") as f:
                state = flax.serialization.msgpack_restore(f.read())
        # msgpack's errors are ValueErrors; flax's array decoding adds TypeError and KeyError.
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise UserError(f"{path}: not a readable T5X msgpack checkpoint: {type(e).__name__}: {e}") from e
        optimizer = state.get("optimizer") if isinstance(state, dict) else None
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("target"), dict):
            keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise UserError(f"{path}: no optimizer/target in this T5X checkpoint (found {keys})")
        opt_state = optimizer.get("state", {})
        try:
            self._step = int(np.asarray(opt_state.get("step", 0) if isinstance(opt_state, dict) else None))
        except (TypeError, ValueError, OverflowError) as e:
            raise UserError(f"{path}: optimizer/state/step is not an integer: {e}") from e
        self._arrays = self._open_tree(optimizer["target"], "target")
        self.shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, _numpy_dtype(a)), self._arrays)
        self._param_states = opt_state.get("param_states") if isinstance(opt_state, dict) else None

    def _open_tree(self, node: Any, where: str) -> PyTree:
        """The tree with each spec opened (metadata only) and each inline value as a numpy array."""
        if _is_tensorstore_spec(node):
            return self._open_spec(node, where)
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                raise UserError(f"{self.directory}/checkpoint: {where} has keys that are not names: {list(node)[:5]}")
            return {key: self._open_tree(sub, f"{where}/{key}") for key, sub in node.items()}
        try:
            array = np.asarray(node)
        except ValueError as e:  # e.g. ragged nested lists
            raise UserError(f"{self.directory}/checkpoint: {where} is not an array: {e}") from e
        if array.dtype.kind not in "biufc":
            raise UserError(f"{self.directory}/checkpoint: {where} is not a numeric array but {type(node).__name__}")
        return array

    def _open_spec(self, spec: dict, where: str) -> ts.TensorStore:
        kvstore = spec["kvstore"]
        if not isinstance(kvstore, dict) or not isinstance(kvstore.get("path"), str):
            raise UserError(f"{self.directory}/checkpoint: {where} has a tensorstore spec without a kvstore path")
        if kvstore.get("driver") == "file" and not os.path.isabs(kvstore["path"]):
            # tensorstore refuses paths with '..' components: normalise first.
            kvstore = dict(kvstore, path=os.path.join(os.path.abspath(self.directory), kvstore["path"]))
        try:
            return ts.open(dict(spec, kvstore=kvstore), read=True).result()
        except (ValueError, TypeError) as e:  # tensorstore's errors (bad spec, missing or corrupt .zarray)
            raise UserError(f"{self.directory}: cannot open array {where} ({kvstore['path']}): {_reason(e)}") from e

    def read(self, shardings: PyTree | None = None) -> tuple[PyTree, int]:
        if shardings is None:
            return jax.tree_util.tree_map_with_path(lambda path, a: self._read(path, a, None), self._arrays), self._step
        return jax.tree_util.tree_map_with_path(self._read, self._arrays, shardings), self._step

    def read_adafactor_state(self) -> tuple[PyTree, int] | None:
        if not isinstance(self._param_states, dict):
            return None
        arrays = self._open_tree(_second_moments(self._param_states), "state/param_states")
        return jax.tree_util.tree_map_with_path(lambda path, a: self._read(path, a, None, "state/param_states"), arrays), self._step

    def _read(self, path: Any, array: Any, sharding: jax.sharding.Sharding | None, root: str = "target") -> Any:
        try:
            if not isinstance(array, ts.TensorStore):
                return array if sharding is None else jax.device_put(array, sharding)
            if sharding is None:
                return np.asarray(array.read().result())
            return jax.make_array_from_callback(array.shape, sharding, lambda idx: np.asarray(array[idx].read().result()))
        except ValueError as e:  # tensorstore: a truncated or corrupt chunk
            where = f"{root}/" + jax.tree_util.keystr(path, simple=True, separator="/")
            raise UserError(f"{self.directory}: cannot read array {where}: {_reason(e)}") from e


def _second_moments(param_states: Any) -> Any:
    """T5X's param_states without the momentum entries (`m`)."""
    if not isinstance(param_states, Mapping) or _is_tensorstore_spec(param_states):
        return param_states
    return {key: _second_moments(sub) for key, sub in param_states.items() if key != "m"}


def _is_tensorstore_spec(node: Any) -> bool:
    return isinstance(node, dict) and "driver" in node and "kvstore" in node


def _numpy_dtype(array: Any) -> np.dtype:
    return array.dtype.numpy_dtype if isinstance(array, ts.TensorStore) else array.dtype


# --- orbax: a PyTree item `state/` --------------------------------------------

# What reading orbax's files raises: OSError for missing ones, ValueError for bad JSON and
# tensorstore's errors; orbax parses its metadata JSON unchecked, so a document of the
# wrong shape raises KeyError, TypeError or AttributeError.
_ORBAX_READ_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError)


class OrbaxCheckpoint(T5XCheckpoint):
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._item_dir = os.path.join(directory, "state")
        handler = ocp.PyTreeCheckpointHandler()
        try:
            # The handler, not a Checkpointer: Checkpointer.metadata logs the reason and returns None.
            with ckpt_lib.quiet_leftover_coroutines():
                tree = handler.metadata(epath.Path(self._item_dir)).tree
        except _ORBAX_READ_ERRORS as e:
            raise UserError(f"{self._item_dir}: unreadable orbax metadata: {type(e).__name__}: {_reason(e)}") from e
        finally:
            handler.close()
        if not isinstance(tree, Mapping) or not isinstance(tree.get("target"), Mapping):
            raise UserError(f"{self._item_dir}: no `target` in this T5X checkpoint")
        self.shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree["target"])
        state = tree.get("state")
        self._has_step = isinstance(state, Mapping) and "step" in state
        param_states = state.get("param_states") if isinstance(state, Mapping) else None
        self._param_states = param_states if isinstance(param_states, Mapping) else None

    def read(self, shardings: PyTree | None = None) -> tuple[PyTree, int]:
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        if shardings is None:
            shardings = jax.tree.map(lambda _: one_device, self.shapes)
        item = {"target": jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), self.shapes, shardings)}
        if self._has_step:
            item["state"] = {"step": jax.ShapeDtypeStruct((), np.int32, sharding=one_device)}
        restored = self._restore(item)
        return restored["target"], self._step_of(restored)

    def read_adafactor_state(self) -> tuple[PyTree, int] | None:
        if self._param_states is None:
            return None
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state = {"param_states": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                                              _second_moments(self._param_states))}
        if self._has_step:
            state["step"] = jax.ShapeDtypeStruct((), np.int32, sharding=one_device)
        restored = self._restore({"state": state})
        return jax.tree.map(np.asarray, restored["state"]["param_states"]), self._step_of(restored)

    def _step_of(self, restored: dict) -> int:
        return int(restored["state"]["step"]) if self._has_step else 0

    def _restore(self, item: PyTree) -> PyTree:
        """The parts of `state/` that `item` names (ShapeDtypeStructs with shardings)."""
        try:
            with ckpt_lib.quiet_leftover_coroutines():
                return ocp.PyTreeCheckpointer().restore(
                    self._item_dir,
                    args=ocp.args.PyTreeRestore(
                        item=item,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                        partial_restore=True,
                    ),
                )
        except _ORBAX_READ_ERRORS as e:
            raise UserError(f"{self._item_dir}: cannot read the arrays: {type(e).__name__}: {_reason(e)}") from e
        except Exception as e:
            # orbax re-raises a failed array read as a bare Exception whose cause is tensorstore's ValueError.
            if not isinstance(e.__cause__, (OSError, ValueError)):
                raise
            raise UserError(f"{self._item_dir}: cannot read the arrays: {_reason(e.__cause__)}") from e
