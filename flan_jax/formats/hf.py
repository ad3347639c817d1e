"""Hugging Face T5 directories <-> flan-jax params (T5X names).

One name table drives both directions. HF linear weights are [out, in] and
our kernels [in, out]; HF keeps the relative attention bias [buckets, heads]
in block 0 of each stack, we keep `relpos_bias/rel_embedding` [heads, buckets].
Neither side scales queries by 1/sqrt(head_dim) at run time, so the same
numbers give the same network.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from flan_jax import errors
from flan_jax.errors import UserError
from flan_jax.formats.torch_pickle import load_torch_state_dict
from flan_jax.model import T5Config, scan

Params = dict[str, Any]
# (path in our params tree, HF tensor name, transpose?)
NameRow = tuple[tuple[str, ...], str, bool]

_ATTENTION = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))
_FEED_FORWARD = {("gelu", "linear"): "gated-gelu", ("silu", "linear"): "gated-silu", ("relu",): "relu", ("gelu",): "gelu"}


def _mlp_rows(ours: tuple[str, ...], theirs: str, config: T5Config) -> Iterator[NameRow]:
    n = len(config.mlp_activations)
    names = ["wi"] if n == 1 else [f"wi_{i}" for i in range(n)]
    for name in [*names, "wo"]:
        yield (*ours, "mlp", name, "kernel"), f"{theirs}.DenseReluDense.{name}.weight", True


def _attention_rows(ours: tuple[str, ...], theirs: str) -> Iterator[NameRow]:
    for our_name, hf_name in _ATTENTION:
        yield (*ours, our_name, "kernel"), f"{theirs}.{hf_name}.weight", True


def name_table(config: T5Config) -> list[NameRow]:
    """Every parameter of `Transformer(config)` with its HF name."""
    rows: list[NameRow] = [(("token_embedder", "embedding"), "shared.weight", False)]
    for stack in ("encoder", "decoder"):
        rows.append(((stack, "relpos_bias", "rel_embedding"), f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True))
        rows.append(((stack, f"{stack}_norm", "scale"), f"{stack}.final_layer_norm.weight", False))
    for i in range(config.num_encoder_layers):
        ours, theirs = ("encoder", f"layers_{i}"), f"encoder.block.{i}.layer"
        rows.append(((*ours, "pre_attention_layer_norm", "scale"), f"{theirs}.0.layer_norm.weight", False))
        rows.extend(_attention_rows((*ours, "attention"), f"{theirs}.0.SelfAttention"))
        rows.append(((*ours, "pre_mlp_layer_norm", "scale"), f"{theirs}.1.layer_norm.weight", False))
        rows.extend(_mlp_rows(ours, f"{theirs}.1", config))
    for i in range(config.num_decoder_layers):
        ours, theirs = ("decoder", f"layers_{i}"), f"decoder.block.{i}.layer"
        rows.append(((*ours, "pre_self_attention_layer_norm", "scale"), f"{theirs}.0.layer_norm.weight", False))
        rows.extend(_attention_rows((*ours, "self_attention"), f"{theirs}.0.SelfAttention"))
        rows.append(((*ours, "pre_cross_attention_layer_norm", "scale"), f"{theirs}.1.layer_norm.weight", False))
        rows.extend(_attention_rows((*ours, "encoder_decoder_attention"), f"{theirs}.1.EncDecAttention"))
        rows.append(((*ours, "pre_mlp_layer_norm", "scale"), f"{theirs}.2.layer_norm.weight", False))
        rows.extend(_mlp_rows(ours, f"{theirs}.2", config))
    if not config.logits_via_embedding:
        rows.append((("decoder", "logits_dense", "kernel"), "lm_head.weight", True))
    return rows


def param_shapes(config: T5Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shape of every parameter of `Transformer(config)`, unrolled layout, by path in the params tree."""
    e, v, m = config.emb_dim, config.vocab_size, config.mlp_dim
    hd = config.num_heads * config.head_dim
    by_owner = {
        "embedding": (v, e), "rel_embedding": (config.num_heads, config.relative_attention_num_buckets),
        "scale": (e,), "query": (e, hd), "key": (e, hd), "value": (e, hd), "out": (hd, e),
        "wo": (m, e), "logits_dense": (e, v),
    }
    shapes = {}
    for path, _, _ in name_table(config):
        owner = path[-2] if path[-1] == "kernel" else path[-1]
        shapes[path] = (e, m) if owner.startswith("wi") else by_owner[owner]
    return shapes


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: T5Config, source: str = "HF checkpoint") -> Params:
    """Maps HF tensors (numpy arrays) to the nested params tree, scanned or
    unrolled as `config` says; errors name `source`, the tensor and the shapes."""
    sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    shapes = param_shapes(config)
    params: Params = {}
    for path, name, transpose in name_table(config):
        if name not in sd:
            raise UserError(f"{source} has no tensor {name!r} (needed for {'/'.join(path)})")
        value = np.asarray(sd[name])
        want = shapes[path][::-1] if transpose else shapes[path]  # in HF's orientation, as the file has it
        if value.shape != want:
            raise UserError(
                f"{source}: tensor {name!r} ({'/'.join(path)}) has shape {value.shape}, which does not fit "
                f"the config: want {want}"
            )
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.T if transpose else value
    return scan.to_layout(params, config.scan_layers)


def hf_state_dict_from_params(params: Params, config: T5Config) -> dict[str, np.ndarray]:
    """The inverse of params_from_hf_state_dict (tied embeddings written once, as HF does)."""
    params = scan.to_layout(params, scanned=False)
    out = {}
    for path, name, transpose in name_table(config):
        node = params
        for key in path:
            node = node[key]
        value = np.asarray(node)
        out[name] = np.ascontiguousarray(value.T if transpose else value)
    return out


