"""`flan-jax bench attention_check`: an attention kernel's forward output and
gradients (dq, dk, dv, bias table) against the einsum reference, at a
model's attention shapes, before `launch/bench_matrix.py` times the kernel.

A zeroed bias-table gradient moved a tiny model's last-step loss by 0.01%,
so a loss comparison alone lets a broken backward pass through; this
compares the gradients themselves.

Three calls per dtype, as the model makes them on packed rows
(`synthetic_batch`'s segment ids): the encoder's self-attention
(bidirectional bias), the decoder's (causal, bias) and cross-attention (no
bias). The kernel runs as `MultiHeadDotProductAttention` calls it outside
decoding (`kernel_attention`); the reference is its 'xla' route:
`dot_product_attention` on the mask and bias the segments and table stand for.

Errors are max |kernel - reference| / max |reference| per quantity (output
on query rows that see something: rows that see nothing are padding and
differ by design). Tolerances (`TOLERANCES`):
  float32 at matmul precision 'highest': 1e-4. Both sides compute in float32;
    the kernel's tiled online softmax and per-offset sums only reorder
    additions (measured: <= 2e-6 on CPU at 80/40 tokens; rounding grows
    ~sqrt(length), so 1024 keys leave a wide margin). A wrong gradient is off by O(1).
  bfloat16: 3e-2. Inputs and the weights-times-values product are bf16 on
    both sides (8-bit mantissa, 4e-3 per rounding), in different orders and
    roundings, so a few ulps of the largest value; still far below the
    O(1) error of a missing or misplaced gradient term.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax.bench.common import synthetic_batch
from flan_jax.model import T5Config, attention
from flan_jax.model.config import with_segment_bound
from flan_jax.model.layers import Array, Segments, segments_mask
from flan_jax.model.relpos import relative_bias

KERNELS = ("pallas", "cudnn")
DTYPES = ("float32", "bfloat16")
TOLERANCES = {"float32": 1e-4, "bfloat16": 3e-2}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """One model's attention calls: batch, heads x head_dim, lengths, relative-position buckets."""

    batch: int
    heads: int
    head_dim: int
    lengths: Mapping[str, int]  # {"inputs": encoder length, "targets": decoder length}
    num_buckets: int = 32
    max_distance: int = 128
    float32_logits: bool = False


# Small enough for Pallas's interpreter on a CPU (seconds); lengths span two
# 64-blocks with a padded last one.
TINY = Shapes(batch=2, heads=2, head_dim=16, lengths={"inputs": 80, "targets": 40}, num_buckets=8, max_distance=16)


def model_shapes(config: T5Config, batch: int, lengths: Mapping[str, int]) -> Shapes:
    """The attention shapes of `config` training on `batch` rows of `lengths`."""
    return Shapes(batch, config.num_heads, config.head_dim, dict(lengths), config.relative_attention_num_buckets,
                  config.relative_attention_max_distance, config.float32_attention_logits)


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention call of the model."""

    name: str
    query: str  # "inputs" or "targets": whose length and segments
    key: str
    causal: bool
    bias: bool


CASES = (
    Case("encoder self-attention", "inputs", "inputs", causal=False, bias=True),
    Case("decoder self-attention", "targets", "targets", causal=True, bias=True),
    Case("cross-attention", "targets", "inputs", causal=False, bias=False),
)


@dataclasses.dataclass
class CaseResult:
    """One call in one dtype: errors per quantity and whether all are within the tolerance."""

    case: str
    dtype: str
    route: str  # what actually ran, e.g. "pallas (interpreter)" or "xla fallback: ..."
    errors: dict[str, float]  # quantity -> max |kernel - reference| / max |reference|
    tolerance: float
    passed: bool
    error: str = ""  # the exception, when the kernel did not run


@dataclasses.dataclass
class CheckResult:
    """Every case of one kernel; `passed` only if all passed."""

    kernel: str
    shapes: dict
    backend: str
    cases: list[CaseResult]
    passed: bool

    def lines(self) -> list[str]:
        out = [f"attention check: {self.kernel} against the einsum reference on {self.backend}, {self.shapes}"]
        for c in self.cases:
            figures = c.error or ", ".join(f"{k} {v:.1e}" for k, v in c.errors.items())
            out.append(f"  {c.case:24} {c.dtype:9} {'ok  ' if c.passed else 'FAIL'} (tol {c.tolerance:.0e}) "
                       f"{figures}  [{c.route}]")
        out.append("gradients agree with the reference" if self.passed else "gradients differ from the reference")
        return out


def kernel_attention(kernel: str, shapes: Shapes, causal: bool) -> Callable[..., Array]:
    """(q [b, q, h, d], k/v [b, k, h, d], Segments, table [h, n] | None) -> [b, q, h, d] through
    `kernel`, as `MultiHeadDotProductAttention` calls it outside decoding."""
    config = with_segment_bound(T5Config(attention_kernel=kernel), shapes.lengths)  # the slots training uses

    def run(q, k, v, segments, table):
        return attention.kernel_attention(
            kernel, q, k, v, segments, table, causal=causal, num_buckets=shapes.num_buckets,
            max_distance=shapes.max_distance, max_segments=config.max_segments_per_row,
        )
    return run


def reference_attention(shapes: Shapes, causal: bool) -> Callable[..., Array]:
    """The 'xla' route on the same arguments as `kernel_attention`'s function."""
    def run(q, k, v, segments, table):
        bias = jnp.where(segments_mask(segments, causal), 0.0, attention.MASK_VALUE)  # [b, 1, q, k]
        if table is not None:
            bias = bias + _bias(table, q.shape[1], k.shape[1], causal, shapes)
        heads_first = (0, 2, 1, 3)  # the einsum path's key/value layout [b, h, k, d]
        return attention.dot_product_attention(q, k.transpose(heads_first), v.transpose(heads_first), bias,
                                               float32_logits=shapes.float32_logits)
    return run


