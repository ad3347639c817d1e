"""Hyperparameters of the T5 encoder-decoder (field names follow T5X's T5Config)."""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp


REMAT_POLICIES = ("none", "full", "dots")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder-decoder.

    The defaults are T5 v1.1 (gated-GeLU, untied output layer) at a small-ish
    size with float32 activations; `gin/models/*.gin` binds the published
    sizes. `dtype` is the activation dtype; parameters are always float32.
    """

    vocab_size: int = 32128
    dtype: str = "float32"
    emb_dim: int = 512
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    head_dim: int = 64
    mlp_dim: int = 1024
    # ("gelu", "linear"): T5 v1.1 gated GeLU; ("relu",): original T5.
    mlp_activations: tuple[str, ...] = ("gelu", "linear")
    dropout_rate: float = 0.1
    # Tied output layer (original T5); logits are then scaled by emb_dim**-0.5.
    logits_via_embedding: bool = False
    float32_attention_logits: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # Run each layer stack under `nn.scan` with stacked parameters
    # (`encoder/layers/...` with a leading 'layers' axis): the XLA program
    # holds one layer, so compile time does not grow with depth.
    scan_layers: bool = False
    # Rematerialisation per layer: "none", "full" (recompute everything in
    # the backward pass) or "dots" (keep matmul outputs, recompute the rest).
    remat_policy: str = "none"
    # Attention through `jax.nn.dot_product_attention` (cuDNN's fused kernel on
    # GPUs in bf16, XLA elsewhere) in training and scoring; decoding steps keep
    # the einsum path and its kv cache.
    fused_attention: bool = False

    def __post_init__(self) -> None:
        # gin and JSON may hand over lists; a tuple keeps the config hashable.
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"T5Config.remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)
