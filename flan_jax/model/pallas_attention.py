"""T5 attention as a Pallas kernel: flash attention (tiled, online softmax)
that makes the relative-position bias inside the kernel and masks with
segment ids, so no [batch, heads, q, k] tensor is ever built.

The T5 bias is a function of the offset k - q alone, and T5's bucketing makes
it piecewise constant in that offset: a few runs of offsets share a bucket.
`bias_runs` finds those runs at trace time with the project's own
`relative_position_bucket` (so the buckets are bit-for-bit T5X's); the kernel
then builds each [block_q, block_k] bias tile from the offsets with one
compare-and-select per run, and the backward pass sums the score gradient
over each run's offsets, which is the gradient of the run's bias value. The
gather `table[:, run_buckets]` outside the kernel carries that gradient to the
[heads, buckets] table (a tiny scatter-add).

Masking: query i sees key j when `query_segments[i] == key_segments[j] != 0`
(and j <= i when causal). Rows that see nothing give 0 (the einsum path gives
a mean of the values there; such rows are padding, which no loss reads).

Layout: query [b, q, h, d], key/value [b, k, h, d] (sequence first, like
`jax.nn.dot_product_attention`), no 1/sqrt(d) scaling (T5 folds it into the
query kernel). Softmax statistics are float32. On GPUs the kernels lower
through Triton; elsewhere they run in Pallas's interpreter (slow: for tests).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P
from jax.experimental.pallas import triton as plgpu

from flan_jax.model.relpos import relative_position_bucket

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels take as Python values (hashable: a jit/vjp static)."""

    causal: bool
    block_q: int
    block_k: int
    # First offset (k - q) of each bias run, ascending; empty without a bias.
    run_starts: tuple[int, ...]
    interpret: bool


