"""T5 attention as a Pallas kernel: flash attention (tiled, online softmax)
that adds T5's relative-position bias inside the kernel and masks with
segment ids, so no [batch, heads, q, k] tensor is ever built.

The T5 bias is a function of the offset k - q alone. Outside the kernels,
the [heads, buckets] table is gathered into a bias vector over the offsets
-(Lq-1)..Lk-1 (`offset_bias`, with the project's `relative_position_bucket`,
so the buckets are bit-for-bit T5X's), and that vector into block_q rows,
row r shifted right by r (`_bias_rows`, [heads, block_q, ~Lq+Lk], shared by
the batch): a [block_q, block_k] tile's bias is then a plain 2-D slice of
it, loaded like a K tile. Its gradient is the vector's: dS summed along
each diagonal, which registers cannot do cheaply; so a fourth kernel runs
along the tile diagonals (key block - query block fixed: every tile has the
same offsets) adding up dS tiles over the batch, with no reduction in its
loop, and outside dense reshapes sum each diagonal; the gather from the
table carries the vector's gradient on to the buckets (a tiny scatter-add).

Masking: query i sees key j when `query_segments[i] == key_segments[j] != 0`
(and j <= i when causal). Rows that see nothing give 0 (the einsum path gives
a mean of the values there; such rows are padding, which no loss reads).

Layout: query [b, q, h, d], key/value [b, k, h, d] (sequence first, like
`jax.nn.dot_product_attention`), no 1/sqrt(d) scaling (T5 folds it into the
query kernel). Softmax statistics are float32. Grids run (blocks, batch,
heads), like JAX's reference GPU flash attention, so the blocks that share
K/V (or Q) run close together. On GPUs the kernels lower through Triton;
elsewhere they run in Pallas's interpreter (slow: for tests) unless
`interpret=False` (to lower for a GPU from a CPU host, as the lowering test does).
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
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from flan_jax.model.relpos import relative_position_bucket

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels take as Python values (hashable: a jit/vjp static)."""

    causal: bool
    block_q: int
    block_k: int
    # Column of `_bias_rows` where the tile with q0 == k0 starts; None without a bias.
    shift: int | None
    interpret: bool


