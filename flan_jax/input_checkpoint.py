"""The input pipeline's position as an item of a checkpoint step, beside the model state.

    checkpoints/<step>/input_state/process_<i>/   iterator.* and spec.json (data.TrainIterator)

One orbax save writes it with params, opt_state and meta, so a step holds the
model and the batches it was trained to, or nothing: no second directory to
keep in step. Each process writes and reads its own pipeline's state. The
save is synchronous (orbax runs it before `manager.save` returns): the
iterator must not move while it is written. TensorFlow stays out of this
module: the pipeline writes itself (`InputState`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp
from etils import epath

ITEM = "input_state"


class InputState(Protocol):
    """An input pipeline that can write and read its position (data.TrainIterator)."""

    def write_state(self, directory: str) -> bool: ...

    def read_state(self, directory: str) -> bool: ...


def process_dir(item_dir: epath.Path | str) -> str:
    """This process's part of an input_state item."""
    return os.path.join(os.fspath(item_dir), f"process_{jax.process_index()}")


class InputStateHandler(ocp.CheckpointHandler):
    """orbax's handler of the `input_state` item (see the module doc)."""

    def save(self, directory: epath.Path, args: InputStateSave) -> None:
        args.pipeline.write_state(process_dir(directory))

    def restore(self, directory: epath.Path, args: InputStateRestore) -> bool:
        """Whether this process's position was restored (False: none saved, or other data settings)."""
        return args.pipeline.read_state(process_dir(directory))

    def metadata(self, directory: epath.Path) -> dict[str, Any]:
        return {"processes": sorted(p.name for p in directory.glob("process_*"))}


@ocp.args.register_with_handler(InputStateHandler, for_save=True)
@dataclasses.dataclass
class InputStateSave(ocp.args.CheckpointArgs):
    pipeline: InputState


@ocp.args.register_with_handler(InputStateHandler, for_restore=True)
@dataclasses.dataclass
class InputStateRestore(ocp.args.CheckpointArgs):
    pipeline: InputState
