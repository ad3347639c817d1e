"""Orbax checkpoints of a training run: params, optimizer state and metadata.

A step directory holds three items so each can be read alone:
  params/     the model's parameter tree (T5X names)
  opt_state/  the optax Adafactor state
  meta/       JSON: step, model config, data position, vocabulary file
`flan-jax infer` restores `params` and `meta` only.

Retention keeps the last `keep_last` steps plus the `keep_best` steps with
the best evaluation metric, so the best checkpoint survives later saves.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from flan_jax.errors import UserError

PyTree = Any


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """How often to save and what to keep."""

    save_every: int = 1000
    keep_last: int = 2
    keep_best: int = 1
    best_metric: str | None = "eval/average_accuracy"
    best_mode: str = "max"


class Checkpointer:
    """A thin wrapper over ocp.CheckpointManager with T5X-like retention."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig = CheckpointConfig(), *, read_only: bool = False) -> None:
        policies: list[ocm.PreservationPolicy] = [ocm.LatestN(n=config.keep_last)]
        best_fn = None
        if config.best_metric:
            metric = config.best_metric
            best_fn = lambda metrics: metrics[metric]  # noqa: E731
        if best_fn and config.keep_best:
            policies.append(
                ocm.BestN(
                    get_metric_fn=best_fn,
                    reverse=config.best_mode == "min",
                    n=config.keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            # best_fn also makes the manager store metrics and answer best_step().
            best_fn=best_fn,
            best_mode=config.best_mode,
            create=not read_only,
            read_only=read_only,
        )
        directory = os.fspath(directory)
        # orbax wants absolute local paths; URLs (gs://...) are left alone.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.config = config
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.config.best_metric else None

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        params: PyTree,
        opt_state: PyTree | None,
        meta: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Saves asynchronously; an existing step is never overwritten. opt_state may be None."""
        if step in self.manager.all_steps():
            return
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(dict(meta))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(
            step,
            args=ocp.args.Composite(**items),
            metrics=dict(metrics) if metrics else None,
            force=True,
        )

    def restore(self, step: int, abstract_params: PyTree, abstract_opt_state: PyTree) -> tuple[PyTree, PyTree, dict]:
        """Restores a full training state onto the shardings of the abstract trees."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.params, restored.opt_state, dict(restored.meta)

    def restore_params(self, step: int, abstract_params: PyTree | None = None) -> tuple[PyTree, dict]:
        """Restores only the parameters (and metadata), e.g. for inference."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.params, dict(restored.meta)

    def meta(self, step: int) -> dict:
        """The metadata item of a step alone (model config, data position, vocabulary)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def open_for_reading(directory: str | os.PathLike) -> Checkpointer:
    """Opens an existing checkpoint directory; a UserError if it holds no step."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise UserError(f"checkpoint directory {directory!r} does not exist")
    ckpt = Checkpointer(directory, CheckpointConfig(), read_only=True)
    if ckpt.latest_step() is None:
        raise UserError(f"no checkpoint step found in {directory!r}")
    return ckpt


def abstract_like(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs (with shardings) describing a tree of arrays."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