def _bias(table: Array, lq: int, lk: int, causal: bool, shapes: Shapes) -> Array:
    """[h, n] -> [1, h, q, k]; T5's bias is bidirectional except in the decoder's self-attention."""
    return relative_bias(table, lq, lk, not causal, shapes.num_buckets, shapes.max_distance)


def _inputs(case: Case, shapes: Shapes, dtype: str, seed: int) -> tuple[tuple, Array, Array]:
    """((q, k, v, segments, table), cotangent [b, q, h, d] float32, seen [b, q, 1, 1])."""
    batch = synthetic_batch(shapes.batch, shapes.lengths, vocab_size=100, seed=seed)
    ids = {"inputs": batch["encoder_segment_ids"], "targets": batch["decoder_segment_ids"]}  # 0 = padding
    segments = Segments(jnp.asarray(ids[case.query]), jnp.asarray(ids[case.key]))
    rng = np.random.default_rng(seed)
    lq, lk, h, d = shapes.lengths[case.query], shapes.lengths[case.key], shapes.heads, shapes.head_dim
    # The query scaled by d^-1/2 as T5 folds it into its kernel: logits of order 1.
    q = jnp.asarray(rng.normal(size=(shapes.batch, lq, h, d)) * d**-0.5, dtype)
    k, v = (jnp.asarray(rng.normal(size=(shapes.batch, lk, h, d)), dtype) for _ in range(2))
    table = jnp.asarray(rng.normal(size=(h, shapes.num_buckets)), jnp.float32) if case.bias else None
    seen = (segments.query != 0)[:, :, None, None]
    cotangent = jnp.asarray(rng.normal(size=(shapes.batch, lq, h, d)), jnp.float32) * seen
    return (q, k, v, segments, table), cotangent, seen


def _output_and_grads(fn: Callable[..., Array], args: tuple, cotangent: Array, with_bias: bool) -> list[np.ndarray]:
    """[output, dq, dk, dv(, dtable)] of sum(fn(args) * cotangent), as float32 numpy arrays."""
    argnums = (0, 1, 2, 4) if with_bias else (0, 1, 2)

    def loss(q, k, v, segments, table):
        out = fn(q, k, v, segments, table)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(*args)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


def _route(kernel: str) -> str:
    """What `kernel` ran as, read from the fallback warning `attention` logs when tracing."""
    if kernel == "pallas":
        return "pallas (Triton)" if jax.default_backend() == "gpu" else "pallas (interpreter: not what a GPU runs)"
    fallback = [m for m in attention.WARNED if m.startswith("attention_kernel='cudnn'")]
    return f"xla fallback, cuDNN not checked: {fallback[0]}" if fallback else "cudnn"


def check_case(kernel: str, shapes: Shapes, case: Case, dtype: str, seed: int = 0) -> CaseResult:
    """One call in one dtype: the kernel's output and gradients against the reference's."""
    args, cotangent, seen = _inputs(case, shapes, dtype, seed)
    attention.WARNED.difference_update([m for m in attention.WARNED if m.startswith("attention_kernel='cudnn'")])
    # float32 at full precision (GPUs would otherwise use TF32); bf16 as training runs it.
    precision = jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
    try:
        with precision:
            got = _output_and_grads(kernel_attention(kernel, shapes, case.causal), args, cotangent, case.bias)
            want = _output_and_grads(reference_attention(shapes, case.causal), args, cotangent, case.bias)
    except Exception as e:  # noqa: BLE001 (a kernel that does not compile or run here fails the check, with why)
        return CaseResult(case.name, dtype, kernel, {}, TOLERANCES[dtype], False, f"{type(e).__name__}: {e}"[:500])
    mask = np.asarray(seen)
    got[0], want[0] = got[0] * mask, want[0] * mask  # rows that see nothing differ by design
    names = ("output", "dq", "dk", "dv", "dtable")
    errors = {n: float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) for n, a, b in zip(names, got, want)}
    passed = all(e <= TOLERANCES[dtype] for e in errors.values())
    return CaseResult(case.name, dtype, _route(kernel), errors, TOLERANCES[dtype], passed)


def check_attention(
    kernel: str, shapes: Shapes, dtypes: Sequence[str] = DTYPES, cases: Sequence[Case] = CASES, seed: int = 0
) -> CheckResult:
    """Every call of `cases` in every dtype; passed only if all are within `TOLERANCES`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: expected one of {KERNELS} ('xla' is the reference)")
    results = [check_case(kernel, shapes, case, dtype, seed) for dtype in dtypes for case in cases]
    return CheckResult(kernel, dataclasses.asdict(shapes), jax.default_backend(), results,
                       all(r.passed for r in results))


def bench_attention_check(kernel: str, shapes: Shapes, json_out: str | None = None) -> bool:
    """Prints the check (and writes it to `json_out` as JSON); True if it passed."""
    result = check_attention(kernel, shapes)
    print("\n".join(result.lines()), flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(dataclasses.asdict(result), f, indent=1)
    return result.passed
