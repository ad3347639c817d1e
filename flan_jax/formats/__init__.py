"""Where checkpoint formats meet: detect a path's format and load it as params.

Formats: a HF model directory (`hf`), a T5X checkpoint in the legacy or orbax
layout (`t5x_legacy`, `t5x_orbax`), and flan-jax's own run directory or step
directory (`flan_jax`). Everything past this module sees only a T5Config and
the model's parameter tree.

flan-jax's own steps are read and written by `formats.native` (a run resumes
through it alone); this module loads them as any other format, with the base
of a run's adapters from wherever it lives.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from flan_jax import checkpoints as ckpt_lib
from flan_jax import peft
from flan_jax.errors import UserError
from flan_jax.formats import hf, hf_peft, native, t5x
from flan_jax.formats.meta import DataPosition, StepMeta, config_from_dict
from flan_jax.formats.native import save_flan_jax
from flan_jax.model import T5Config, scan

PyTree = Any
# A params-shaped tree of shardings, a function from the checkpoint's config to one, or None.
Shardings = Any


@dataclasses.dataclass
class LoadedCheckpoint:
    format: str
    config: T5Config
    params: PyTree
    vocab_record: dict | None  # see flan_jax.data.load_vocabulary
    vocab_dir: str | None  # the directory vocab_record's file is relative to
    step: int


def detect_format(path: str) -> str:
    """'hf', 'hf_peft' (a PEFT adapter directory, see `hf_peft`), 't5x_legacy', 't5x_orbax'
    or 'flan_jax'; UserError naming the path otherwise."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint path {path!r} does not exist")
    if hf_peft.is_adapter_directory(path):
        return "hf_peft"
    if hf.is_hf_directory(path):
        return "hf"
    layout = t5x.detect_layout(path)
    if layout:
        return layout
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "params")):
        return "flan_jax"
    raise UserError(
        f"{path}: not a recognised checkpoint (expected a HF directory with config.json, a HF PEFT adapter "
        "directory with adapter_config.json, a T5X checkpoint_<step>/ directory, or a flan-jax run or step directory)"
    )


# The T5Config fields that describe a checkpoint's network (the rest are training choices).
ARCHITECTURE_FIELDS = (
    "vocab_size", "emb_dim", "num_heads", "head_dim", "num_encoder_layers", "num_decoder_layers", "mlp_dim",
    "mlp_activations", "logits_via_embedding", "relative_attention_num_buckets", "relative_attention_max_distance",
    "layer_norm_epsilon",
)
# Those a T5X checkpoint's parameter shapes tell (it stores no config): of the
# activations only whether the MLP is gated, nothing of the others.
SHAPE_FIELDS = tuple(f for f in ARCHITECTURE_FIELDS if f not in (
    "mlp_activations", "relative_attention_max_distance", "layer_norm_epsilon"))


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A checkpoint's network and vocabulary, read without its weights (`read_architecture`)."""

    config: T5Config
    stated: tuple[str, ...]  # the ARCHITECTURE_FIELDS the checkpoint states; the others are guesses
    vocab_file: str | None  # its SentencePiece model, if it carries one


def read_architecture(path: str) -> Architecture:
    """The architecture and vocabulary of a checkpoint in any format: a HF directory's
    config.json and spiece.model, a T5X checkpoint's parameter shapes (no vocabulary),
    a flan-jax step's metadata and its run's vocabulary, a PEFT directory's recorded base."""
    path = path if "://" in path else os.path.abspath(path)
    fmt = detect_format(path)
    if fmt == "hf_peft":
        return read_architecture(hf_peft.recorded_base(path))
    if fmt == "hf":
        config, vocab_file = hf.read_hf_config(path)
        return Architecture(config, ARCHITECTURE_FIELDS, vocab_file)
    if fmt in ("t5x_legacy", "t5x_orbax"):
        return Architecture(config_from_params(t5x.open_checkpoint(path, fmt).shapes, path), SHAPE_FIELDS, None)
    checkpoint_dir, step, run_dir = native.flan_jax_location(path)
    ckpt = ckpt_lib.open_for_reading(checkpoint_dir)
    try:
        if step is None:
            _, meta = ckpt.read_newest(lambda s: native.read_meta(ckpt, s), native.best_then_newest(ckpt))
        else:
            meta = native.read_meta(ckpt, step)
    finally:
        ckpt.close()
    return Architecture(meta.model_config, ARCHITECTURE_FIELDS, _vocab_file(meta.vocabulary, run_dir))