def offset_bias(
    table: Array, query_length: int, key_length: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """[h, buckets] table -> [h, query_length + key_length - 1]: the bias of each offset
    k - q from -(query_length - 1) up."""
    offsets = np.arange(-(query_length - 1), key_length)
    buckets = relative_position_bucket(offsets, bidirectional, num_buckets, max_distance)
    return table.astype(jnp.float32)[:, buckets]


def _bias_rows(bias: Array, st: _Static, query_length: int) -> Array:
    """[h, Lq+Lk-1] offset bias -> [h, block_q, W]: row r shifted right by r
    (column y holds offset y - st.shift - r), so that a tile's bias is a plain
    2-D slice, rows [0, bq), columns from k0 - q0 + st.shift (`_scores`).

    A Toeplitz copy per head shared by the batch (block_q * (Lq+Lk) floats): a
    gather of the tile from the vector instead pipelines 32 scalar loads and
    their 64-bit addresses per thread, and spills in dK/dV.
    """
    width = bias.shape[1] + 1 - (query_length - st.shift)  # the last tile's last column + 1
    offsets = np.arange(width)[None, :] - st.shift - np.arange(st.block_q)[:, None]
    # Offsets below -(Lq-1) (top-left corner) are never read.
    return bias[:, np.maximum(offsets + query_length - 1, 0)]


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ------------------------------------------------------------ kernel pieces


def _dot(a: Array, b: Array, trans_a: bool = False, trans_b: bool = False) -> Array:
    """float32-accumulating product; float32 inputs stay full precision (no TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _offsets(q0: Array, k0: Array, bq: int, bk: int) -> Array:
    """[bq, bk] int32 offsets k - q of the tile whose first query is q0 and first key k0."""
    rows = lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return (k0 - q0) + (cols - rows)


def _scores(q: Array, k: Array, q_seg: Array, k_seg: Array, q0: Array, k0: Array, bias_ref, st: _Static):
    """(logits + bias [bq, bk] float32, visible [bq, bk] bool) of the tile at (q0, k0)."""
    s = _dot(q, k, trans_b=True)
    bq, bk = s.shape
    if st.shift is not None:
        s = s + bias_ref[pl.ds(0, bq), pl.ds(k0 - q0 + st.shift, bk)]  # a plain 2-D tile load
    visible = (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] != 0)
    if st.causal:
        visible &= _offsets(q0, k0, bq, bk) <= 0
    return s, visible


def _causal_key_blocks(st: _Static, q_block: Array, num_k_blocks: int) -> Array:
    """How many key blocks the query block can see."""
    if not st.causal:
        return num_k_blocks
    return jnp.minimum(num_k_blocks, ((q_block + 1) * st.block_q + st.block_k - 1) // st.block_k)


def _first_query_block(st: _Static, k_block: Array) -> Array:
    """The first query block that can see the key block."""
    return (k_block * st.block_k) // st.block_q if st.causal else 0


# ------------------------------------------------------------------ kernels


def _forward_kernel(q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, bias_ref, o_ref, lse_ref, *, st: _Static):
    bq, bk = st.block_q, st.block_k
    i = pl.program_id(0)
    q, q_seg = q_ref[...], q_seg_ref[...]

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * bk, bk)
        v = v_ref[keys, :]
        s, visible = _scores(q, k_ref[keys, :], q_seg, k_seg_ref[keys], i * bq, j * bk, bias_ref, st)
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
    q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, bias_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, st: _Static
):
    """dK and dV of one key block, over the query blocks that see it."""
    bq, bk = st.block_q, st.block_k
    j = pl.program_id(0)
    k, v, k_seg = k_ref[...], v_ref[...], k_seg_ref[...]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * bq, bq)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s, visible = _scores(q, k, q_seg_ref[rows], k_seg, i * bq, j * bk, bias_ref, st)
        p = jnp.where(visible, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta_ref[rows][:, None])
        return dk + _dot(ds.astype(q.dtype), q, trans_a=True), dv

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(_first_query_block(st, j), q_ref.shape[0] // bq, body, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _query_grad_kernel(
    q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, bias_ref, do_ref, lse_ref, delta_ref, dq_ref, *, st: _Static
):
    """dQ of one query block, over the key blocks it sees."""
    bq, bk = st.block_q, st.block_k
    i = pl.program_id(0)
    q, q_seg, do = q_ref[...], q_seg_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq):
        keys = pl.ds(j * bk, bk)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s, visible = _scores(q, k, q_seg, k_seg_ref[keys], i * bq, j * bk, bias_ref, st)
        p = jnp.where(visible, jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(0, _causal_key_blocks(st, i, k_ref.shape[0] // bk), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _bias_grad_kernel(
    q_ref, k_ref, v_ref, q_seg_ref, k_seg_ref, bias_ref, do_ref, lse_ref, delta_ref, ds_ref, *, st: _Static
):
    """dS [n, n] summed over the batch and the tiles of one tile diagonal of one head.

    Square tiles (st.block_q == st.block_k == n): on a diagonal (key block -
    query block fixed) every tile has the same offsets, so dS adds up
    elementwise, with no reduction in the loop.
    """
    n = st.block_q
    batch, num_q, num_k = q_ref.shape[0], q_ref.shape[1] // n, k_ref.shape[1] // n
    diagonal = pl.program_id(0) - (num_q - 1)  # key block - query block
    first, end = jnp.maximum(0, -diagonal), jnp.minimum(num_q, num_k - diagonal)

    def tile(b, i, acc):
        rows, keys = pl.ds(i * n, n), pl.ds((i + diagonal) * n, n)
        q, do = q_ref[b, rows, :], do_ref[b, rows, :]
        k, v = k_ref[b, keys, :], v_ref[b, keys, :]
        s, visible = _scores(q, k, q_seg_ref[b, rows], k_seg_ref[b, keys], i * n, (i + diagonal) * n, bias_ref, st)
        p = jnp.where(visible, jnp.exp(s - lse_ref[b, rows][:, None]), 0.0)
        return acc + p * (_dot(do, v, trans_b=True) - delta_ref[b, rows][:, None])

    def row(b, acc):
        return lax.fori_loop(first, end, functools.partial(tile, b), acc)

    ds_ref[...] = lax.fori_loop(0, batch, row, jnp.zeros((n, n), jnp.float32))


# ------------------------------------------------------------- pallas calls


def _specs(q: Array, k: Array, bias_rows: Array, st: _Static, along: str):
    """Block specs of (q, k, v, q_seg, k_seg, bias, [do, lse, delta]) for a grid
    (blocks of `along`, batch, heads): that axis tiled, the other whole."""
    (_, lq, _, d), lk = q.shape, k.shape[1]
    bq, bk = (st.block_q, lk) if along == "q" else (lq, st.block_k)
    qi = (lambda i, b, h: (b, i, h, 0)) if along == "q" else (lambda i, b, h: (b, 0, h, 0))
    ki = (lambda i, b, h: (b, 0, h, 0)) if along == "q" else (lambda i, b, h: (b, i, h, 0))
    q_spec, k_spec = pl.BlockSpec((None, bq, None, d), qi), pl.BlockSpec((None, bk, None, d), ki)
    q_seg = pl.BlockSpec((None, bq), lambda i, b, h: qi(i, b, h)[:2])
    k_seg = pl.BlockSpec((None, bk), lambda i, b, h: ki(i, b, h)[:2])
    bias_spec = pl.BlockSpec((None, *bias_rows.shape[1:]), lambda i, b, h: (h, 0, 0))
    row_stat = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, qi(i, b, h)[1]))
    return q_spec, k_spec, q_seg, k_seg, bias_spec, row_stat


def _whole_batch_specs(q: Array, k: Array, bias_rows: Array):
    """Block specs of (q, k, v, q_seg, k_seg, bias, do, lse, delta) for a grid
    (tile diagonals, heads): one head of the whole batch."""
    (batch, lq, _, d), lk = q.shape, k.shape[1]
    q_spec = pl.BlockSpec((batch, lq, None, d), lambda t, h: (0, 0, h, 0))
    k_spec = pl.BlockSpec((batch, lk, None, d), lambda t, h: (0, 0, h, 0))
    q_seg, k_seg = pl.BlockSpec((batch, lq), lambda t, h: (0, 0)), pl.BlockSpec((batch, lk), lambda t, h: (0, 0))
    bias_spec = pl.BlockSpec((None, *bias_rows.shape[1:]), lambda t, h: (h, 0, 0))
    row_stat = pl.BlockSpec((batch, None, lq), lambda t, h: (0, h, 0))
    return q_spec, k_spec, q_seg, k_seg, bias_spec, row_stat


def _call(kernel, st: _Static, grid, in_specs, out_specs, out_shape, *args):
    params = {} if st.interpret else {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=2)}
    return pl.pallas_call(
        functools.partial(kernel, st=st), grid=grid, in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, interpret=st.interpret, **params,
    )(*args)


def _kernel_bias(bias: Array, st: _Static, query_length: int) -> Array:
    """What the kernels read: `_bias_rows`, or a [h, 1, 1] stand-in that no kernel reads."""
    return jnp.zeros((bias.shape[0], 1, 1), jnp.float32) if st.shift is None else _bias_rows(bias, st, query_length)


def _forward(q, k, v, q_seg, k_seg, bias, st: _Static) -> tuple[Array, Array]:
    b, lq, h, _ = q.shape
    rows = _kernel_bias(bias, st, lq)
    q_spec, k_spec, q_seg_spec, k_seg_spec, bias_spec, row_stat = _specs(q, k, rows, st, "q")
    return _call(
        _forward_kernel, st, (lq // st.block_q, b, h),
        [q_spec, k_spec, k_spec, q_seg_spec, k_seg_spec, bias_spec], [q_spec, row_stat],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, lq), jnp.float32)],
        q, k, v, q_seg, k_seg, rows,
    )


def _offset_sums(tiles: Array, width: int) -> Array:
    """`_bias_grad_kernel`'s tiles [h, D, n, n] -> [h, width]: each offset's sum.

    Tile d holds offsets (d - num_q + 1) * n + col - row; dense reshapes, not
    a scatter of h*D*n*n values (which accelerators serialise).
    """
    h, num_diagonals, n, _ = tiles.shape
    # Skew: with rows flipped (row' = n-1 - row), col - row + n-1 = col + row';
    # padded to 2n columns and re-cut at 2n-1 columns, row' moves right by row'.
    flipped = jnp.pad(tiles[:, :, ::-1, :], ((0, 0), (0, 0), (0, 0), (0, n))).reshape(h, num_diagonals, 2 * n * n)
    skewed = flipped[..., : n * (2 * n - 1)].reshape(h, num_diagonals, n, 2 * n - 1)
    # [h, D, 2, n]: diagonal d's sums over offsets (d - num_q) * n .. (d - num_q + 2) * n - 1, in two halves.
    halves = jnp.pad(skewed.sum(axis=2), ((0, 0), (0, 0), (1, 0))).reshape(h, num_diagonals, 2, n)
    # Blocks of n offsets from -num_q * n: the upper half of one diagonal plus the lower half of the next.
    blocks = jnp.pad(halves[:, :, 1], ((0, 0), (1, 0), (0, 0))) + jnp.pad(halves[:, :, 0], ((0, 0), (0, 1), (0, 0)))
    sums = blocks.reshape(h, -1)[:, 1:]  # from offset -(num_q * n - 1): the vector's first
    return _pad_to(sums, 1, width)


def _bias_grad(args: tuple, width: int, st: _Static) -> Array:
    """The bias vector's gradient [h, width]: `_bias_grad_kernel`'s tiles summed per offset."""
    q, k = args[0], args[1]
    n = min(st.block_q, st.block_k)  # both powers of 2: n divides both padded lengths
    num_q, num_k = q.shape[1] // n, k.shape[1] // n
    num_diagonals = num_q if st.causal else num_q + num_k - 1  # causal: key block <= query block
    heads = q.shape[2]
    q_spec, k_spec, q_seg_spec, k_seg_spec, bias_spec, row_stat = _whole_batch_specs(q, k, args[5])
    tiles = _call(
        _bias_grad_kernel, dataclasses.replace(st, block_q=n, block_k=n), (num_diagonals, heads),
        [q_spec, k_spec, k_spec, q_seg_spec, k_seg_spec, bias_spec, q_spec, row_stat, row_stat],
        pl.BlockSpec((None, None, n, n), lambda t, h: (h, t, 0, 0)),
        jax.ShapeDtypeStruct((heads, num_diagonals, n, n), jnp.float32), *args,
    )
    return _offset_sums(tiles, width)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, q_seg, k_seg, bias, st: _Static) -> Array:
    return _forward(q, k, v, q_seg, k_seg, bias, st)[0]


def _attention_fwd(q, k, v, q_seg, k_seg, bias, st: _Static):
    out, lse = _forward(q, k, v, q_seg, k_seg, bias, st)
    return out, (q, k, v, q_seg, k_seg, bias, out, lse)


def _attention_bwd(st: _Static, residuals, do):
    q, k, v, q_seg, k_seg, bias, out, lse = residuals
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    # delta_i = sum_j p_ij dp_ij = do_i . o_i: the softmax backward's row term.
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), out.astype(jnp.float32))
    rows = _kernel_bias(bias, st, lq)
    args = (q, k, v, q_seg, k_seg, rows, do, lse, delta)

    q_spec, k_spec, q_seg_spec, k_seg_spec, bias_spec, row_stat = _specs(q, k, rows, st, "k")
    in_specs = [q_spec, k_spec, k_spec, q_seg_spec, k_seg_spec, bias_spec, q_spec, row_stat, row_stat]
    dk, dv = _call(
        _key_grad_kernel, st, (lk // st.block_k, b, h), in_specs, [k_spec, k_spec],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)], *args,
    )
    q_spec, k_spec, q_seg_spec, k_seg_spec, bias_spec, row_stat = _specs(q, k, rows, st, "q")
    in_specs = [q_spec, k_spec, k_spec, q_seg_spec, k_seg_spec, bias_spec, q_spec, row_stat, row_stat]
    dq = _call(_query_grad_kernel, st, (lq // st.block_q, b, h), in_specs, q_spec,
               jax.ShapeDtypeStruct(q.shape, q.dtype), *args)
    dbias = jnp.zeros_like(bias) if st.shift is None else _bias_grad(args, bias.shape[1], st)
    return dq, dk, dv, None, None, dbias.astype(bias.dtype)


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


def _per_device(fn, q: Array, k: Array, v: Array, q_seg: Array, k_seg: Array, bias: Array) -> Array:
    """`fn` on each device's batch and head shards of the current mesh (`jax.set_mesh`).

    A pallas_call has no partitioning rule: left to XLA, every device would
    gather the whole batch and compute all of it. The bias vector's gradient
    is summed over the batch shards by shard_map's transpose.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, q_seg, k_seg, bias)
    batch, heads = _mesh_axis(mesh, "batch", q.shape[0]), _mesh_axis(mesh, "heads", q.shape[2])
    rows, seq = P(batch, None, heads, None), P(batch, None)
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(rows, rows, rows, seq, seq, P(heads, None)), out_specs=rows, check_vma=False
    )(q, k, v, q_seg, k_seg, bias)


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
    sliced back); `interpret` defaults to "not on a GPU" (False lowers the
    kernels through Triton on any host, e.g. to check them for a GPU).
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
        shift, bias = None, jnp.zeros((query.shape[2], 1), jnp.float32)  # never read
    else:
        # Lq less the shortest tile (`_bias_grad`'s square ones): every tile's first
        # `_bias_rows` column, k0 - q0 + shift, is then >= 0.
        shift = q.shape[1] - min(block_q, block_k)
        bias = offset_bias(bias_table, q.shape[1], k.shape[1], not causal, num_buckets, max_distance)
    st = _Static(causal, block_q, block_k, shift, interpret)
    return _per_device(lambda *args: _attention(*args, st), q, k, v, q_seg, k_seg, bias)[:, :lq]
