"""cuDNN's fused attention on its packed ("THD") layout, through JAX's private
API (GPU, bf16/fp16): T5's packed rows as per-row segment offsets and lengths
with a bound M on the segments per row, and the recognition of cuDNN's
rejection of it (`flan_jax.step.FallbackJit` falls back on it).

Shape letters as in `flan_jax.model.layers`.
"""

from __future__ import annotations

import re
import traceback
from typing import NamedTuple

import jax.numpy as jnp

from flan_jax.model.layers import Array, Segments


class PackedLayout(NamedTuple):
    """cuDNN's packed ("THD") arguments for one attention call, as
    `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` documents
    them: M slots per row, the same M on both sides, -1 in unused slots. cuDNN
    drops each side's -1s and then pairs the m-th query segment with the m-th
    key segment, so a slot is used on both sides or on neither."""

    q_seqlen: Array  # [b, M] int32
    kv_seqlen: Array  # [b, M] int32
    q_offsets: Array  # [b, M + 1] int32
    kv_offsets: Array  # [b, M + 1] int32
    covered: Array  # [b, q] bool: query tokens in a used slot (cuDNN writes no output for the others)
    overflow: Array  # [b] bool: rows with more segments than M


def _first_id(ids: Array) -> Array:
    """[b, l] -> [b]: each row's smallest nonzero id (int32 max in an all-padding row)."""
    return jnp.min(jnp.where(ids != 0, ids, jnp.iinfo(jnp.int32).max), axis=1)


def _slot_runs(slots: Array, num_slots: int) -> tuple[Array, Array]:
    """slots [b, l] (-1: padding) -> (tokens [b, M], first position [b, M]) of
    each slot; a slot's tokens are contiguous in packed rows."""
    hit = slots[:, :, None] == jnp.arange(num_slots, dtype=slots.dtype)  # [b, l, M]
    return hit.sum(axis=1, dtype=jnp.int32), jnp.argmax(hit, axis=1).astype(jnp.int32)


def packed_layout(segments: Segments, num_slots: int) -> PackedLayout:
    """The packed layout of `segments` with `num_slots` (M) slots per row.

    Slot m holds segment id `first + m` on both sides, `first` being the row's
    smallest id over query and key: the pairing then follows the ids, not
    the order of runs, and an example empty on one side (no key tokens for
    its decoder tokens, say) leaves its slot unused on both.
    """
    base = jnp.minimum(_first_id(segments.query), _first_id(segments.key))[:, None]  # [b, 1]
    q_slots = jnp.where(segments.query != 0, segments.query - base, -1)  # [b, q]
    k_slots = jnp.where(segments.key != 0, segments.key - base, -1)  # [b, k]
    q_len, q_start = _slot_runs(q_slots, num_slots)
    k_len, k_start = _slot_runs(k_slots, num_slots)
    used = (q_len > 0) & (k_len > 0)  # [b, M]
    unused_end = jnp.full((used.shape[0], 1), -1, jnp.int32)  # the (M+1)-th offset, as JAX's docstring shows

    def fill(x: Array) -> Array:
        return jnp.where(used, x, -1)

    in_range = (q_slots >= 0) & (q_slots < num_slots)
    covered = in_range & jnp.take_along_axis(used, jnp.clip(q_slots, 0, num_slots - 1), axis=1)
    overflow = (q_slots >= num_slots).any(axis=1) | (k_slots >= num_slots).any(axis=1)
    return PackedLayout(
        fill(q_len), fill(k_len), jnp.concatenate([fill(q_start), unused_end], axis=1),
        jnp.concatenate([fill(k_start), unused_end], axis=1), covered, overflow,
    )


def segment_bound(max_segments: int, query_length: int, key_length: int) -> int:
    """M for one call: `max_segments` (T5Config.max_segments_per_row) where set,
    else the shorter side's length, which no row can exceed when each segment
    has a token on each side; at least 2, as JAX takes M = 1 for the unpacked
    layout (no offsets: a segment must start at 0 and -1 is no length)."""
    return max(2, max_segments if max_segments > 0 else min(query_length, key_length))


def packed_attention(
    query: Array, key: Array, value: Array, segments: Segments, bias: Array | None, causal: bool, max_segments: int
) -> Array:
    """cuDNN's fused attention on the packed layout (private JAX API, GPU only),
    the bias unbatched [1, h, q, k]. Query tokens outside every used slot get
    zeros (cuDNN leaves them unwritten); rows with more segments than M get
    NaN, so that the loss shows it rather than attention across examples."""
    from jax._src.cudnn import (
        fused_attention_stablehlo as cudnn,  # private: guarded by the caller
    )

    layout = packed_layout(segments, segment_bound(max_segments, query.shape[1], key.shape[1]))
    mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
    out = cudnn.dot_product_attention(
        query, key, value, None if bias is None else bias.astype(query.dtype), None,
        layout.q_seqlen, layout.kv_seqlen, layout.q_offsets, layout.kv_offsets, scale=1.0, mask_type=mask_type,
    )  # [b, q, h, d]
    out = jnp.where(layout.covered[:, :, None, None], out, 0)
    return jnp.where(layout.overflow[:, None, None, None], jnp.nan, out).astype(query.dtype)


def cudnn_rejection(error: BaseException) -> str | None:
    """A short reason where `error` is cuDNN's fused attention refusing to lower
    or compile: its message names cuDNN or its fused attention (as XLA's
    CUDNN_STATUS_* and __cudnn$fmha* errors do), or it was raised in JAX's cuDNN module (seen only where JAX leaves
    its own frames in tracebacks: `jax_traceback_filtering`). Else None."""
    frames = [frame.f_code.co_filename.replace("\\", "/") for frame, _ in traceback.walk_tb(error.__traceback__)]
    raised_there = any("jax/_src/cudnn/" in name for name in frames)
    if not (raised_there or re.search(r"cudnn|fmha", str(error), re.IGNORECASE)):
        return None
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return first_line if len(first_line) <= 160 else first_line[:157] + "..."
