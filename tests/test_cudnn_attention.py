"""attention_kernel='cudnn' on the CPU: the packed layout handed to cuDNN's
fused attention (JAX's private API, replaced here by a recorder), and the
compile-time fallback to the XLA route (`step.FallbackJit`)."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compiler
from jax._src.cudnn import fused_attention_stablehlo as cudnn

from flan_jax import optim, partitioning, step, trainer
from flan_jax.bench.common import synthetic_batch
from flan_jax.errors import UserError
from flan_jax.model import T5Config, Transformer, cudnn_attention
from flan_jax.model.config import with_segment_bound
from flan_jax.model.layers import Segments

# Segment ids as `layers.kernel_segments` gives them: seqio's id + 1, 0 for padding.
ENCODER = np.array([
    [2, 2, 2, 3, 3, 4, 4, 4, 4, 0, 0, 0],  # three examples, then padding
    [2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0],  # one
    [2, 2, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0],  # example 2 has no inputs
], np.int32)
DECODER = np.array([
    [2, 3, 3, 4, 4, 4, 0, 0],
    [2, 2, 2, 0, 0, 0, 0, 0],
    [2, 3, 3, 4, 0, 0, 0, 0],  # example 2's targets see no inputs
], np.int32)


def _layout(query: np.ndarray, key: np.ndarray, num_slots: int) -> dict[str, np.ndarray]:
    layout = jax.jit(cudnn_attention.packed_layout, static_argnums=1)(Segments(jnp.asarray(query), jnp.asarray(key)), num_slots)
    return {name: np.asarray(x) for name, x in layout._asdict().items()}


def test_self_attention_layout_has_one_slot_per_example():
    """Slots follow the ids: the third row's missing example 2 leaves slot 1 unused."""
    got = _layout(ENCODER, ENCODER, 4)
    np.testing.assert_array_equal(got["q_seqlen"], [[3, 2, 4, -1], [5, -1, -1, -1], [2, -1, 3, -1]])
    np.testing.assert_array_equal(got["q_offsets"], [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1], [0, -1, 2, -1, -1]])
    np.testing.assert_array_equal(got["kv_seqlen"], got["q_seqlen"])
    np.testing.assert_array_equal(got["kv_offsets"], got["q_offsets"])
    np.testing.assert_array_equal(got["covered"], ENCODER != 0)
    assert not got["overflow"].any()


def test_cross_attention_pairs_slots_by_example():
    """Slot m holds example m on both sides; an example empty on one side uses
    its slot on neither (cuDNN drops -1s per side, then pairs by position)."""
    got = _layout(DECODER, ENCODER, 4)
    np.testing.assert_array_equal(got["q_seqlen"], [[1, 2, 3, -1], [3, -1, -1, -1], [1, -1, 1, -1]])
    np.testing.assert_array_equal(got["kv_seqlen"], [[3, 2, 4, -1], [5, -1, -1, -1], [2, -1, 3, -1]])
    np.testing.assert_array_equal(got["q_offsets"], [[0, 1, 3, -1, -1], [0, -1, -1, -1, -1], [0, -1, 3, -1, -1]])
    np.testing.assert_array_equal(got["kv_offsets"], [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1], [0, -1, 2, -1, -1]])
    np.testing.assert_array_equal(got["covered"][2], [True, False, False, True, False, False, False, False])
    assert not got["overflow"].any()
    np.testing.assert_array_equal(_layout(DECODER, ENCODER, 2)["overflow"], [True, False, True])


@pytest.mark.parametrize("max_segments, slots", [(0, 8), (2, 2)])
def test_cudnn_gets_the_layout_with_one_m(monkeypatch, max_segments, slots):
    """What `cudnn_attention.packed_attention` hands to JAX's cuDNN function: [b, M] and
    [b, M + 1] on both sides with one M (default: the shorter side's length);
    uncovered query tokens get zeros, rows over M get NaN."""
    calls = []

    def record(query, key, value, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets, **kwargs):
        calls.append((q_seqlen, kv_seqlen, q_offsets, kv_offsets, kwargs["mask_type"]))
        return jnp.ones_like(query)

    monkeypatch.setattr(cudnn, "dot_product_attention", record)
    query = jnp.ones((3, DECODER.shape[1], 2, 8), jnp.bfloat16)
    kv = jnp.ones((3, ENCODER.shape[1], 2, 8), jnp.bfloat16)
    out = cudnn_attention.packed_attention(
        query, kv, kv, Segments(jnp.asarray(DECODER), jnp.asarray(ENCODER)), None, False, max_segments
    )
    (q_seqlen, kv_seqlen, q_offsets, kv_offsets, mask_type), = calls
    assert q_seqlen.shape == kv_seqlen.shape == (3, slots) and q_offsets.shape == kv_offsets.shape == (3, slots + 1)
    assert q_seqlen.dtype == q_offsets.dtype == jnp.int32 and mask_type == cudnn.MaskType.PADDING
    want = _layout(DECODER, ENCODER, slots)
    np.testing.assert_array_equal(q_seqlen, want["q_seqlen"])
    np.testing.assert_array_equal(kv_offsets, want["kv_offsets"])
    out = np.asarray(out, np.float32)[..., 0, 0]  # [b, q]
    overflow = want["overflow"][:, None]
    np.testing.assert_array_equal(out, np.where(overflow, np.nan, want["covered"].astype(np.float32)))
    assert overflow.any() == (max_segments == 2)