def unbound_architecture(architecture: Architecture, bound: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The architecture fields gin leaves unbound, with the checkpoint's values; a field
    `bound` gives another value than the checkpoint states is a UserError naming both
    and the flag that takes the checkpoint's."""
    unbound = {}
    for field in ARCHITECTURE_FIELDS:
        value = getattr(architecture.config, field)
        if field not in bound:
            unbound[field] = value
            continue
        given = tuple(bound[field]) if isinstance(bound[field], list) else bound[field]
        if field in architecture.stated and given != value:
            raise UserError(
                f"T5Config.{field}={given!r} is bound in gin but {source} has {field} {value!r}: "
                f"pass --gin.T5Config.{field}={value!r} (or bind none, to take the checkpoint's)"
            )
    return unbound


def config_from_params(params: PyTree, source: str = "checkpoint") -> T5Config:
    """Reads the architecture off a T5X-named parameter tree (T5X stores no config).

    `params` may hold arrays or anything with a `.shape` (e.g. jax.ShapeDtypeStruct).
    """
    try:
        vocab, emb = np.shape(params["token_embedder"]["embedding"])
        heads, buckets = np.shape(params["encoder"]["relpos_bias"]["rel_embedding"])
        layer0 = params["encoder"]["layers_0"]
        joined_kv = np.shape(layer0["attention"]["query"]["kernel"])[1]
        mlp = layer0["mlp"]
        gated = "wi_0" in mlp
        mlp_dim = np.shape(mlp["wi_0" if gated else "wi"]["kernel"])[1]
        layers = {stack: sum(k.startswith("layers_") for k in params[stack]) for stack in ("encoder", "decoder")}
        untied = "logits_dense" in params["decoder"]
    # KeyError: a missing parameter; TypeError: an array where a subtree belongs;
    # ValueError / IndexError: an array of the wrong rank.
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(
            f"{source}: not a T5 encoder-decoder in T5X naming (reading its architecture off the parameters "
            f"failed: {type(e).__name__}: {e})"
        ) from e
    if heads < 1 or joined_kv % heads:
        raise UserError(f"{source}: attention kernels {joined_kv} wide do not split into {heads} heads")
    try:
        return T5Config(
            vocab_size=vocab, emb_dim=emb, num_heads=heads, head_dim=joined_kv // heads,
            num_encoder_layers=layers["encoder"], num_decoder_layers=layers["decoder"], mlp_dim=mlp_dim,
            mlp_activations=("gelu", "linear") if gated else ("relu",), dropout_rate=0.0,
            logits_via_embedding=not untied, relative_attention_num_buckets=buckets,
        )
    except UserError as e:  # its first line: gin appends where it called T5Config
        raise UserError(f"{source}: its parameter shapes give {str(e).splitlines()[0]}") from e


def abstract_params(config: T5Config, shardings: PyTree | None = None) -> PyTree:
    """A jax.ShapeDtypeStruct (float32, on `shardings` if given) per parameter of
    `Transformer(config)`, adapters included, in its layer layout; computed
    from the config alone."""
    tree: dict = {}
    for path, shape in hf.param_shapes(config).items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
    if config.scan_layers:
        tree = jax.eval_shape(scan.stack_layers, tree)
    if config.has_adapters:
        tree = peft.combine(peft.abstract_adapters(config, tree), tree)
    if shardings is not None:
        tree = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    return tree


def check_params(params: PyTree, config: T5Config, source: str) -> None:
    """A UserError naming the first parameter that `Transformer(config)` lacks, misses or shapes
    differently from `params` (arrays, or anything with a `.shape`, in the config's layer layout)."""
    ckpt_lib.check_fits(params, abstract_params(config), source, "parameter")


def _load_flan_jax(
    path: str, config: T5Config | None, shardings: Shardings, step: int | None, dtype: str | None
) -> LoadedCheckpoint:
    checkpoint_dir, step, run_dir = native.flan_jax_location(path, step)
    ckpt = ckpt_lib.open_for_reading(checkpoint_dir)

    def read(step: int) -> tuple[T5Config, PyTree, StepMeta]:
        meta = native.read_meta(ckpt, step)
        wanted = config or meta.model_config
        if meta.base is not None:  # a run with adapters: its steps hold only them
            return wanted, *_load_adapters_and_base(ckpt, step, wanted, _resolve(shardings, wanted), dtype)
        params, _, meta = native.restore_in_layout(ckpt, step, abstract_params(wanted, _resolve(shardings, wanted)))
        return wanted, params, meta

    try:
        if step is None:
            step, (loaded_config, params, meta) = ckpt.read_newest(read, native.best_then_newest(ckpt))
        elif step not in ckpt.all_steps():
            raise UserError(f"no step {step} in {ckpt.directory}; available: {ckpt.all_steps()}")
        else:
            loaded_config, params, meta = read(step)
    finally:
        ckpt.close()
    return LoadedCheckpoint("flan_jax", loaded_config, params, meta.vocabulary, run_dir, step)


def _load_adapters_and_base(
    ckpt: ckpt_lib.Checkpointer, step: int, config: T5Config, shardings: PyTree | None, dtype: str | None
) -> tuple[PyTree, StepMeta]:
    """A step that holds only adapters (see flan_jax.peft), combined with the
    base recorded in its metadata, whose fingerprint must match."""
    where = f"step {step} in {ckpt.directory}"
    meta = native.read_meta(ckpt, step)
    if meta.base.path is None:
        raise UserError(f"{where} holds adapters trained on a random base, which is not saved")
    try:
        base = load_base(meta.base.path, config, shardings, dtype)
    except ckpt_lib.UnreadableStepError as e:  # the base's step: not to be set aside as this run's
        raise UserError(f"the base of {where} cannot be read: {e}") from e
    meta.base.check_same(base.ref, where)
    like = abstract_params(config, shardings)
    adapters, _, _ = native.restore_in_layout(ckpt, step, peft.trainable(config, like))
    return peft.combine(adapters, base.params), meta


@dataclasses.dataclass
class LoadedBase:
    """A base model for adapters: its parameters (in the config's frozen dtype) and its record."""

    params: PyTree
    ref: peft.BaseRef
    loaded: LoadedCheckpoint


def load_base(path: str, config: T5Config, shardings: PyTree | None = None, dtype: str | None = None) -> LoadedBase:
    """The base of an adapter `config` from `path` (any format), in `dtype`
    (default: the config's frozen dtype), on the frozen half of `shardings`
    (a tree for the whole model) when given."""
    path = path if "://" in path else os.path.abspath(path)
    base_shardings = None if shardings is None else peft.split(config, shardings)[1]
    loaded = load_checkpoint(path, config=peft.base_config(config), shardings=base_shardings,
                             dtype=dtype or config.frozen_dtype)
    return LoadedBase(loaded.params, peft.BaseRef(path, peft.fingerprint(loaded.params)), loaded)


def load_checkpoint(
    path: str,
    *,
    config: T5Config | None = None,
    shardings: Shardings = None,
    step: int | None = None,
    base: str | None = None,
    dtype: str | None = None,
) -> LoadedCheckpoint:
    """Loads params (onto `shardings` when given) and the config from any supported format.

    `shardings` is a tree like the params, or a function from the checkpoint's
    config to one (for callers that learn the architecture from the checkpoint).

    `config` overrides the architecture read from the checkpoint (T5X stores
    none; we otherwise infer it from parameter shapes), and the params come
    in its layer layout (scanned or unrolled) whatever the checkpoint holds.
    Every parameter is checked against the config: a UserError names the
    first one that is missing, extra or of another shape, with both shapes.
    A Hugging Face PEFT adapter directory is read onto its base model: `base`,
    else the local path its adapter_config.json records. `dtype` casts the
    parameters (a HF checkpoint's on the host, before they reach a device);
    without it the base of a run with adapters comes in its frozen dtype.
    """
    path = path if "://" in path else os.path.abspath(path)  # orbax and tensorstore want absolute paths
    fmt = detect_format(path)
    if fmt == "hf_peft":  # the adapters on their base: `base`, else the path the adapter records
        base_path = base or hf_peft.recorded_base(path)
        wanted = None if config is None else dataclasses.replace(config, lora=None)
        loaded = load_checkpoint(base_path, config=wanted, dtype=dtype)
        config, adapters = hf_peft.adapters_onto(path, loaded.config, config)
        params = _place(peft.combine(adapters, loaded.params), _resolve(shardings, config))
        return dataclasses.replace(loaded, format="hf_peft", config=config, params=params)
    if fmt == "hf":
        hf_config, params, vocab_file = hf.load_hf_directory(path)
        config = config or hf_config
        params = scan.to_layout(params, config.scan_layers)
        check_params(params, config, path)
        params = params if dtype is None else jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
        vocab = {"type": "sentencepiece", "file": "spiece.model", "extra_ids": 0} if vocab_file else None
        return LoadedCheckpoint(fmt, config, _place(params, _resolve(shardings, config)), vocab, path, 0)
    if fmt in ("t5x_legacy", "t5x_orbax"):
        checkpoint = t5x.open_checkpoint(path, fmt)
        config = config or config_from_params(checkpoint.shapes, path)
        # Shapes are checked before any array is read: a corrupt shape could ask for any amount of memory.
        check_params(checkpoint.shapes, dataclasses.replace(config, scan_layers=False), path)
        shardings = _resolve(shardings, config)
        if config.scan_layers:
            # T5X stores layers unrolled: read each layer onto its slice of the
            # stacked sharding, then stack on device.
            layer_shardings = None
            if shardings is not None:
                depths = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
                layer_shardings = scan.unstacked_shardings(shardings, depths)
            params, checkpoint_step = checkpoint.read(layer_shardings)
            params = jax.jit(scan.stack_layers, out_shardings=shardings)(params)
        else:
            params, checkpoint_step = checkpoint.read(shardings)
        return LoadedCheckpoint(fmt, config, _cast(params, dtype), None, None, checkpoint_step)
    loaded = _load_flan_jax(path, config, shardings, step, dtype)
    return dataclasses.replace(loaded, params=_cast(loaded.params, dtype))


def read_adafactor_state(path: str) -> tuple[PyTree, int] | None:
    """A T5X checkpoint's Adafactor statistics and step (see `t5x.T5XCheckpoint.read_adafactor_state`);
    None for formats that carry none to start a finetune from (HF) and T5X checkpoints without them."""
    path = path if "://" in path else os.path.abspath(path)
    fmt = detect_format(path)
    if fmt not in ("t5x_legacy", "t5x_orbax"):
        return None
    return t5x.open_checkpoint(path, fmt).read_adafactor_state()


def _resolve(shardings: Shardings, config: T5Config) -> PyTree | None:
    return shardings(config) if callable(shardings) else shardings


def _cast(params: PyTree, dtype: str | None) -> PyTree:
    return params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), params)


def _place(params: PyTree, shardings: PyTree | None) -> PyTree:
    if shardings is None:
        return params
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def vocab_file_of(loaded: LoadedCheckpoint) -> str | None:
    """The SentencePiece file a loaded checkpoint carries, if any."""
    return _vocab_file(loaded.vocab_record, loaded.vocab_dir)


def _vocab_file(record: dict | None, directory: str | None) -> str | None:
    """The SentencePiece file a vocabulary record names (see flan_jax.data.load_vocabulary), if any."""
    record = record or {}
    if record.get("type") != "sentencepiece" or not directory:
        return None
    return os.path.join(directory, record["file"])
