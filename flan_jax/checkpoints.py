"""Orbax checkpoints of a training run: params, optimizer state and metadata.

A step directory holds these items so each can be read alone:
  params/       the model's parameter tree (T5X names)
  opt_state/    the optax Adafactor state
  meta/         JSON: step, model config, data position, vocabulary file
                (its fields: flan_jax.formats.StepMeta; this module stores any JSON object)
  input_state/  the input pipeline's position, when the run saves it
                (flan_jax/input_checkpoint.py)
`flan-jax infer` restores `params` and `meta` only.

Retention keeps the last `keep_last` steps plus the `keep_best` steps with
the best evaluation metric, so the best checkpoint survives later saves.

A step that cannot be read (truncated or corrupt files) is reported, set
aside as `<step>.unreadable` (never deleted) and the next newest step is
tried (`Checkpointer.read_newest`). A step whose arrays do not fit the
model being restored is a configuration mistake instead: a `UserError`,
and the step is left alone. A save that fails raises `CheckpointSaveError`
with the cause; orbax writes into a temporary directory and deletes old
steps only after the new one is committed, so earlier steps stay intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import gin
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from flan_jax import errors, input_checkpoint
from flan_jax.errors import UserError
from flan_jax.input_checkpoint import InputState

PyTree = Any
T = TypeVar("T")
UNREADABLE_SUFFIX = ".unreadable"


class UnreadableStepError(UserError):
    """A checkpoint step whose files cannot be read (truncated, corrupt, missing)."""

    def __init__(self, directory: str, step: int, cause: BaseException) -> None:
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"step {step} in {directory} cannot be read: {type(cause).__name__}: {reason[:300]}")
        self.step = step


class CheckpointSaveError(UserError):
    """A save that failed (disk full, permissions, ...); earlier steps are intact."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """How often to save and what to keep."""

    save_every: int = 1000
    keep_last: int = 2
    keep_best: int = 1
    best_metric: str | None = "eval/average_accuracy"
    best_mode: str = "max"

    def __post_init__(self) -> None:
        # keep_last >= 1: a run resumes from its latest checkpoint.
        errors.require_fields(
            self, save_every=errors.POSITIVE_INT, keep_last=errors.POSITIVE_INT, keep_best=errors.NON_NEGATIVE_INT,
            best_metric=errors.optional(errors.NAME), best_mode=errors.one_of("max", "min"),
        )


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
        # Handlers named up front, so item_metadata() can read every item of a
        # step before anything has been saved or restored through this manager.
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            input_checkpoint.ITEM: input_checkpoint.InputStateHandler(),
        }
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        except ValueError as e:  # orbax reads each step's _CHECKPOINT_METADATA when it opens a directory
            raise UserError(f"{self.directory}: orbax cannot open it: {str(e).splitlines()[0]}") from e
        self._pending_save: int | None = None  # The step whose asynchronous save may still be running.

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
        input_state: InputState | None = None,
    ) -> float:
        """Starts an asynchronous save; returns the seconds the caller was held up.

        The caller waits for the previous save to finish, for the copy of the
        arrays to host memory and for `input_state` (the input pipeline) to
        write its position; the arrays are written in the background. An
        existing step is never overwritten. opt_state may be None.
        """
        if step in self.manager.all_steps():
            return 0.0
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(dict(meta))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if input_state is not None:
            items[input_checkpoint.ITEM] = input_checkpoint.InputStateSave(input_state)
        start = time.perf_counter()
        self._check_previous_save()
        try:
            self.manager.save(
                step, args=ocp.args.Composite(**items), metrics=dict(metrics) if metrics else None, force=True
            )
        except Exception as e:  # orbax and tensorstore raise many types; all mean the save failed.
            raise self._save_error(step, e) from e
        self._pending_save = step
        return time.perf_counter() - start

    def wait(self) -> None:
        """Blocks until the last save is committed; CheckpointSaveError if it failed."""
        self._check_previous_save()

    def _check_previous_save(self) -> None:
        step, self._pending_save = self._pending_save, None
        try:
            with quiet_leftover_coroutines():
                self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(step, e) from e
        if step is not None and "://" not in self.directory and not os.path.isdir(os.path.join(self.directory, str(step))):
            # orbax logs (rather than raises) some failures of the final commit.
            raise self._save_error(step, RuntimeError("the step was not committed (see orbax's log above)"))

    def _save_error(self, step: int | None, cause: BaseException) -> CheckpointSaveError:
        self.manager.reload()  # Forget the failed step.
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        return CheckpointSaveError(
            f"saving step {step} to {self.directory} failed: {type(cause).__name__}: {reason[:400]}; "
            f"the earlier steps {self.all_steps()} are intact"
        )

    def has_opt_state(self, step: int) -> bool:
        """Whether `step` holds an optimizer state (converted checkpoints hold params only)."""
        return self._item_metadata(step).get("opt_state") is not None

    def restore(self, step: int, abstract_params: PyTree, abstract_opt_state: PyTree,
                input_state: InputState | None = None) -> tuple[PyTree, PyTree, dict]:
        """Restores a full training state onto the shardings of the abstract trees, and
        `input_state`'s position when the step holds one (else it is left as it is)."""
        saved = self._item_metadata(step)
        if saved.get("opt_state") is None:
            raise UserError(
                f"step {step} in {self.directory} holds no optimizer state (a converted checkpoint?); "
                "start from it with TrainConfig.init_checkpoint instead"
            )
        check_fits(saved["params"], abstract_params, f"step {step} in {self.directory}", "parameter")
        check_fits(saved["opt_state"], abstract_opt_state, f"step {step} in {self.directory}", "optimizer state entry")
        items = {}
        if input_state is not None and saved.get(input_checkpoint.ITEM) is not None:
            items[input_checkpoint.ITEM] = input_checkpoint.InputStateRestore(input_state)
        restored = self._read(
            step,
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore(),
            **items,
        )
        return restored.params, restored.opt_state, self._meta_dict(step, restored.meta)

    def restore_params(self, step: int, abstract_params: PyTree | None = None) -> tuple[PyTree, dict]:
        """Restores only the parameters (and metadata), e.g. for inference."""
        if abstract_params is not None:
            saved = self._item_metadata(step)
            check_fits(saved["params"], abstract_params, f"step {step} in {self.directory}", "parameter")
        restored = self._read(step, params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore())
        return restored.params, self._meta_dict(step, restored.meta)

    def meta(self, step: int) -> dict:
        """The metadata item of a step alone (model config, data position, vocabulary)."""
        return self._meta_dict(step, self._read(step, meta=ocp.args.JsonRestore()).meta)

    def _meta_dict(self, step: int, meta: Any) -> dict:
        if not isinstance(meta, Mapping):
            cause = ValueError(f"its meta item is a JSON {type(meta).__name__}, not an object")
            raise UnreadableStepError(self.directory, step, cause)
        return dict(meta)

    def _item_metadata(self, step: int) -> Mapping[str, Any]:
        try:
            with quiet_leftover_coroutines():
                return self.manager.item_metadata(step)
        except Exception as e:
            raise UnreadableStepError(self.directory, step, e) from e

    def _read(self, step: int, **items: Any) -> Any:
        """manager.restore of some items; any failure to read is an UnreadableStepError."""
        try:
            with quiet_leftover_coroutines():
                return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax wraps tensorstore's errors in bare Exceptions, among others.
            raise UnreadableStepError(self.directory, step, e) from e

    def set_aside(self, error: UnreadableStepError) -> str:
        """Renames an unreadable step to `<step>.unreadable` (never deletes it); says what was done."""
        source = os.path.join(self.directory, str(error.step))
        target = source + UNREADABLE_SUFFIX
        if os.path.exists(target):
            target = f"{target}-{uuid.uuid4().hex[:8]}"
        done = f"moved it to {target}"
        if jax.process_index() == 0:
            try:
                os.rename(source, target)
            except OSError as e:  # e.g. a read-only run directory: skip the step, leave it in place
                done = f"skipping it (it could not be moved aside: {e.strerror or e})"
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"flan_jax_set_aside_{error.step}")
        self.manager.reload()
        return done

    def read_newest(self, read: Callable[[int], T], steps: Sequence[int] | None = None) -> tuple[int, T]:
        """`read(step)` for the first readable step of `steps` (default: newest first).

        Each step that raises UnreadableStepError is reported on stderr and set
        aside; other errors (say, a model that does not fit) propagate. A
        UserError when no step can be read.
        """
        steps = list(steps) if steps is not None else sorted(self.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                return step, read(step)
            except UnreadableStepError as e:
                failures.append(str(e))
                print(f"warning: {e}; {self.set_aside(e)}", file=sys.stderr)
        raise UserError(f"no readable checkpoint step in {self.directory}: " + "; ".join(failures or ["no steps"]))

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    """{'encoder/layers_0/attention/query/kernel': shape} for an array tree or orbax's metadata of one."""
    shapes = {}
    for path, leaf in jax.tree.leaves_with_path(tree):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        shapes[name] = tuple(leaf.shape)
    return shapes


def check_fits(saved: PyTree, wanted: PyTree, where: str, what: str) -> None:
    """UserError naming the first array whose name or shape differs between a checkpoint and a model."""
    have, want = _leaf_shapes(saved), _leaf_shapes(wanted)
    if missing := sorted(set(want) - set(have)):
        raise UserError(f"{where} lacks the {what} {missing[0]} (and {len(missing) - 1} more) that the model has")
    if extra := sorted(set(have) - set(want)):
        raise UserError(f"{where} has the {what} {extra[0]} (and {len(extra) - 1} more) that the model lacks")
    for name, shape in want.items():
        if have[name] != shape:
            raise UserError(f"{where}: {what} {name} has shape {have[name]}, the model wants {shape}")


@contextlib.contextmanager
def quiet_leftover_coroutines() -> Iterator[None]:
    """After a failed read, orbax's other pending array reads die with the event
    loop and Python prints each as "Exception ignored in <coroutine>"; the
    failure itself is reported once, by the caller. Reads still in flight
    fail later still ("Event loop is closed" in tensorstore's threads, "Task
    exception was never retrieved" from asyncio), so from a failure on such
    reports are dropped for the rest of the process; all other unraisable
    exceptions and asyncio errors are still reported."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        gc.collect()  # Collect the dead coroutines while their reports are dropped.
        raise
    finally:
        sys.unraisablehook = _without_read_leftovers(hook) if failed else hook
        if failed and not any(isinstance(f, _ReadLeftoverFilter) for f in logging.getLogger("asyncio").filters):
            logging.getLogger("asyncio").addFilter(_ReadLeftoverFilter())


_READ_LEFTOVERS = ("Event loop is closed", "Encountered error while reading array index")


class _ReadLeftoverFilter(logging.Filter):
    """Drops asyncio's reports of orbax read tasks that failed after the read was given up."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not str(error).startswith(_READ_LEFTOVERS)


def _without_read_leftovers(hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    if getattr(hook, "drops_read_leftovers", False):
        return hook

    def filtered(unraisable: Any) -> None:
        if not str(unraisable.exc_value).startswith(_READ_LEFTOVERS):
            hook(unraisable)

    filtered.drops_read_leftovers = True  # type: ignore[attr-defined]
    return filtered


def check_writable(directory: str) -> None:
    """UserError unless files can be created in `directory` (created if absent); local paths only."""
    if "://" in directory:
        return
    probe = os.path.join(directory, f".write_test_{uuid.uuid4().hex}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror or e}") from None


def open_for_reading(directory: str | os.PathLike) -> Checkpointer:
    """Opens an existing checkpoint directory; a UserError if it holds no step."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise UserError(f"checkpoint directory {directory!r} does not exist")
    ckpt = Checkpointer(directory, CheckpointConfig(), read_only=True)
    if ckpt.latest_step() is None:
        aside = sorted(n for n in os.listdir(directory) if n.endswith(UNREADABLE_SUFFIX))
        raise UserError(f"no checkpoint step found in {directory!r}" + (f" (set aside: {aside})" if aside else ""))
    return ckpt


def abstract_like(tree: PyTree) -> PyTree:
    """ShapeDtypeStructs (with shardings) describing a tree of arrays."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
