"""T5 attention: the multi-head layer (with its decoding cache) and the
kernels it can run on: XLA's einsums, `jax.nn.dot_product_attention` (cuDNN's
fused kernel where available), cuDNN's packed segments, and Pallas.

Shape letters as in `flan_jax.model.layers`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flan_jax.model import cudnn_attention, pallas_attention
from flan_jax.model.layers import (
    Array,
    Dense,
    Dtype,
    Initializer,
    Segments,
    attention_kernel_init,
    constrain,
    segments_mask,
)
from flan_jax.model.lora import LoraConfig
from flan_jax.model.relpos import relative_bias

# Large but finite, so that fully masked rows stay NaN-free.
MASK_VALUE = -1e10
# The decoding collection of cross-attention's projected encoder keys and values.
CROSS_CACHE = "cross_cache"


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    *,
    float32_logits: bool,
) -> Array:
    """softmax(q k^T + bias) v without 1/sqrt(d) (folded into the query init).

    query [b, q, h, d], key/value [b, h, k, d] (heads first, the layout of the
    decoding cache), bias broadcastable to [b, h, q, k] -> [b, q, h, d].
    """
    dtype = query.dtype
    if float32_logits:
        query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bhkd->bhqk", query, key)
    # Bias and softmax in float32: -1e10 masks and small differences survive.
    logits = logits.astype(jnp.float32)
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bhkd->bqhd", weights, value.astype(dtype))


def sum_leading_axis(x: Array) -> Array:
    """x [n, ...] -> [...], summed by halving: elementwise adds that XLA fuses
    into one pass. XLA:CPU's reduce over a leading axis runs 20-50x slower
    (the bias gradient's sum over the batch took 6% of a small model's step)."""
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        summed = x[:half] + x[half : 2 * half]
        x = summed if x.shape[0] % 2 == 0 else summed.at[0].add(x[-1])
    return x[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_over_batch(bias: Array, batch: int) -> Array:
    """bias [1, ...] -> [batch, ...] (XLA fuses the broadcast into its user);
    its gradient sums over the batch with `sum_leading_axis`."""
    return jnp.broadcast_to(bias, (batch, *bias.shape[1:]))


def _broadcast_over_batch_fwd(bias: Array, batch: int) -> tuple[Array, None]:
    return broadcast_over_batch(bias, batch), None


def _broadcast_over_batch_bwd(batch: int, _: None, grad: Array) -> tuple[Array]:
    return (sum_leading_axis(grad)[None],)


broadcast_over_batch.defvjp(_broadcast_over_batch_fwd, _broadcast_over_batch_bwd)


def fused_dot_product_attention(query: Array, key: Array, value: Array, mask: Array | None, bias: Array | None) -> Array:
    """softmax(q k^T + bias, masked) v via `jax.nn.dot_product_attention`.

    query [b, q, h, d], key/value [b, k, h, d] (sequence first, the layout the
    fused kernels take), mask [b, 1, q, k] bool, bias [1, h, q, k] -> [b, q, h, d].
    On GPUs with bf16/fp16 inputs it asks for cuDNN's fused kernel and falls
    back to XLA's implementation where cuDNN refuses the shapes.
    """
    kwargs = dict(bias=None if bias is None else bias.astype(query.dtype), mask=mask, scale=1.0)
    if jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(query, key, value, implementation="cudnn", **kwargs)
        except (NotImplementedError, ValueError, RuntimeError):
            pass
    if jax.default_backend() == "cpu" and bias is not None and bias.shape[0] == 1:
        # Only XLA:CPU reduces slowly; elsewhere halving a batch-sharded array
        # would move data between devices.
        kwargs["bias"] = broadcast_over_batch(kwargs["bias"], query.shape[0])
    return jax.nn.dot_product_attention(query, key, value, implementation="xla", **kwargs)


ATTENTION_KERNELS = ("xla", "pallas", "cudnn")
WARNED: set[str] = set()  # Messages logged once already (a test clears it to see one again).


def _warn_once(message: str) -> None:
    if message not in WARNED:
        WARNED.add(message)
        logging.getLogger(__name__).warning(message)


def cudnn_segment_attention(
    query: Array, key: Array, value: Array, segments: Segments, bias: Array | None, causal: bool,
    max_segments: int = 0,
) -> Array:
    """Segment-aware attention through cuDNN's packed layout where this JAX and
    device support it; otherwise (CPU, float32, or cuDNN refusing the call at
    trace time) `fused_dot_product_attention` on the equivalent mask, with a
    one-time warning. Shapes as in `fused_dot_product_attention`; `max_segments`
    as in `segment_bound`. A rejection when the step compiles is
    `flan_jax.step.FallbackJit`'s to handle."""
    reason = None
    if jax.default_backend() != "gpu" or query.dtype not in (jnp.bfloat16, jnp.float16):
        reason = f"needs a GPU and bf16/fp16 (have {jax.default_backend()}, {query.dtype})"
    else:
        try:
            return cudnn_attention.packed_attention(query, key, value, segments, bias, causal, max_segments)
        except (ImportError, AttributeError, TypeError, ValueError, NotImplementedError, RuntimeError) as e:
            reason = f"{type(e).__name__}: {e}"
    _warn_once(f"attention_kernel='cudnn' is not available here ({reason}); using XLA's attention")
    return fused_dot_product_attention(query, key, value, segments_mask(segments, causal), bias)


