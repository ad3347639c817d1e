"""flan-jax's own checkpoints: a run directory's steps (flan_jax.checkpoints), read and written.

A run resumes through here alone (`restore_in_layout`, from train_state);
`formats` dispatches here for a flan-jax path given as a pretrained or
inference checkpoint. `StepMeta` (formats/meta.py) is a step's metadata.
The one place a saved layer layout (scanned or unrolled) is converted is
`restore_in_layout`.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import flax.linen as nn
import jax

from flan_jax import checkpoints as ckpt_lib
from flan_jax.errors import UserError
from flan_jax.formats.meta import StepMeta
from flan_jax.input_checkpoint import InputState
from flan_jax.model import T5Config, scan

PyTree = Any


def flan_jax_location(path: str, step: int | None = None) -> tuple[str, int | None, str]:
    """(checkpoints dir, step or None for "best, else newest readable", run dir) of a run or step directory."""
    if os.path.isdir(os.path.join(path, "params")):  # a step directory
        name = os.path.basename(os.path.normpath(path))
        if not name.isdigit():
            raise UserError(f"{path}: a step directory's name is its step number, not {name!r}")
        return os.path.dirname(path), int(name), os.path.dirname(os.path.dirname(path))
    return os.path.join(path, "checkpoints"), step, path


def read_meta(checkpointer: ckpt_lib.Checkpointer, step: int) -> StepMeta:
    """The typed metadata of a flan-jax step."""
    return StepMeta.from_dict(checkpointer.meta(step), f"{checkpointer.directory}/{step}/meta")


def restore_in_layout(
    checkpointer: ckpt_lib.Checkpointer, step: int, params: PyTree, opt_state: PyTree | None = None,
    input_state: InputState | None = None,
) -> tuple[PyTree, PyTree | None, StepMeta]:
    """A flan-jax step's params (and optimizer state, unless None) in the layer layout and on the
    shardings of the abstract trees given (ShapeDtypeStructs), and its metadata; with an
    optimizer state, also `input_state`'s position when the step holds one.

    A step saved with the other layer layout (scanned vs unrolled) is read in
    its own, replicated, and converted on the devices: the parameters and the
    per-parameter optimizer state follow the same tree. Params without
    shardings are read as saved and converted on the host.
    """
    meta = read_meta(checkpointer, step)
    saved, scanned = meta.model_config.scan_layers, scan.is_scanned(params)
    if jax.tree.leaves(params)[0].sharding is None:
        restored = scan.to_layout(checkpointer.restore_params(step)[0], scanned)
        ckpt_lib.check_fits(restored, params, f"{checkpointer.directory}/{step}", "parameter")
        return restored, None, meta
    targets = (params, opt_state)
    if saved != scanned:
        replicated = _replicated(jax.tree.leaves(params)[0].sharding)
        as_saved = jax.eval_shape(lambda trees: _to_layout(trees, saved), targets)
        targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), as_saved)
    # orbax compares the saved shapes to the wanted ones before it reads anything.
    if opt_state is None:
        restored = checkpointer.restore_params(step, targets[0])[0], None
    else:
        restored = checkpointer.restore(step, *targets, input_state)[:2]
    if saved != scanned:
        shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))
        restored = jax.jit(lambda trees: _to_layout(trees, scanned), out_shardings=shardings)(restored)
    return *restored, meta


def _to_layout(trees: tuple, scan_layers: bool) -> tuple:
    return tuple(None if t is None else scan.to_layout(t, scan_layers) for t in trees)


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The whole array on every device of `sharding`'s mesh."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def best_then_newest(ckpt: ckpt_lib.Checkpointer) -> list[int]:
    """The steps to read a run from: the best, else the newest first (an unreadable one is
    reported and set aside for the next, `Checkpointer.read_newest`)."""
    best = ckpt.best_step()
    return ([best] if best is not None else []) + sorted(set(ckpt.all_steps()) - {best}, reverse=True)


def save_flan_jax(directory: str, config: T5Config, params: PyTree, vocab_file: str | None, step: int) -> str:
    """Writes params as a flan-jax run directory (checkpoints/<step>/ + spiece.model); returns it."""
    if os.path.exists(directory) and os.listdir(directory):
        raise UserError(f"{directory} exists and is not empty; refusing to overwrite it")
    os.makedirs(directory, exist_ok=True)
    vocab_record = None
    if vocab_file:
        shutil.copyfile(vocab_file, os.path.join(directory, "spiece.model"))
        vocab_record = {"type": "sentencepiece", "file": "spiece.model", "extra_ids": 0}
    ckpt = ckpt_lib.Checkpointer(os.path.join(directory, "checkpoints"), ckpt_lib.CheckpointConfig(best_metric=None))
    # Fresh `Transformer.init` params come boxed in nn.Partitioned; the checkpoint holds the plain tree.
    ckpt.save(step, nn.unbox(params), None, StepMeta(step, config, vocab_record).to_dict())
    ckpt.wait()
    ckpt.close()
    return directory
