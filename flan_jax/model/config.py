"""Hyperparameters of the T5 encoder-decoder (field names follow T5X's T5Config)."""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp


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

    def __post_init__(self) -> None:
        # gin and JSON may hand over lists; a tuple keeps the config hashable.
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)