def test_training_bounds_the_slots_by_the_feature_lengths():
    assert cudnn_attention.segment_bound(0, 8, 12) == 8 and cudnn_attention.segment_bound(40, 8, 12) == 40
    assert cudnn_attention.segment_bound(1, 8, 12) == 2  # JAX takes M = 1 for the unpacked layout
    config = T5Config(attention_kernel="cudnn")
    assert with_segment_bound(config, {"inputs": 1024, "targets": 256}).max_segments_per_row == 256
    fixed = dataclasses.replace(config, max_segments_per_row=40)
    assert with_segment_bound(fixed, {"inputs": 1024, "targets": 256}) is fixed
    assert with_segment_bound(T5Config(), {"inputs": 1024, "targets": 256}).max_segments_per_row == 0


def test_training_stops_at_a_batch_over_the_bound():
    config = T5Config(attention_kernel="cudnn", max_segments_per_row=3)
    batch = {"encoder_segment_ids": np.array([[1, 2, 3, 0]]), "decoder_segment_ids": np.array([[1, 2, 3, 3]])}
    trainer.check_segment_bound(batch, config)
    trainer.check_segment_bound({"encoder_input_tokens": np.ones((1, 4))}, config)  # unpacked
    batch["encoder_segment_ids"] = np.array([[1, 2, 3, 4]])
    with pytest.raises(UserError, match="4 examples, more than T5Config.max_segments_per_row=3"):
        trainer.check_segment_bound(batch, config)


TINY = T5Config(
    vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, num_encoder_layers=1, num_decoder_layers=1,
    mlp_dim=48, dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16,
)
LENGTHS = {"inputs": 16, "targets": 8}


def _losses_after_one_step(kernels: tuple[str, ...]) -> list[tuple[float, step.FallbackJit]]:
    """One step from the same start with each kernel in turn: (loss, the step)."""
    tx = optim.adafactor(learning_rate=1e-2)
    partitioner = partitioning.Partitioner(devices=jax.devices()[:1])
    model, params, opt_state = step.initialize(Transformer(TINY), tx, partitioner, LENGTHS, seed=0)
    out = []
    with partitioner.activate():
        batch = partitioner.shard_batch(synthetic_batch(2, LENGTHS, TINY.vocab_size))
        for kernel in kernels:
            module = Transformer(dataclasses.replace(TINY, attention_kernel=kernel))
            train_step = step.make_train_step(dataclasses.replace(model, module=module), tx, partitioner)
            state = jax.tree.map(jnp.copy, (params, opt_state))  # the step donates them
            _, _, metrics = train_step(*state, batch, jax.random.key(0), jnp.asarray(0))
            out.append((float(metrics["loss"]), train_step))
    return out


REJECTION = "INTERNAL: cuDNN fused attention: no valid engine configs for __cudnn$fmhaSoftmax"


def _reject_first_compile(monkeypatch, name: str, message: str = REJECTION) -> None:
    """XLA's first compilation of the jitted function `name` raises what XLA raises
    when it rejects a custom call (calls and `lower(...).compile()` both get here)."""
    compile_for_real = compiler.compile_or_get_cached
    rejected = []

    def compile_or_reject(backend, computation, *args, **kwargs):
        if not rejected and str(computation.operation.attributes["sym_name"]) == f'"jit_{name}"':
            rejected.append(name)
            raise jax.errors.JaxRuntimeError(message)
        return compile_for_real(backend, computation, *args, **kwargs)

    monkeypatch.setattr(compiler, "compile_or_get_cached", compile_or_reject)


def _fallback_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flan_jax.step"]


def test_a_cudnn_rejection_at_compile_time_falls_back_to_xla(monkeypatch, caplog):
    """The train step: one line, the XLA route, the XLA route's loss."""
    _reject_first_compile(monkeypatch, "train_step")
    with caplog.at_level(logging.WARNING, logger="flan_jax.step"):
        (got_loss, train_step), (want_loss, _) = _losses_after_one_step(("cudnn", "xla"))
    assert _fallback_lines(caplog) == [f"attention_kernel='cudnn' did not compile here ({REJECTION}); using 'xla'"]
    assert train_step.module.config.attention_kernel == "xla"
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)


def _add_one_fallback(kernel: str) -> step.FallbackJit:
    """A FallbackJit of a function new to JAX's caches (so that XLA compiles it), named add_one."""

    def add_one(x):
        return x + 1

    return step.FallbackJit(lambda module: jax.jit(add_one), Transformer(dataclasses.replace(TINY, attention_kernel=kernel)))


@pytest.mark.parametrize("ahead_of_time", [False, True], ids=["call", "lower_compile"])
def test_the_fallback_also_serves_ahead_of_time_compiles(monkeypatch, caplog, ahead_of_time):
    fn = _add_one_fallback("cudnn")
    _reject_first_compile(monkeypatch, "add_one")
    with caplog.at_level(logging.WARNING, logger="flan_jax.step"):
        out = fn.lower(jnp.ones(3)).compile()(jnp.ones(3)) if ahead_of_time else fn(jnp.ones(3))
    np.testing.assert_array_equal(out, 2.0)
    assert len(_fallback_lines(caplog)) == 1 and fn.module.config.attention_kernel == "xla"


@pytest.mark.parametrize("kernel, message", [("cudnn", "RESOURCE_EXHAUSTED: out of memory"), ("xla", REJECTION)])
def test_other_compile_errors_are_not_swallowed(monkeypatch, kernel, message):
    """Only cuDNN's rejection of the 'cudnn' route falls back."""
    fn = _add_one_fallback(kernel)
    _reject_first_compile(monkeypatch, "add_one", message)
    with pytest.raises(jax.errors.JaxRuntimeError, match=message.split(":")[0]):
        fn(jnp.ones(3))
