"""T5's relative-position buckets and the bias they index (shared by the
einsum path in `layers` and the kernels in `pallas_attention`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array


def relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucketing of (key - query) offsets: exact near 0, logarithmic beyond.

    Computed in numpy float32 at trace time, like T5X, so bucket boundaries are
    bit-for-bit those of T5X checkpoints.
    """
    buckets = np.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        buckets += (n < 0).astype(np.int32) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps) / np.log(max_distance / max_exact)
    val_if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(np.int32)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return buckets + np.where(is_small, n, val_if_large)


def relative_bias(
    table: Array, query_length: int, key_length: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """table [h, n] -> bias [1, h, q, k] float32.

    Offsets come from aranges, not from packed `positions`: inside one
    contiguous packed example the offsets are the same either way, and
    pairs across examples are masked out.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]  # [q, k]
    buckets = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    # A one-hot matmul rather than a gather (as T5X does): the gradient is
    # then a small matmul instead of a scatter-add of q*k values into
    # h*n slots, which accelerators serialise. HIGHEST keeps it exact.
    one_hot = jax.nn.one_hot(jnp.asarray(buckets), num_buckets, dtype=jnp.float32)  # [q, k, n]
    bias = jnp.einsum("hn,qkn->hqk", table, one_hot, precision=lax.Precision.HIGHEST)
    return bias[None]
