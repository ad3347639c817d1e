"""Hyperparameters of the T5 encoder-decoder (field names follow T5X's T5Config)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import gin
import jax.numpy as jnp

from flan_jax import errors
from flan_jax.model.attention import ATTENTION_KERNELS
from flan_jax.model import layers
from flan_jax.model.lora import LoraConfig


REMAT_POLICIES = ("none", "full", "dots")



def _is_float_dtype(name: object) -> bool:
    try:
        return isinstance(name, str) and jnp.issubdtype(jnp.dtype(name), jnp.floating)
    except (TypeError, ValueError):  # jnp.dtype's answers to names it does not know
        return False


FLOAT_DTYPE = errors.Check("a floating-point dtype name such as 'float32' or 'bfloat16'", _is_float_dtype)
ACTIVATIONS = errors.Check(
    f"a non-empty list of activations from {', '.join(map(repr, layers.ACTIVATIONS))}",
    lambda v: (isinstance(v, (list, tuple)) and bool(v)
               and all(isinstance(a, str) and a in layers.ACTIVATIONS for a in v)),
)


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
    # Attention in training and scoring (decoding steps keep the einsum path):
    # "xla" (the einsum or `fused_attention` path, folding the packing mask into
    # a [batch, heads, q, k] bias), "pallas" (flan-jax's flash-attention kernel,
    # `model/pallas_attention.py`: the T5 bias made in the kernel from the
    # bucket table, packing as segment ids) or "cudnn" (cuDNN's packed layout
    # via JAX's private fused-attention API; XLA with a warning where absent).
    attention_kernel: str = "xla"
    # The "cudnn" route's bound M on the examples packed in one row: cuDNN takes
    # M segment slots per row and keeps softmax statistics [batch * M, heads,
    # length] per layer for the backward pass. 0: each attention call's
    # shorter side (encoder self-attention: the inputs length); training sets
    # it to min(task_feature_lengths) (`with_segment_bound`): every packed
    # example holds at least one token (its EOS) of each feature. Rows with
    # more examples than M give NaN attention outputs (the trainer checks its
    # batches first and stops with a clear error). M is at least 2.
    max_segments_per_row: int = 0
    # Layers per iteration of the scanned layer loop (`scan_layers`): 1 is a
    # plain loop; num_layers or more unrolls it fully. The parameter tree stays
    # stacked either way; unrolling trades compile time for the loop's
    # per-iteration slicing of the stacked weights.
    scan_unroll: int = 1
    # Parameter-efficient finetuning (`flan_jax.peft`): LoRA adapters, and/or
    # `prompt_length` learned prompt vectors in front of every encoder input
    # (prompt tuning). With either, only they are trained; the other
    # ("frozen") parameters are held in `frozen_dtype`.
    lora: LoraConfig | None = None
    prompt_length: int = 0
    frozen_dtype: str = "float32"

    def __post_init__(self) -> None:
        errors.require_fields(
            self, vocab_size=errors.POSITIVE_INT, dtype=FLOAT_DTYPE, emb_dim=errors.POSITIVE_INT,
            num_heads=errors.POSITIVE_INT, num_encoder_layers=errors.POSITIVE_INT,
            num_decoder_layers=errors.POSITIVE_INT, head_dim=errors.POSITIVE_INT, mlp_dim=errors.POSITIVE_INT,
            mlp_activations=ACTIVATIONS, dropout_rate=errors.FRACTION, logits_via_embedding=errors.BOOL,
            float32_attention_logits=errors.BOOL, relative_attention_num_buckets=errors.POSITIVE_INT,
            relative_attention_max_distance=errors.POSITIVE_INT, layer_norm_epsilon=errors.POSITIVE_NUMBER,
            scan_layers=errors.BOOL, remat_policy=errors.one_of(*REMAT_POLICIES), fused_attention=errors.BOOL,
            attention_kernel=errors.one_of(*ATTENTION_KERNELS), scan_unroll=errors.POSITIVE_INT,
            prompt_length=errors.NON_NEGATIVE_INT, frozen_dtype=FLOAT_DTYPE,
            max_segments_per_row=errors.NON_NEGATIVE_INT,
        )
        if isinstance(self.lora, dict):  # the JSON form in a checkpoint's metadata
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        elif self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise errors.UserError(f"T5Config.lora={self.lora!r}: expected @LoraConfig() or None")
        # gin and JSON may hand over lists; a tuple keeps the config hashable.
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))

    @property
    def has_adapters(self) -> bool:
        """Whether only adapters (LoRA, prompt) are trained and the rest is frozen."""
        return self.lora is not None or self.prompt_length > 0

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def with_segment_bound(config: T5Config, feature_lengths: Mapping[str, int]) -> T5Config:
    """`config` with `max_segments_per_row` = min(feature_lengths) where it is 0
    (auto) and the attention kernel is "cudnn": each packed example holds at
    least one token of every feature, so no row holds more examples."""
    if config.attention_kernel != "cudnn" or config.max_segments_per_row:
        return config
    return dataclasses.replace(config, max_segments_per_row=min(feature_lengths.values()))
