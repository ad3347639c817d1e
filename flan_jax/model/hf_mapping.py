"""Hugging Face `T5ForConditionalGeneration` weights -> our (T5X-named) params.

Takes a plain dict of numpy arrays (e.g. from `safetensors.numpy.load_file`
or `{k: v.numpy() for k, v in model.state_dict().items()}`), so importing
checkpoints needs neither torch nor transformers. The same weights give the
same outputs: neither side scales queries by 1/sqrt(head_dim) at run time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from flan_jax.model.config import T5Config

_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}


def _mlp_names(config: T5Config) -> list[str]:
    n = len(config.mlp_activations)
    return ["wi"] if n == 1 else [f"wi_{i}" for i in range(n)]


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: T5Config) -> dict[str, Any]:
    """Maps HF T5 tensors to the nested `params` tree of `Transformer(config)`.

    HF linear weights are [out, in] and become [in, out] kernels; the relative
    attention bias (HF keeps it in block 0 of each stack) [buckets, heads]
    becomes `relpos_bias/rel_embedding` [heads, buckets]. Raises KeyError on a
    missing tensor and ValueError on a shape that does not fit `config`.
    """
    sd = {k.removeprefix("model."): v for k, v in state_dict.items()}

    def get(name: str) -> np.ndarray:
        if name not in sd:
            raise KeyError(f"HF state dict has no {name!r}")
        return np.asarray(sd[name], dtype=np.float32)

    def kernel(name: str) -> dict[str, np.ndarray]:
        return {"kernel": get(name).T}

    def scale(name: str) -> dict[str, np.ndarray]:
        return {"scale": get(name)}

    def attention(prefix: str) -> dict[str, Any]:
        return {ours: kernel(f"{prefix}.{theirs}.weight") for theirs, ours in _ATTENTION.items()}

    def mlp(prefix: str) -> dict[str, Any]:
        return {name: kernel(f"{prefix}.DenseReluDense.{name}.weight") for name in [*_mlp_names(config), "wo"]}

    embedding_key = "shared.weight" if "shared.weight" in sd else "encoder.embed_tokens.weight"
    encoder: dict[str, Any] = {
        "relpos_bias": {"rel_embedding": get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").T},
        "encoder_norm": scale("encoder.final_layer_norm.weight"),
    }
    for i in range(config.num_encoder_layers):
        block = f"encoder.block.{i}.layer"
        encoder[f"layers_{i}"] = {
            "pre_attention_layer_norm": scale(f"{block}.0.layer_norm.weight"),
            "attention": attention(f"{block}.0.SelfAttention"),
            "pre_mlp_layer_norm": scale(f"{block}.1.layer_norm.weight"),
            "mlp": mlp(f"{block}.1"),
        }
    decoder: dict[str, Any] = {
        "relpos_bias": {"rel_embedding": get("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").T},
        "decoder_norm": scale("decoder.final_layer_norm.weight"),
    }
    for i in range(config.num_decoder_layers):
        block = f"decoder.block.{i}.layer"
        decoder[f"layers_{i}"] = {
            "pre_self_attention_layer_norm": scale(f"{block}.0.layer_norm.weight"),
            "self_attention": attention(f"{block}.0.SelfAttention"),
            "pre_cross_attention_layer_norm": scale(f"{block}.1.layer_norm.weight"),
            "encoder_decoder_attention": attention(f"{block}.1.EncDecAttention"),
            "pre_mlp_layer_norm": scale(f"{block}.2.layer_norm.weight"),
            "mlp": mlp(f"{block}.2"),
        }
    if not config.logits_via_embedding:
        decoder["logits_dense"] = kernel("lm_head.weight")
    params = {"token_embedder": {"embedding": get(embedding_key)}, "encoder": encoder, "decoder": decoder}
    _check_shapes(params, config)
    return params


def _check_shapes(params: dict[str, Any], config: T5Config) -> None:
    e, v, m = config.emb_dim, config.vocab_size, config.mlp_dim
    hd, n = config.num_heads * config.head_dim, config.relative_attention_num_buckets
    expected = {
        "embedding": (v, e),
        "rel_embedding": (config.num_heads, n),
        "scale": (e,),
        "query": (e, hd),
        "key": (e, hd),
        "value": (e, hd),
        "out": (hd, e),
        "wo": (m, e),
        "logits_dense": (e, v),
    }

    def visit(tree: dict[str, Any], path: tuple[str, ...]) -> None:
        for name, sub in tree.items():
            if isinstance(sub, dict):
                visit(sub, (*path, name))
                continue
            owner = path[-1] if name == "kernel" else name
            want = (e, m) if owner.startswith("wi") else expected[owner]
            if sub.shape != want:
                raise ValueError(f"{'/'.join((*path, name))}: shape {sub.shape} does not fit the config, want {want}")

    visit(params, ())