def kernel_attention(
    kernel: str, query: Array, key: Array, value: Array, segments: Segments, table: Array | None, *,
    causal: bool, num_buckets: int, max_distance: int, max_segments: int = 0,
) -> Array:
    """Attention outside decoding through `kernel`, "pallas" or "cudnn": query
    [b, q, h, d], key/value [b, k, h, d], the bias as the [h, n] bucket table
    (None: cross-attention), bidirectional unless causal (T5: encoder vs
    decoder self-attention) -> [b, q, h, d]. `max_segments` as in
    `cudnn_attention.segment_bound`."""
    if kernel == "pallas":
        return pallas_attention.t5_attention(
            query, key, value, segments.query, segments.key, table,
            causal=causal, num_buckets=num_buckets, max_distance=max_distance,
        )
    bias = None
    if table is not None:
        bias = relative_bias(table, query.shape[1], key.shape[1], not causal, num_buckets, max_distance)
    return cudnn_segment_attention(query, key, value, segments, bias, causal, max_segments)


class MultiHeadDotProductAttention(nn.Module):
    """T5 attention with fused-head kernels [e, h*d] ('embed', 'joined_kv').

    Keys and values are kept heads-first, [b, h, k, d], so the attention
    products need no transpose of the (growing) cache at each decoding step.
    Decode mode (`decode=True`) keeps two collections:
      * 'cache' (`causal=True`, decoder self-attention): `cached_key`/
        `cached_value` [b, h, L, d] and `cache_index`; each call appends one token.
      * CROSS_CACHE (`causal=False`, cross-attention): `projected_key`/
        `projected_value`, the projections of `inputs_kv`, written by the call
        that creates the caches and only read afterwards. Steps pass it
        immutable, so a scanned stack does not copy it out again every step
        (that copy tripled the cost of a small model's decoding step).
    The call that creates the caches writes nothing else; use
    `flan_jax.decoding.prepare_decoder`, which makes them with the real encoder
    output.
    """

    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    float32_logits: bool = False
    # Use fused_dot_product_attention outside decoding.
    fused: bool = False
    causal: bool = False
    kernel_init: Initializer = attention_kernel_init
    # Outside decoding, "pallas" or "cudnn" take the mask as `Segments` and the
    # bias as the [h, n] bucket table (see `_kernel_attention`).
    kernel: str = "xla"
    # The "cudnn" route's slots per row (`segment_bound`; 0: the shorter side's length).
    max_segments: int = 0
    num_buckets: int = 32
    max_distance: int = 128
    lora: LoraConfig | None = None

    def _project(self, name: str, x: Array, kernel_init: Initializer, deterministic: bool = True) -> Array:
        """[b, l, e] -> [b, l, h, d]."""
        dense = Dense(self.num_heads * self.head_dim, ("embed", "joined_kv"), kernel_init, self.dtype, self.lora, name=name)
        y = dense(x, deterministic)
        y = y.reshape(*y.shape[:-1], self.num_heads, self.head_dim)
        return constrain(y, ("batch", "length", "heads", "kv"))

    def _project_heads_first(self, name: str, x: Array, deterministic: bool = True) -> Array:
        """[b, k, e] -> [b, h, k, d] (keys and values)."""
        return self._project(name, x, self.kernel_init, deterministic).transpose(0, 2, 1, 3)

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        mask: Array | None = None,
        bias: Array | None = None,
        *,
        deterministic: bool = True,
        decode: bool = False,
        cache_length: int | None = None,
    ) -> Array:
        """inputs_q [b, q, e], inputs_kv [b, k, e], mask [b, 1, q, k] bool,
        bias [1|b, h, q, k] (decode: [1|b, h, L, L]) -> [b, q, e].
        With `kernel` "pallas"/"cudnn" and not decoding: mask `Segments`, bias
        the bucket table [h, n] or None."""
        base_init = self.kernel_init
        depth_scaling = self.head_dim**-0.5

        def query_init(*args: Any) -> Array:
            # T5X folds 1/sqrt(head_dim) into the initial query kernel.
            return base_init(*args) * depth_scaling

        query = self._project("query", inputs_q, query_init, deterministic)
        keep = self._value_dropout(inputs_kv.shape[:2], deterministic)  # [b, h, k, 1] or None
        if self.kernel != "xla" and not decode:
            key = self._project("key", inputs_kv, self.kernel_init, deterministic)  # [b, k, h, d]
            value = self._project("value", inputs_kv, self.kernel_init, deterministic)
            if keep is not None:
                value = value * keep.transpose(0, 2, 1, 3)
            return self._output(self._kernel_attention(query, key, value, mask, bias), inputs_q.shape[-1], deterministic)
        if self.fused and not decode:
            key = self._project("key", inputs_kv, self.kernel_init, deterministic)  # [b, k, h, d]
            value = self._project("value", inputs_kv, self.kernel_init, deterministic)
            if keep is not None:
                value = value * keep.transpose(0, 2, 1, 3)
            x = fused_dot_product_attention(query, key, value, mask, bias)
            return self._output(x, inputs_q.shape[-1], deterministic)
        if decode and not self.causal:
            key, value = self._cross_attention_cache(inputs_kv)
        else:
            key = self._project_heads_first("key", inputs_kv, deterministic)
            value = self._project_heads_first("value", inputs_kv, deterministic)
        if decode and self.causal:
            if cache_length is None:
                raise ValueError("decoder self-attention in decode mode needs cache_length")
            key, value, mask, bias = self._append_to_cache(key, value, mask, bias, cache_length)

        attention_bias = None
        if mask is not None:
            attention_bias = jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)
        if bias is not None:
            attention_bias = bias if attention_bias is None else attention_bias + bias

        if keep is not None:
            value = value * keep
        x = dot_product_attention(query, key, value, attention_bias, float32_logits=self.float32_logits)  # [b, q, h, d]
        return self._output(x, inputs_q.shape[-1], deterministic)

    def _kernel_attention(self, query: Array, key: Array, value: Array, segments: Segments, table: Array | None):
        """[b, q, h, d], [b, k, h, d] x2 -> [b, q, h, d] through the Pallas or cuDNN route."""
        if not isinstance(segments, Segments):
            raise TypeError(f"attention kernel {self.kernel!r} takes the mask as Segments, got {type(segments).__name__}")
        return kernel_attention(
            self.kernel, query, key, value, segments, table, causal=self.causal, num_buckets=self.num_buckets,
            max_distance=self.max_distance, max_segments=self.max_segments,
        )

    def _value_dropout(self, batch_and_length: tuple[int, int], deterministic: bool) -> Array | None:
        """Attention dropout as scaled keep-masks [b, h, k, 1] on the value vectors.

        T5X drops attention weights [b, h, q, k] with a mask shared by every
        query ([b, h, 1, k]). Dropping weight (q, k) for all q is the same as
        dropping value vector k, so we drop values: the same function, a mask
        q times smaller, and fused attention kernels can take it.
        """
        if deterministic or self.dropout_rate == 0.0:
            return None
        batch, length = batch_and_length
        ones = jnp.ones((batch, self.num_heads, length, 1), self.dtype)
        return nn.Dropout(rate=self.dropout_rate)(ones, deterministic=False)

    def _output(self, x: Array, features: int, deterministic: bool) -> Array:
        """[b, q, h, d] -> [b, q, e]."""
        x = x.reshape(*x.shape[:-2], self.num_heads * self.head_dim)
        out = Dense(features, ("joined_kv", "embed"), self.kernel_init, self.dtype, self.lora, name="out")(x, deterministic)
        return constrain(out, ("batch", "length", "embed"))

    def _cross_attention_cache(self, inputs_kv: Array) -> tuple[Array, Array]:
        """Projects the encoder output once per decode, then reads it back."""
        if self.has_variable(CROSS_CACHE, "projected_key"):
            return self.get_variable(CROSS_CACHE, "projected_key"), self.get_variable(CROSS_CACHE, "projected_value")
        key = self._project_heads_first("key", inputs_kv)
        value = self._project_heads_first("value", inputs_kv)
        self.put_variable(CROSS_CACHE, "projected_key", key)
        self.put_variable(CROSS_CACHE, "projected_value", value)
        return key, value

    def _append_to_cache(
        self, key: Array, value: Array, mask: Array | None, bias: Array | None, cache_length: int
    ) -> tuple[Array, Array, Array, Array | None]:
        """Writes this step's key/value [b, h, 1, d] at `cache_index` and returns
        the whole cache [b, h, L, d], a mask over filled slots [.., 1, L] and the
        bias row of the current position [.., h, 1, L]."""
        is_initialized = self.has_variable("cache", "cached_key")
        batch, heads, _, depth = key.shape
        shape = (batch, heads, cache_length, depth)
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if is_initialized and key.shape[2] != 1:
            raise ValueError(f"decode mode takes one token per call, got {key.shape[2]}")
        index = cache_index.value
        key = lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype), (0, 0, index, 0))
        value = lax.dynamic_update_slice(cached_value.value, value.astype(cached_value.value.dtype), (0, 0, index, 0))
        if is_initialized:  # the creating call leaves an empty cache behind
            cached_key.value, cached_value.value = key, value
            cache_index.value = index + 1
        filled = (jnp.arange(cache_length) <= index)[None, None, None, :]  # [1, 1, 1, L]
        mask = filled if mask is None else mask & filled
        if bias is not None:
            bias = lax.dynamic_slice_in_dim(bias, index, 1, axis=-2)
        return key, value, mask, bias
