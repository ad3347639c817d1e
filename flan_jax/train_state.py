"""A run's training state and the one place it starts from.

`init_or_restore` gives the training loop its `TrainState`, in this order
(as T5X's `TrainStateInitializer.from_checkpoint_or_scratch` does):
  1. resume: the newest readable step in the run's own checkpoints;
  2. pretrained: weights from `Pretrained.path` (HF, T5X or a flan-jax run,
     see `flan_jax.formats`), with the optimizer state of a T5X checkpoint
     or flan-jax run continued when `Pretrained.optimizer_state` asks for it;
  3. scratch: fresh parameters from the seed.
Layer layouts (scanned or unrolled) are converted on the way in
(`formats.native.restore_in_layout`); a resume reads its own steps through
`formats.native` alone, and with them the input pipeline's position when
the step holds one. With adapters (`flan_jax.peft`) "pretrained"
is the frozen base, steps hold only the adapters, and a resume loads the base
again (from `Pretrained.path`, else the path the steps record) and refuses
one whose fingerprint differs. The metadata saved with each step is
`formats.StepMeta`: one writer (`to_dict`), one reader (`from_dict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from flan_jax import checkpoints as ckpt_lib
from flan_jax import formats
from flan_jax import optim
from flan_jax import partitioning, peft
from flan_jax import step as step_lib
from flan_jax.errors import UserError
from flan_jax.formats import StepMeta, hf_peft, native
from flan_jax.input_checkpoint import InputState
from flan_jax.model import T5Config, Transformer, scan

PyTree = Any


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What the training loop carries from step to step."""

    step: int
    params: PyTree
    opt_state: PyTree
    meta: StepMeta | None = None  # the checkpoint's, when resumed from the run's own checkpoints
    base: peft.BaseRef | None = None  # with adapters: the frozen base, recorded in every step saved

    def replace(self, **changes: Any) -> TrainState:
        return dataclasses.replace(self, **changes)

    @property
    def batches_consumed(self) -> int:
        """How many batches the input pipeline has delivered up to `step` (iteration is deterministic)."""
        return self.meta.data.batches_consumed if self.meta and self.meta.data else self.step


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Where a run starts when its model_dir holds no checkpoint (see TrainConfig.init_checkpoint)."""

    path: str
    optimizer_state: bool = True  # continue the checkpoint's optimizer state where it has one


def init_or_restore(
    module: Transformer,
    tx: optax.GradientTransformation,
    partitioner: partitioning.Partitioner,
    lengths: Mapping[str, int],
    *,
    seed: int,
    checkpointer: ckpt_lib.Checkpointer,
    pretrained: Pretrained | None = None,
    input_state: InputState | None = None,
) -> tuple[step_lib.Model, TrainState]:
    """The model's shardings and the state to train from: resumed, pretrained or fresh (module doc).

    On a resume, `input_state` (the input pipeline) takes the position the step holds, if any.
    """
    model, params, opt_state = step_lib.initialize(module, tx, partitioner, lengths, seed)
    config = module.config
    random_base = peft.BaseRef(None, peft.fingerprint(peft.split(config, params)[1])) if config.has_adapters else None
    fresh = TrainState(0, params, opt_state, base=random_base)
    if checkpointer.all_steps():
        # The newest readable step; unreadable ones are reported and set aside.
        _, state = checkpointer.read_newest(
            lambda step: restore(checkpointer, step, model, fresh, pretrained, input_state))
        return model, state
    if pretrained is not None:
        if config.has_adapters:  # the random base goes before the pretrained one comes (memory)
            fresh = fresh.replace(params=peft.trainable(config, fresh.params))
            del params
        return model, load_pretrained(pretrained, model, tx, fresh, seed)
    return model, fresh


def restore(checkpointer: ckpt_lib.Checkpointer, step: int, model: step_lib.Model, like: TrainState,
            pretrained: Pretrained | None = None, input_state: InputState | None = None) -> TrainState:
    """A step of `checkpointer` onto the shardings and layer layout of `like`
    (with adapters: the step's adapters on the base they were trained on), and
    `input_state`'s position when the step holds one."""
    config = model.config
    params, opt_state, meta = native.restore_in_layout(
        checkpointer, step, ckpt_lib.abstract_like(peft.trainable(config, like.params)),
        ckpt_lib.abstract_like(like.opt_state), input_state,
    )
    scanned = config.scan_layers
    if meta.model_config.scan_layers != scanned:
        print(f"Step {step} was saved with scan_layers={meta.model_config.scan_layers}; converting to scan_layers={scanned}.")
    if not config.has_adapters:
        return TrainState(step, params, opt_state, meta)
    where = f"step {step} in {checkpointer.directory}"
    if meta.base is None:
        raise UserError(f"{where} holds no record of the base its adapters belong to")
    path = pretrained.path if pretrained is not None else meta.base.path
    if path is None:  # trained on the seed's random base: made again by `initialize`
        base, frozen = like.base, peft.split(config, like.params)[1]
    else:
        try:
            loaded = formats.load_base(path, config, model.params_shardings)
        except ckpt_lib.UnreadableStepError as e:  # the base's step, not this run's: nothing to set aside here
            raise UserError(f"the base of {where} cannot be read: {e}") from e
        base, frozen = loaded.ref, loaded.params
    meta.base.check_same(base, where)
    return TrainState(step, peft.combine(params, frozen), opt_state, meta, base)


def load_pretrained(
    pretrained: Pretrained, model: step_lib.Model, tx: optax.GradientTransformation, fresh: TrainState,
    seed: int = 0,
) -> TrainState:
    """Params from a pretrained checkpoint (any format), placed on the mesh, plus the optimizer
    state: the checkpoint's when it has one and `pretrained.optimizer_state`, else `fresh`'s.
    The step count starts at 0. With adapters `pretrained` is the frozen base
    and the adapters (and their optimizer state) start fresh (a prompt from
    the base's embeddings, drawn with `seed`)."""
    config = model.module.config
    if config.has_adapters:
        return _load_base(pretrained.path, model, fresh, seed)
    # load_checkpoint checks every parameter's name and shape against the config.
    loaded = formats.load_checkpoint(pretrained.path, config=config, shardings=model.params_shardings)
    params = jax.tree.map(lambda x, ref: x.astype(ref.dtype), loaded.params, fresh.params)
    opt_state, continued = fresh.opt_state, ""
    if pretrained.optimizer_state and loaded.format == "flan_jax":
        restored = _flan_jax_opt_state(pretrained.path, loaded.step, model, fresh.replace(params=params))
        if restored is not None:
            opt_state, continued = restored, "; its optimizer state continues"
    elif pretrained.optimizer_state and loaded.format.startswith("t5x"):
        t5x_state = formats.read_adafactor_state(pretrained.path)
        if t5x_state is not None:
            opt_state = jax.device_put(_t5x_opt_state(pretrained.path, t5x_state, config, tx), model.opt_state_shardings)
            continued = f"; Adafactor statistics continue from its step {t5x_state[1]}"
    print(f"Initialised from {loaded.format} checkpoint {pretrained.path} (its step {loaded.step}){continued}.")
    return fresh.replace(params=params, opt_state=opt_state)


def _load_base(path: str, model: step_lib.Model, fresh: TrainState, seed: int) -> TrainState:
    """`fresh` on the frozen base at `path`, with fresh adapters; or, for a HF PEFT
    adapter directory, its adapters on the base it records (to continue them)."""
    config, adapters = model.config, peft.trainable(model.config, fresh.params)
    origin = "fresh" + (" (the prompt from the base's embeddings)" if config.prompt_length else "")
    if formats.detect_format(path) == "hf_peft":
        read = hf_peft.read_adapters(path, config)
        adapters = jax.device_put(read, peft.trainable(config, model.params_shardings))
        path, origin = hf_peft.recorded_base(path), f"from {path}"
    base = formats.load_base(path, config, model.params_shardings)
    params = peft.combine(adapters, base.params)
    if origin.startswith("fresh"):  # the prompt was drawn from the random embedding `initialize` made
        params = peft.init_prompt_from_embeddings(config, params, jax.random.key(seed))
    print(f"Initialised the frozen base from {base.loaded.format} checkpoint {path} (its step {base.loaded.step}); "
          f"the adapters start {origin}.")
    return fresh.replace(params=params, base=base.ref)


def _flan_jax_opt_state(path: str, step: int, model: step_lib.Model, like: TrainState) -> PyTree | None:
    """A flan-jax run's optimizer state at `step`, its schedules restarted; None if it holds none."""
    checkpoint_dir, _, _ = native.flan_jax_location(path)
    checkpointer = ckpt_lib.open_for_reading(checkpoint_dir)
    try:
        if not checkpointer.has_opt_state(step):
            return None
        try:
            opt_state = restore(checkpointer, step, model, like).opt_state
        except UserError as e:
            raise UserError(f"{e}; set TrainConfig.init_optimizer_state=False to start the optimizer afresh") from e
    finally:
        checkpointer.close()
    return jax.device_put(optim.restart_schedule(opt_state), model.opt_state_shardings)


def _t5x_opt_state(path: str, t5x_state: tuple[PyTree, int], model_config: T5Config,
                   tx: optax.GradientTransformation) -> PyTree:
    """`tx`'s state (on the host, in the model's layer layout) holding a T5X checkpoint's Adafactor statistics."""
    param_states, step = t5x_state
    unrolled = formats.abstract_params(dataclasses.replace(model_config, scan_layers=False))
    fresh = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tx.init, unrolled))
    try:
        state = optim.with_t5x_statistics(fresh, param_states, step)
    except ValueError as e:
        raise UserError(f"{path}: cannot continue its Adafactor state: {e}; "
                        "set TrainConfig.init_optimizer_state=False to start it afresh") from e
    return scan.to_layout(state, model_config.scan_layers)
