"""Building blocks of T5: RMS norm, embedding, dense, MLP, masks (attention
is in `flan_jax.model.attention`).

Shape letters: b batch, q query length, k key length, L cache length,
e emb_dim, h heads, d head_dim, m mlp_dim, v vocab, n relative buckets.
Parameters are float32 and carry logical axis names (T5X's) so that
`partitioning.Partitioner` can shard them; activation constraints are no-ops
unless logical axis rules are active.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flan_jax.model.lora import LoraConfig
from flan_jax.model.relpos import relative_bias

Array = jax.Array
Initializer = Callable[..., Array]
Dtype = Any

# T5X's initialisers: attention kernels normal, MLP/logits truncated normal.
attention_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
mlp_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

constrain = nn.with_logical_constraint


# --------------------------------------------------------------------- masks


def padding_mask(query_valid: Array, key_valid: Array) -> Array:
    """[b, q], [b, k] bool -> [b, 1, q, k]: both positions hold real tokens."""
    return query_valid[:, None, :, None] & key_valid[:, None, None, :]


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
    """[b, q], [b, k] ids -> [b, 1, q, k]: query and key are in the same packed example."""
    return query_segments[:, None, :, None] == key_segments[:, None, None, :]


def causal_mask(length: int) -> Array:
    """[1, 1, length, length]: a query sees itself and earlier keys."""
    return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


class Segments(NamedTuple):
    """The attention mask as ids, for the kernels that never build [b, 1, q, k]:
    query i sees key j when query[b, i] == key[b, j] != 0."""

    query: Array  # [b, q] int32
    key: Array  # [b, k] int32


def kernel_segments(valid: Array, segment_ids: Array | None) -> Array:
    """[b, l] ids for `Segments`: 0 where not `valid`, else the segment id + 1
    (so that `padding_mask & segment_mask` is exactly "same nonzero id")."""
    ids = jnp.zeros(valid.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return jnp.where(valid, ids + 1, 0)


def segments_mask(segments: Segments, causal: bool) -> Array:
    """The [b, 1, q, k] bool mask that `segments` (and `causal`) stand for."""
    mask = segment_mask(segments.query, segments.key) & (segments.query != 0)[:, None, :, None]
    return mask & causal_mask(segments.query.shape[-1]) if causal else mask


# ---------------------------------------------------------------- primitives


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no centring or bias, computed in float32."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32
        )
        x = x.astype(jnp.float32)
        x = x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return (x * scale).astype(self.dtype)


class DenseWeights(NamedTuple):
    """A Dense layer's parameters: the kernel and, when LoRA targets it, the adapter."""

    kernel: Array  # [in, out] float32 (or the frozen dtype)
    lora_a: Array | None  # [in, rank]
    lora_b: Array | None  # [rank, out], zero at initialisation


# PEFT's initialisation of A (kaiming-uniform with a = sqrt(5)): U(+-1/sqrt(in)).
lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Dense(nn.Module):
    """x[..., in] @ kernel[in, features], no bias; kernel float32, math in `dtype`.

    With `lora` and a path it targets, adds the low-rank update (LoraConfig).
    """

    features: int
    kernel_axes: tuple[str, str]
    kernel_init: Initializer = mlp_kernel_init
    dtype: Dtype = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def weights(self, in_features: int) -> DenseWeights:
        """The parameters, for callers that fuse products (see MlpBlock)."""
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (in_features, self.features),
            jnp.float32,
        )
        if self.lora is None or not self.lora.targets_path("/".join(self.path) + "/kernel"):
            return DenseWeights(kernel, None, None)
        rank, (in_axis, out_axis) = self.lora.rank, self.kernel_axes
        lora_a = self.param(
            "lora_a", nn.with_logical_partitioning(lora_a_init, (in_axis, None)), (in_features, rank), jnp.float32
        )
        lora_b = self.param(
            "lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, out_axis)), (rank, self.features),
            jnp.float32,
        )
        return DenseWeights(kernel, lora_a, lora_b)

    def kernel(self, in_features: int) -> Array:
        """The kernel [in_features, features] alone."""
        return self.weights(in_features).kernel

    def lora_delta(self, x: Array, deterministic: bool = True) -> Array | None:
        """x [..., in] -> scale * dropout(x) A B [..., features]; None without an adapter."""
        _, lora_a, lora_b = self.weights(x.shape[-1])
        if lora_a is None:
            return None
        x = x.astype(self.dtype)
        rate = self.lora.dropout
        if not deterministic and rate > 0.0:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(self.dtype)
        low_rank = jnp.dot(x, lora_a.astype(self.dtype))  # [..., rank]
        return jnp.dot(low_rank, lora_b.astype(self.dtype)) * jnp.asarray(self.lora.scale, self.dtype)

    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel(x.shape[-1]).astype(self.dtype))
        delta = self.lora_delta(x, deterministic)
        return y if delta is None else y + delta


class Embed(nn.Module):
    """Token embedding [v, e]; `attend` reuses it as a tied output layer."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, ids: Array) -> Array:
        """[b, l] int -> [b, l, e]."""
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """[b, l, e] -> [b, l, v] float32 logits against the embedding table."""
        return jnp.dot(x.astype(jnp.float32), self.embedding.T)


class RelativePositionBiases(nn.Module):
    """Learned per-head attention bias from bucketed relative positions."""

    num_buckets: int
    max_distance: int
    num_heads: int

    @nn.compact
    def __call__(self, query_length: int, key_length: int, bidirectional: bool, as_table: bool = False) -> Array:
        """-> [1, h, q, k] float32, or with `as_table` the [h, n] table itself
        (for the kernels that make the bias from it)."""
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"), ("heads", "relpos_buckets")
            ),
            (self.num_heads, self.num_buckets),
            jnp.float32,
        )
        if as_table:
            return table
        return relative_bias(table, query_length, key_length, bidirectional, self.num_buckets, self.max_distance)


# ----------------------------------------------------------------------- MLP

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=True),  # HF's gelu_new / T5X's gelu
    "gelu_exact": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "silu": nn.silu,
    "linear": lambda x: x,
}


class MlpBlock(nn.Module):
    """Position-wise feed-forward: product of activated `wi_*` branches, then `wo`.

    One activation gives `wi`; several give gated units `wi_0`, `wi_1`, ...
    """

    mlp_dim: int
    activations: Sequence[str] = ("relu",)
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        """[b, l, e] -> [b, l, e]."""
        if len(self.activations) == 1:
            wi = Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, lora=self.lora, name="wi")
            hidden = ACTIVATIONS[self.activations[0]](wi(x, deterministic))
        else:
            # All branches in one product against the stacked kernels [e, n, m]:
            # the gradient for x is then one matmul, not a sum of n (plus a
            # layout copy on CPU), and the matmul is n times larger.
            wis = [
                Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, lora=self.lora, name=f"wi_{i}")
                for i in range(len(self.activations))
            ]
            kernels = jnp.stack([wi.kernel(x.shape[-1]) for wi in wis], axis=1)
            branches = jnp.einsum("ble,enm->blnm", x.astype(self.dtype), kernels.astype(self.dtype))
            hidden = None
            for i, (name, wi) in enumerate(zip(self.activations, wis)):
                branch = branches[:, :, i]
                delta = wi.lora_delta(x, deterministic)
                branch = ACTIVATIONS[name](branch if delta is None else branch + delta)
                hidden = branch if hidden is None else hidden * branch  # [b, l, m]
        hidden = nn.Dropout(rate=self.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic=deterministic)
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        wo = Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, lora=self.lora, name="wo")
        return wo(hidden, deterministic)