def bias_runs(
    query_length: int, key_length: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(run_starts, run_buckets): offsets k - q in [-(query_length-1), key_length)
    split into maximal runs of one bucket; run r covers [starts[r], starts[r+1])."""
    offsets = np.arange(-(query_length - 1), key_length)
    buckets = relative_position_bucket(offsets, bidirectional, num_buckets, max_distance)
    first = np.concatenate([[0], np.flatnonzero(np.diff(buckets)) + 1])
    return tuple(int(o) for o in offsets[first]), tuple(int(b) for b in buckets[first])


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ------------------------------------------------------------ kernel pieces


def _dot(a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
    """float32-accumulating product; float32 inputs stay full precision (no TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _bias_tile(runs_ref, run_starts: tuple[int, ...], offsets: Array) -> Array:
    """The bias for a tile of offsets k - q: one select per run boundary."""
    bias = jnp.zeros(offsets.shape, jnp.float32) + runs_ref[0]
    for r in range(1, len(run_starts)):
        bias = jnp.where(offsets >= run_starts[r], runs_ref[r], bias)
    return bias


def _run_sums(grad: Array, run_starts: tuple[int, ...], offsets: Array, width: int) -> Array:
    """[width] vector: the sum of `grad` over each run's offsets."""
    runs = lax.broadcasted_iota(jnp.int32, (width,), 0)
    out = jnp.zeros((width,), jnp.float32)
    for r, start in enumerate(run_starts):
        inside = offsets >= start
        if r + 1 < len(run_starts):
            inside &= offsets < run_starts[r + 1]
        total = jnp.sum(jnp.sum(jnp.where(inside, grad, 0.0), axis=1), axis=0)
        out = jnp.where(runs == r, total, out)
    return out


def _scores(q: Array, k: Array, q_seg: Array, k_seg: Array, q_pos: Array, k_pos: Array, runs_ref, st: _Static):
    """(logits + bias [bq, bk] float32, visible [bq, bk] bool, offsets k - q)."""
    s = _dot(q, k, trans_b=True)
    offsets = k_pos[None, :] - q_pos[:, None]
    if st.run_starts:
        s = s + _bias_tile(runs_ref, st.run_starts, offsets)
    visible = (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] != 0)
    if st.causal:
        visible &= offsets <= 0
    return s, visible, offsets


def _causal_key_blocks(st: _Static, q_block: Array, num_k_blocks: int) -> Array:
    """How many key blocks the query block can see."""
    if not st.causal:
        return num_k_blocks
    return jnp.minimum(num_k_blocks, ((q_block + 1) * st.block_q + st.block_k - 1) // st.block_k)


def _first_query_block(st: _Static, k_block: Array) -> Array:
    """The first query block that can see the key block."""
    return (k_block * st.block_k) // st.block_q if st.causal else 0


# ------------------------------------------------------------------ kernels


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, runs_ref, o_ref, lse_ref, *, st: _Static):
    bq, bk = st.block_q, st.block_k
    i = pl.program_id(2)
    q, q_seg = q_ref[...], q_seg_ref[...]
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * bk, bk)
        v = v_ref[keys, :]
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        s, visible, _ = _scores(q, k_ref[keys, :], q_seg, k_seg_ref[keys], q_pos, k_pos, runs_ref, st)
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that see nothing yet
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(m - m_safe)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(0, _causal_key_blocks(st, i, k_ref.shape[0] // bk), body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), jnp.inf)


def _key_grad_kernel(
    q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, runs_ref, do_ref, lse_ref, delta_ref,
    dk_ref, dv_ref, druns_ref, *, st: _Static,
):
    """dK, dV and the per-run bias gradient of one key block, over all query blocks."""
    bq, bk = st.block_q, st.block_k
    j = pl.program_id(2)
    k, v, k_seg = k_ref[...], v_ref[...], k_seg_ref[...]
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    width = druns_ref.shape[-1]

    def body(i, carry):
        dk, dv, druns = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)
        s, visible, offsets = _scores(q, k, q_seg_ref[rows], k_seg, q_pos, k_pos, runs_ref, st)
        p = jnp.where(visible, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta_ref[rows][:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        if st.run_starts:
            druns = druns + _run_sums(ds, st.run_starts, offsets, width)
        return dk, dv, druns

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), jnp.zeros((width,), jnp.float32))
    dk, dv, druns = lax.fori_loop(_first_query_block(st, j), q_ref.shape[0] // bq, body, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    druns_ref[...] = druns


def _query_grad_kernel(
    q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, runs_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: _Static
):
    """dQ of one query block, over the key blocks it sees."""
    bq, bk = st.block_q, st.block_k
    i = pl.program_id(2)
    q, q_seg, do = q_ref[...], q_seg_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq,), 0)

    def body(j, dq):
        keys = pl.ds(j * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
        s, visible, _ = _scores(q, k, q_seg, k_seg_ref[keys], q_pos, k_pos, runs_ref, st)
        p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, _causal_key_blocks(st, i, k_ref.shape[0] // bk), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


# ------------------------------------------------------------- pallas calls


def _specs(q: Array, k: Array, runs: Array, st: _Static, along: str):
    """Block specs of (q, k, v, q_seg, k_seg, runs, [do, lse, delta]) for a grid
    (batch, heads, blocks of `along`): that axis tiled, the other whole."""
    (_, lq, _, d), lk = q.shape, k.shape[1]
    bq, bk = (st.block_q, lk) if along == "q" else (lq, st.block_k)
    qi = (lambda b, h, i: (b, i, h, 0)) if along == "q" else (lambda b, h, i: (b, 0, h, 0))
    ki = (lambda b, h, i: (b, 0, h, 0)) if along == "q" else (lambda b, h, i: (b, i, h, 0))
    q_spec, k_spec = pl.BlockSpec((None, bq, None, d), qi), pl.BlockSpec((None, bk, None, d), ki)
    q_seg = pl.BlockSpec((None, bq), lambda b, h, i: qi(b, h, i)[:2])
    k_seg = pl.BlockSpec((None, bk), lambda b, h, i: ki(b, h, i)[:2])
    runs_spec = pl.BlockSpec((None, runs.shape[-1]), lambda b, h, i: (h, 0))
    row_stat = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, qi(b, h, i)[1]))
    return q_spec, k_spec, q_seg, k_seg, runs_spec, row_stat


def _call(kernel, st: _Static, grid, in_specs, out_specs, out_shape, *args):
    params = {} if st.interpret else {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=2)}
    return pl.pallas_call(
        functools.partial(kernel, st=st), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=st.interpret, **params,
    )(*args)


