"""Where checkpoint formats meet: detect a path's format and load it as params.

Formats: a HF model directory (`hf`), a T5X checkpoint in the legacy or orbax
layout (`t5x_legacy`, `t5x_orbax`), and flan-jax's own run directory or step
directory (`flan_jax`). Everything past this module sees only a T5Config and
the model's parameter tree.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import jax
import numpy as np

from flan_jax import checkpoints as ckpt_lib
from flan_jax.errors import UserError
from flan_jax.formats import hf, t5x
from flan_jax.model import T5Config, scan

PyTree = Any


@dataclasses.dataclass
class LoadedCheckpoint:
    format: str
    config: T5Config
    params: PyTree
    vocab_record: dict | None  # see flan_jax.data.load_vocabulary
    vocab_dir: str | None  # the directory vocab_record's file is relative to
    step: int


def detect_format(path: str) -> str:
    """'hf', 't5x_legacy', 't5x_orbax' or 'flan_jax'; UserError naming the path otherwise."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint path {path!r} does not exist")
    if hf.is_hf_directory(path):
        return "hf"
    layout = t5x.detect_layout(path)
    if layout:
        return layout
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "params")):
        return "flan_jax"
    raise UserError(
        f"{path}: not a recognised checkpoint (expected a HF directory with config.json, a T5X "
        "checkpoint_<step>/ directory, or a flan-jax run or step directory)"
    )


def config_from_params(params: PyTree) -> T5Config:
    """Reads the architecture off a T5X-named parameter tree (T5X stores no config)."""
    try:
        vocab, emb = np.shape(params["token_embedder"]["embedding"])
        heads, buckets = np.shape(params["encoder"]["relpos_bias"]["rel_embedding"])
        layer0 = params["encoder"]["layers_0"]
        joined_kv = np.shape(layer0["attention"]["query"]["kernel"])[1]
        mlp = layer0["mlp"]
        gated = "wi_0" in mlp
        mlp_dim = np.shape(mlp["wi_0" if gated else "wi"]["kernel"])[1]
    except KeyError as e:
        raise UserError(f"checkpoint params lack {e}; not a T5 encoder-decoder in T5X naming") from None
    count = lambda stack: sum(k.startswith("layers_") for k in params[stack])  # noqa: E731
    return T5Config(
        vocab_size=vocab, emb_dim=emb, num_heads=heads, head_dim=joined_kv // heads,
        num_encoder_layers=count("encoder"), num_decoder_layers=count("decoder"), mlp_dim=mlp_dim,
        mlp_activations=("gelu", "linear") if gated else ("relu",), dropout_rate=0.0,
        logits_via_embedding="logits_dense" not in params["decoder"],
        relative_attention_num_buckets=buckets,
    )


def _flan_jax_step_dir(path: str, step: int | None) -> tuple[str, int, str]:
    """(checkpoints dir, step, run dir) for a run directory or a step directory."""
    if os.path.isdir(os.path.join(path, "params")):  # a step directory
        return os.path.dirname(path), int(os.path.basename(os.path.normpath(path))), os.path.dirname(os.path.dirname(path))
    ckpt = ckpt_lib.open_for_reading(os.path.join(path, "checkpoints"))
    if step is None:
        step = ckpt.best_step() or ckpt.latest_step()
    elif step not in ckpt.all_steps():
        raise UserError(f"no step {step} in {ckpt.directory}; available: {ckpt.all_steps()}")
    ckpt.close()
    return os.path.join(path, "checkpoints"), step, path


def load_checkpoint(
    path: str,
    *,
    config: T5Config | None = None,
    shardings: PyTree | None = None,
    step: int | None = None,
) -> LoadedCheckpoint:
    """Loads params (onto `shardings` when given) and the config from any supported format.

    `config` overrides the architecture read from the checkpoint (T5X stores
    none; we otherwise infer it from parameter shapes), and the params come
    in its layer layout (scanned or unrolled) whatever the checkpoint holds.
    """
    path = path if "://" in path else os.path.abspath(path)  # orbax and tensorstore want absolute paths
    fmt = detect_format(path)
    if fmt == "hf":
        hf_config, params, vocab_file = hf.load_hf_directory(path)
        config = config or hf_config
        params = scan.to_layout(params, config.scan_layers)
        vocab = {"type": "sentencepiece", "file": "spiece.model", "extra_ids": 0} if vocab_file else None
        return LoadedCheckpoint(fmt, config, _place(params, shardings), vocab, path, 0)
    if fmt in ("t5x_legacy", "t5x_orbax"):
        reader = t5x.load_legacy if fmt == "t5x_legacy" else t5x.load_orbax
        if config is not None and config.scan_layers:
            # T5X stores layers unrolled: read each layer onto its slice of the
            # stacked sharding, then stack on device.
            layer_shardings = None
            if shardings is not None:
                depths = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
                layer_shardings = scan.unstacked_shardings(shardings, depths)
            params, state = reader(path, layer_shardings)
            params = jax.jit(scan.stack_layers, out_shardings=shardings)(params)
        else:
            params, state = reader(path, shardings)
        return LoadedCheckpoint(fmt, config or config_from_params(params), params, None, None, state["step"])
    checkpoint_dir, step, run_dir = _flan_jax_step_dir(path, step)
    ckpt = ckpt_lib.open_for_reading(checkpoint_dir)
    saved_config = config_from_dict(ckpt.meta(step)["model_config"])
    config = config or saved_config
    same_layout = saved_config.scan_layers == config.scan_layers
    abstract = _abstract(ckpt, step, shardings) if shardings is not None and same_layout else None
    params, meta = ckpt.restore_params(step, abstract)
    ckpt.close()
    if not same_layout:
        params = _place(scan.to_layout(params, config.scan_layers), shardings)
    return LoadedCheckpoint(fmt, config, params, meta.get("vocabulary"), run_dir, step)


def _abstract(ckpt: ckpt_lib.Checkpointer, step: int, shardings: PyTree) -> PyTree:
    tree = ckpt.manager.item_metadata(step)["params"]
    return jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings)


def _place(params: PyTree, shardings: PyTree | None) -> PyTree:
    if shardings is None:
        return params
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def config_from_dict(fields: dict) -> T5Config:
    """Rebuilds a T5Config from its JSON form in a flan-jax checkpoint."""
    known = {f.name for f in dataclasses.fields(T5Config)}
    unknown = set(fields) - known
    if unknown:
        raise UserError(f"checkpoint model_config has unknown fields {sorted(unknown)}")
    return T5Config(**fields)


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
    meta = {"step": step, "model_config": dataclasses.asdict(config), "vocabulary": vocab_record}
    ckpt.save(step, params, None, meta)
    ckpt.wait()
    ckpt.close()
    return directory


def vocab_file_of(loaded: LoadedCheckpoint) -> str | None:
    """The SentencePiece file a loaded checkpoint carries, if any."""
    record = loaded.vocab_record or {}
    if record.get("type") != "sentencepiece" or not loaded.vocab_dir:
        return None
    return os.path.join(loaded.vocab_dir, record["file"])
