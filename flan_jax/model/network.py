"""The T5 encoder-decoder, with T5X's parameter tree and call signature.

Layer stacks run either as a Python loop (`encoder/layers_0`, `layers_1`, ...)
or, with `T5Config.scan_layers`, under `nn.scan` with the parameters of all
layers stacked along a leading 'layers' axis (`encoder/layers/...`), like
T5X's `examples/scalable_t5`; `flan_jax.model.scan` converts between the two
trees. Either way each layer can be rematerialised (`T5Config.remat_policy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flan_jax.model import attention, layers
from flan_jax.model.config import T5Config
from flan_jax.model.prompt import Prompt

Array = jax.Array
constrain = layers.constrain


def _dropout(config: T5Config) -> nn.Dropout:
    # Like T5X: one dropout mask per example, shared along the length axis.
    return nn.Dropout(rate=config.dropout_rate, broadcast_dims=(-2,))


def _norm(config: T5Config, name: str) -> layers.RMSNorm:
    return layers.RMSNorm(epsilon=config.layer_norm_epsilon, dtype=config.activation_dtype, name=name)


def _attention(config: T5Config, name: str, causal: bool = False) -> attention.MultiHeadDotProductAttention:
    return attention.MultiHeadDotProductAttention(
        num_heads=config.num_heads,
        head_dim=config.head_dim,
        dtype=config.activation_dtype,
        dropout_rate=config.dropout_rate,
        float32_logits=config.float32_attention_logits,
        fused=config.fused_attention,
        causal=causal,
        kernel=config.attention_kernel,
        max_segments=config.max_segments_per_row,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
        lora=config.lora,
        name=name,
    )


def _mlp(config: T5Config) -> layers.MlpBlock:
    return layers.MlpBlock(
        mlp_dim=config.mlp_dim,
        activations=config.mlp_activations,
        dtype=config.activation_dtype,
        dropout_rate=config.dropout_rate,
        lora=config.lora,
        name="mlp",
    )


# What each remat policy keeps for the backward pass; everything else is recomputed.
_REMAT_POLICIES: dict[str, Callable[..., bool]] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Outputs of the weight matmuls (no batch dimension in the contraction);
    # attention scores, norms and activations are recomputed.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_stack(
    config: T5Config,
    layer: type[nn.Module],
    num_layers: int,
    num_args: int,
    static_args: tuple[int, ...],
    decode: bool = False,
) -> Callable[..., Array]:
    """A callable running `num_layers` copies of `layer` on x; call it inside a
    compact method as `stack(x, *args)`.

    `layer(config)(x, *args)` must return (x, None), the form `nn.scan` wants.
    `args` (num_args of them) are the same for every layer; those at the
    positions `static_args` (counted from x = 0) are Python values.
    `decode`: one decoding step. No remat (nothing is differentiated, and the
    cache is mutated), and a scanned stack is unrolled: a step is small, and
    under a loop over layers XLA slices every layer's weights and caches
    inside each step (t5.1.1-small on CPU: 76 ms a step scanned, 16 ms
    unrolled with the kernels cast once, see `decoding.prepare_decoder`).
    """
    if not decode and config.remat_policy != "none":
        # prevent_cse=False is safe under scan and lets XLA optimise more.
        layer = nn.remat(
            layer, policy=_REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers,
            static_argnums=tuple(i + 1 for i in static_args),  # + 1: nn.remat counts the module itself
        )
    if config.scan_layers:
        scanned = nn.scan(
            layer,
            variable_axes={"params": 0, "cache": 0, attention.CROSS_CACHE: 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * num_args,
            length=num_layers,
            unroll=num_layers if decode else min(config.scan_unroll, num_layers),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(config, name="layers")
        return lambda x, *args: scanned(x, *args)[0]

    layers = [layer(config, name=f"layers_{i}") for i in range(num_layers)]

    def run(x: Array, *args: Any) -> Array:
        for lyr in layers:
            x = lyr(x, *args)[0]
        return x

    return run


def _relpos(config: T5Config) -> layers.RelativePositionBiases:
    return layers.RelativePositionBiases(
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
        num_heads=config.num_heads,
        name="relpos_bias",
    )


def _uses_kernel(config: T5Config, decode: bool) -> bool:
    """Whether attention goes through a kernel taking `Segments` and the bias
    table (decoding steps keep the einsum path and its kv cache)."""
    return config.attention_kernel != "xla" and not decode


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and MLP blocks with residuals."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, mask: Array, bias: Array, deterministic: bool) -> tuple[Array, None]:
        """x [b, l, e], mask [b, 1, l, l], bias [1, h, l, l] -> ([b, l, e], None)."""
        cfg = self.config
        y = _norm(cfg, "pre_attention_layer_norm")(x)
        y = _attention(cfg, "attention")(y, y, mask, bias, deterministic=deterministic)
        x = x + _dropout(cfg)(y, deterministic=deterministic)
        y = _norm(cfg, "pre_mlp_layer_norm")(x)
        y = _mlp(cfg)(y, deterministic=deterministic)
        x = x + _dropout(cfg)(y, deterministic=deterministic)
        return constrain(x, ("batch", "length", "embed")), None


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention and MLP blocks."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array,
        self_mask: Array | None,
        cross_mask: Array,
        bias: Array,
        deterministic: bool,
        decode: bool,
        cache_length: int | None,
    ) -> tuple[Array, None]:
        """x [b, q, e], encoded [b, k, e], self_mask [b, 1, q, q] (None when
        decoding), cross_mask [b, 1, q, k], bias [1, h, q, q] -> ([b, q, e], None)."""
        cfg = self.config
        y = _norm(cfg, "pre_self_attention_layer_norm")(x)
        y = _attention(cfg, "self_attention", causal=True)(
            y, y, self_mask, bias, deterministic=deterministic, decode=decode, cache_length=cache_length
        )
        x = x + _dropout(cfg)(y, deterministic=deterministic)
        y = _norm(cfg, "pre_cross_attention_layer_norm")(x)
        y = _attention(cfg, "encoder_decoder_attention")(
            y, encoded, cross_mask, None, deterministic=deterministic, decode=decode
        )
        x = x + _dropout(cfg)(y, deterministic=deterministic)
        y = _norm(cfg, "pre_mlp_layer_norm")(x)
        y = _mlp(cfg)(y, deterministic=deterministic)
        x = x + _dropout(cfg)(y, deterministic=deterministic)
        return constrain(x, ("batch", "length", "embed")), None


class Encoder(nn.Module):
    """Token embedding, encoder layers and final norm."""

    config: T5Config
    shared_embedding: layers.Embed

    @nn.compact
    def __call__(self, tokens: Array, mask: Array, segment_ids: Array | None = None, *, deterministic: bool) -> Array:
        """tokens [b, l], mask [b, 1, l, l] (or `Segments` for the attention
        kernels), segment_ids [b, l] of packed rows -> encoded [b, l, e].

        With `prompt_length` P, every segment's first P tokens are prompt
        slots whose embeddings become the learned prompt (`model/prompt.py`)."""
        cfg = self.config
        x = self.shared_embedding(tokens.astype(jnp.int32))
        if cfg.prompt_length:
            x = Prompt(cfg.prompt_length, name="prompt")(x, tokens, segment_ids, self.shared_embedding.embedding)
        x = _dropout(cfg)(x, deterministic=deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        length = tokens.shape[-1]
        bias = _relpos(cfg)(length, length, bidirectional=True, as_table=_uses_kernel(cfg, decode=False))
        stack = layer_stack(cfg, EncoderLayer, cfg.num_encoder_layers, num_args=3, static_args=(3,))
        x = stack(x, mask, bias, deterministic)
        x = _norm(cfg, "encoder_norm")(x)
        return _dropout(cfg)(x, deterministic=deterministic)


class Decoder(nn.Module):
    """Token embedding, decoder layers, final norm and output logits."""

    config: T5Config
    shared_embedding: layers.Embed

    @nn.compact
    def __call__(
        self,
        encoded: Array,
        tokens: Array,
        self_mask: Array | None,
        cross_mask: Array,
        *,
        deterministic: bool,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        """encoded [b, k, e], tokens [b, q] -> logits [b, q, v] float32."""
        cfg = self.config
        x = self.shared_embedding(tokens.astype(jnp.int32))
        x = _dropout(cfg)(x, deterministic=deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        if decode:
            if max_decode_length is None:
                raise ValueError("decode=True needs max_decode_length")
            # The whole [L, L] table; each self-attention takes its current row.
            length = max_decode_length
        else:
            length = tokens.shape[-1]
        bias = _relpos(cfg)(length, length, bidirectional=False, as_table=_uses_kernel(cfg, decode))
        stack = layer_stack(cfg, DecoderLayer, cfg.num_decoder_layers, num_args=7, static_args=(5, 6, 7), decode=decode)
        x = stack(x, encoded, self_mask, cross_mask, bias, deterministic, decode, max_decode_length)
        x = _norm(cfg, "decoder_norm")(x)
        x = _dropout(cfg)(x, deterministic=deterministic)
        if cfg.logits_via_embedding:
            # Tied output layer: rescale like Mesh TF T5 / HF do.
            logits = self.shared_embedding.attend(x) * cfg.emb_dim**-0.5
        else:
            logits = layers.Dense(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.float32, name="logits_dense")(x)
        return constrain(logits, ("batch", "length", "vocab"))


class Transformer(nn.Module):
    """T5 encoder-decoder (T5X's `network.Transformer`).

    Token id 0 is padding and the decoder start id. Packed rows carry
    `*_segment_ids` (1, 2, ...; 0 = padding) that keep examples apart.
    `*_positions` are accepted for T5X compatibility; relative offsets inside
    a contiguous packed example equal those of the example alone, so the
    biases are the same without them. With `T5Config.prompt_length` P, the
    first P tokens of every encoder segment are prompt slots (`model/prompt.py`).
    """

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.activation_dtype)
        self.encoder = Encoder(cfg, shared_embedding=self.token_embedder)
        self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)

    def encode(
        self,
        encoder_input_tokens: Array,
        encoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        *,
        enable_dropout: bool = True,
    ) -> Array:
        """encoder_input_tokens [b, k] -> encoded [b, k, e]."""
        del encoder_positions  # see the class docstring
        valid = encoder_input_tokens > 0
        if _uses_kernel(self.config, decode=False):
            segments = layers.kernel_segments(valid, encoder_segment_ids)
            return self.encoder(
                encoder_input_tokens, layers.Segments(segments, segments), encoder_segment_ids,
                deterministic=not enable_dropout,
            )
        mask = layers.padding_mask(valid, valid)
        if encoder_segment_ids is not None:
            mask &= layers.segment_mask(encoder_segment_ids, encoder_segment_ids)
        return self.encoder(encoder_input_tokens, mask, encoder_segment_ids, deterministic=not enable_dropout)

    def decode(
        self,
        encoded: Array,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        decoder_positions: Array | None = None,
        *,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        """Decoder logits [b, q, v] float32 for decoder_input_tokens [b, q].

        With `decode=True` it runs one step per call against the 'cache'
        collection (see `flan_jax.decoding`); masks then come from the cache.
        """
        del decoder_positions  # see the class docstring
        encoder_valid = encoder_input_tokens > 0
        if (encoder_segment_ids is None) != (decoder_segment_ids is None) and not decode:
            raise ValueError("pass both encoder_segment_ids and decoder_segment_ids, or neither")
        if decode:
            self_mask = None
            cross_mask = layers.padding_mask(jnp.ones_like(decoder_input_tokens, jnp.bool_), encoder_valid)
        elif _uses_kernel(self.config, decode):
            decoder_ids = layers.kernel_segments(decoder_target_tokens > 0, decoder_segment_ids)
            encoder_ids = layers.kernel_segments(encoder_valid, encoder_segment_ids)
            self_mask = layers.Segments(decoder_ids, decoder_ids)  # causal: inside the kernel
            cross_mask = layers.Segments(decoder_ids, encoder_ids)
        else:
            # Like T5X, validity comes from the targets: inputs start with id 0.
            valid = decoder_target_tokens > 0
            self_mask = layers.padding_mask(valid, valid) & layers.causal_mask(decoder_target_tokens.shape[-1])
            cross_mask = layers.padding_mask(valid, encoder_valid)
            if decoder_segment_ids is not None:
                self_mask &= layers.segment_mask(decoder_segment_ids, decoder_segment_ids)
                cross_mask &= layers.segment_mask(decoder_segment_ids, encoder_segment_ids)
        return self.decoder(
            encoded,
            decoder_input_tokens,
            self_mask,
            cross_mask,
            deterministic=not enable_dropout,
            decode=decode,
            max_decode_length=max_decode_length,
        )

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        decoder_positions: Array | None = None,
        *,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        """Teacher-forced logits [b, q, v] float32."""
        encoded = self.encode(
            encoder_input_tokens, encoder_segment_ids, encoder_positions, enable_dropout=enable_dropout
        )
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            decoder_positions,
            enable_dropout=enable_dropout,
            decode=decode,
            max_decode_length=max_decode_length,
        )