# --- config.json ----------------------------------------------------------------


_REQUIRED_KEYS = {
    key: errors.POSITIVE_INT for key in ("vocab_size", "d_model", "num_heads", "num_layers", "d_kv", "d_ff")
}
_OPTIONAL_KEYS = {
    "num_decoder_layers": errors.optional(errors.POSITIVE_INT),  # None: as many as the encoder
    "relative_attention_num_buckets": errors.POSITIVE_INT,
    "relative_attention_max_distance": errors.POSITIVE_INT,
    "dropout_rate": errors.FRACTION,
    "layer_norm_epsilon": errors.POSITIVE_NUMBER,
    "feed_forward_proj": errors.one_of(*_FEED_FORWARD.values()),
    "tie_word_embeddings": errors.BOOL,
    "scale_decoder_outputs": errors.BOOL,
    "model_type": errors.one_of("t5"),
}


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> T5Config:
    """T5Config from a HF T5 `config.json` dict; a UserError naming `source` and the key for a bad value."""
    for key, check in _REQUIRED_KEYS.items():
        if key not in hf:
            raise UserError(f"{source}: no {key!r} (expected {check.expected})")
    for key, check in {**_REQUIRED_KEYS, **_OPTIONAL_KEYS}.items():
        if key in hf:
            errors.require(f"{source}: {key}", hf[key], check)
    activations = {name: acts for acts, name in _FEED_FORWARD.items()}[hf.get("feed_forward_proj", "relu")]
    return T5Config(
        vocab_size=hf["vocab_size"],
        emb_dim=hf["d_model"],
        num_heads=hf["num_heads"],
        num_encoder_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        head_dim=hf["d_kv"],
        mlp_dim=hf["d_ff"],
        mlp_activations=activations,
        dropout_rate=hf.get("dropout_rate", 0.1),
        logits_via_embedding=_tied_and_scaled(hf),
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
    )


def _tied_and_scaled(hf: Mapping[str, Any]) -> bool:
    """Original T5 (tied output, logits scaled by d_model**-0.5) or v1.1 (untied, unscaled)?

    Configs written by transformers < 5 say so with `tie_word_embeddings`;
    transformers 5 always writes True there and keeps the distinction in
    `scale_decoder_outputs` (it unties the output layer when the weights differ).
    """
    if "scale_decoder_outputs" in hf:
        return bool(hf["scale_decoder_outputs"])
    return bool(hf.get("tie_word_embeddings", True))


def config_to_hf(config: T5Config) -> dict[str, Any]:
    """A HF `config.json` dict for T5ForConditionalGeneration."""
    proj = _FEED_FORWARD.get(tuple(config.mlp_activations))
    if proj is None:
        raise UserError(f"no HF feed_forward_proj for mlp_activations {config.mlp_activations}")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": proj,
        # Read by every transformers version (5.x maps False to scale_decoder_outputs=False).
        "tie_word_embeddings": config.logits_via_embedding,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "use_cache": True,
    }


# --- directories ---------------------------------------------------------------


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def read_json_object(path: str) -> dict[str, Any]:
    """A JSON file holding an object; a UserError naming the file otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """{name: array} of a safetensors file; a UserError naming the file if it cannot be read."""
    try:
        return safetensors.numpy.load_file(path)
    # TypeError: a dtype numpy lacks (bfloat16 files); KeyError: one the reader does not know.
    except (safetensors.SafetensorError, OSError, TypeError, KeyError) as e:
        raise UserError(f"{path}: not a readable safetensors file: {type(e).__name__}: {e}") from e


def load_state_dict(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a HF model directory: safetensors (single or sharded) or pytorch_model.bin."""
    join = lambda name: os.path.join(directory, name)  # noqa: E731
    for weights, index, reader in (
        ("model.safetensors", "model.safetensors.index.json", read_safetensors),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", load_torch_state_dict),
    ):
        if os.path.isfile(join(weights)):
            return dict(reader(join(weights)))
        if os.path.isfile(join(index)):
            weight_map = read_json_object(join(index)).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{join(index)}: expected a 'weight_map' object of tensor name -> shard file")
            state: dict[str, np.ndarray] = {}
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(join(shard)):
                    raise UserError(f"{join(index)} names shard {shard!r}, which is missing")
                state.update(reader(join(shard)))
            return state
    raise UserError(
        f"{directory}: no weights found (looked for model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin, pytorch_model.bin.index.json)"
    )


def read_hf_config(directory: str) -> tuple[T5Config, str | None]:
    """(config, path of spiece.model or None) of a HF T5 directory, its weights unread."""
    config_path = os.path.join(directory, "config.json")
    config = config_from_hf(read_json_object(config_path), source=config_path)
    vocab = os.path.join(directory, "spiece.model")
    return config, vocab if os.path.isfile(vocab) else None


def load_hf_directory(directory: str) -> tuple[T5Config, Params, str | None]:
    """(config, params, path of spiece.model or None) of a HF T5 directory."""
    config, vocab = read_hf_config(directory)
    return config, params_from_hf_state_dict(load_state_dict(directory), config, source=directory), vocab


def save_hf_directory(directory: str, params: Params, config: T5Config, vocab_file: str | None) -> None:
    """Writes config.json, model.safetensors and spiece.model for transformers' from_pretrained."""
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.astype(np.float32) for k, v in hf_state_dict_from_params(params, config).items()}
    safetensors.numpy.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
    if vocab_file:
        shutil.copyfile(vocab_file, os.path.join(directory, "spiece.model"))