def _forward(q, k, v, q_seg, k_seg, runs, st: _Static) -> tuple[Array, Array]:
    b, lq, h, _ = q.shape
    q_spec, k_spec, q_seg_spec, k_seg_spec, runs_spec, row_stat = _specs(q, k, runs, st, "q")
    return _call(
        _forward_kernel, st, (b, h, lq // st.block_q),
        [q_spec, k_spec, k_spec, q_seg_spec, k_seg_spec, runs_spec], [q_spec, row_stat],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
        q, k, v, q_seg, k_seg, runs,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, q_seg, k_seg, runs, st: _Static) -> Array:
    return _forward(q, k, v, q_seg, k_seg, runs, st)[0]


def _attention_fwd(q, k, v, q_seg, k_seg, runs, st: _Static):
    out, lse = _forward(q, k, v, q_seg, k_seg, runs, st)
    return out, (q, k, v, q_seg, k_seg, runs, out, lse)


def _attention_bwd(st: _Static, residuals, do):
    q, k, v, q_seg, k_seg, runs, out, lse = residuals
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    # delta_i = sum_j p_ij dp_ij = do_i . o_i: the softmax backward's row term.
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))
    args = (q, k, v, q_seg, k_seg, runs, do, lse, delta)

    q_spec, k_spec, q_seg_spec, k_seg_spec, runs_spec, row_stat = _specs(q, k, runs, st, "k")
    num_k = lk // st.block_k
    dk, dv, druns = _call(
        _key_grad_kernel, st, (b, h, num_k),
        [q_spec, k_spec, k_spec, q_seg_spec, k_seg_spec, runs_spec, q_spec, row_stat, row_stat],
        [k_spec, k_spec, pl.BlockSpec((None, None, None, runs.shape[-1]), lambda b, h, i: (b, h, i, 0))],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
         jax.ShapeDtypeStruct((b, h, num_k, runs.shape[-1]), jnp.float32)],
        *args,
    )
    q_spec, k_spec, q_seg_spec, k_seg_spec, runs_spec, row_stat = _specs(q, k, runs, st, "q")
    dq = _call(
        _query_grad_kernel, st, (b, h, lq // st.block_q),
        [q_spec, k_spec, k_spec, q_seg_spec, k_seg_spec, runs_spec, q_spec, row_stat, row_stat], q_spec,
        jax.ShapeDtypeStruct(q.shape, q.dtype), *args,
    )
    return dq, dk, dv, None, None, druns.sum(axis=(0, 2)).astype(runs.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------- public


def _pad_to(x: Array, axis: int, multiple: int) -> Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _mesh_axis(mesh, logical: str, size: int):
    """The mesh axis (or axes) the active logical rules give `logical`, if they split `size` evenly."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    return axes if names and size % shards == 0 else None


def _per_device(fn, q: Array, k: Array, v: Array, q_seg: Array, k_seg: Array, runs: Array) -> Array:
    """`fn` on each device's batch and head shards of the current mesh (`jax.set_mesh`).

    A pallas_call has no partitioning rule: left to XLA, every device would
    gather the whole batch and compute all of it. The bias runs' gradient is
    summed over the batch shards by shard_map's transpose.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, q_seg, k_seg, runs)
    batch, heads = _mesh_axis(mesh, "batch", q.shape[0]), _mesh_axis(mesh, "heads", q.shape[2])
    rows, seq = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(rows, rows, rows, seq, seq, P(heads, None)), out_specs=rows, check_vma=False
    )(q, k, v, q_seg, k_seg, runs)


def _block(length: int, block: int | None) -> int:
    """The block size: `block`, or 64 (at least 16, Triton's smallest dot), capped by the padded length."""
    return block or min(64, max(16, _next_power_of_2(length)))


def t5_attention(
    query: Array,
    key: Array,
    value: Array,
    query_segments: Array,
    key_segments: Array,
    bias_table: Array | None = None,
    *,
    causal: bool = False,
    num_buckets: int = 32,
    max_distance: int = 128,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """softmax(q k^T + T5 bias, masked) v -> [b, q, h, d].

    query [b, q, h, d], key/value [b, k, h, d]; query_segments [b, q] and
    key_segments [b, k] int (0 = sees and is seen by nothing); bias_table
    [h, num_buckets] float32 or None (cross-attention). The bias is
    bidirectional unless `causal`. Lengths are padded to the blocks (then
    sliced back); `interpret` defaults to "not on a GPU".
    """
    lq, lk = query.shape[1], key.shape[1]
    block_q, block_k = _block(lq, block_q), _block(lk, block_k)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    q = _pad_to(query, 1, block_q)
    k, v = _pad_to(key, 1, block_k), _pad_to(value, 1, block_k)
    q_seg = _pad_to(query_segments.astype(jnp.int32), 1, block_q)
    k_seg = _pad_to(key_segments.astype(jnp.int32), 1, block_k)
    if bias_table is None:
        run_starts, runs = (), jnp.zeros((query.shape[2], 1), jnp.float32)
    else:
        run_starts, run_buckets = bias_runs(q.shape[1], k.shape[1], not causal, num_buckets, max_distance)
        runs = bias_table.astype(jnp.float32)[:, np.asarray(run_buckets)]  # [h, runs]
        runs = _pad_to(runs, 1, _next_power_of_2(runs.shape[1]))  # Triton wants power-of-2 blocks
    st = _Static(causal, block_q, block_k, run_starts, interpret)
    return _per_device(lambda *args: _attention(*args, st), q, k, v, q_seg, k_seg, runs)[:, :lq]
