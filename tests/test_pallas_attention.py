"""The Pallas attention kernel (in Pallas's interpreter on the CPU) and the
`attention_kernel` switch: the same outputs and gradients as the einsum path,
bias-table gradient included, on packed rows with several segments."""

import dataclasses
import logging
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.model import T5Config, Transformer, attention, layers, scan
from flan_jax.model.pallas_attention import offset_bias, t5_attention
from flan_jax.model.relpos import relative_bias

NUM_BUCKETS, MAX_DISTANCE = 32, 20


def _packed_segments(rng, batch: int, length: int) -> np.ndarray:
    """[batch, length] ids 1, 2, 3 in contiguous runs of random lengths, then padding (0)."""
    ids = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(2, length - 6), 2, replace=False))
        end = length - 2 - 3 * row
        ids[row, : cuts[0]], ids[row, cuts[0] : cuts[1]], ids[row, cuts[1] : end] = 1, 2, 3
    return ids


def _einsum_attention(q, k, v, q_seg, k_seg, table, causal):
    """The model's einsum path on the mask and bias the segments and table stand for."""
    mask = layers.segments_mask(layers.Segments(jnp.asarray(q_seg), jnp.asarray(k_seg)), causal)
    bias = jnp.where(mask, 0.0, -1e10)
    if table is not None:
        bias = bias + relative_bias(table, q.shape[1], k.shape[1], not causal, NUM_BUCKETS, MAX_DISTANCE)
    return attention.dot_product_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias, float32_logits=False)


def test_offset_bias_holds_the_bias_of_every_query_key_pair():
    """T5's bias at (q, k) is the offset vector's entry k - q + (query_length - 1)."""
    table = jnp.asarray(np.random.default_rng(0).normal(size=(3, NUM_BUCKETS)), jnp.float32)
    queries, keys = np.arange(70)[:, None], np.arange(90)[None, :]
    for bidirectional in (True, False):
        vector = np.asarray(offset_bias(table, 70, 90, bidirectional, NUM_BUCKETS, MAX_DISTANCE))
        want = np.asarray(relative_bias(table, 70, 90, bidirectional, NUM_BUCKETS, MAX_DISTANCE))[0]
        np.testing.assert_array_equal(vector[:, keys - queries + 69], want)
        assert vector.shape == (3, 70 + 90 - 1)


CASES = {
    # name: (query length, key length, causal, with bias)
    "encoder": (40, 40, False, True),
    "decoder": (36, 36, True, True),
    "cross": (36, 44, False, False),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_einsum_path(case, dtype):
    """Forward, q/k/v gradients and the bucket table's gradient; blocks of 16 so
    that lengths span several blocks and a padded last block."""
    lq, lk, causal, with_bias = CASES[case]
    rng = np.random.default_rng(0)
    batch, heads, depth = 2, 3, 8
    q_seg = _packed_segments(rng, batch, lq)
    k_seg = q_seg if lq == lk else _packed_segments(rng, batch, lk)
    q, k, v = (jnp.asarray(rng.normal(size=(batch, n, heads, depth)), dtype) for n in (lq, lk, lk))
    table = jnp.asarray(rng.normal(size=(heads, NUM_BUCKETS)), jnp.float32) if with_bias else None
    seen = jnp.asarray(q_seg != 0)[:, :, None, None]  # rows that see nothing differ by design
    weights = jnp.asarray(rng.normal(size=(batch, lq, heads, depth)), jnp.float32) * seen

    def kernel(q, k, v, table):
        return t5_attention(
            q, k, v, q_seg, k_seg, table, causal=causal, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE,
            block_q=16, block_k=16,
        )

    def reference(q, k, v, table):
        return _einsum_attention(q, k, v, q_seg, k_seg, table, causal)

    def loss(attention):
        return lambda *args: jnp.sum(attention(*args).astype(jnp.float32) * weights)

    argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
    got, want = (jax.jit(attention)(q, k, v, table) for attention in (kernel, reference))
    got_grads, want_grads = (jax.jit(jax.grad(loss(a), argnums))(q, k, v, table) for a in (kernel, reference))
    tolerance = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(
        np.asarray(jnp.where(seen, got, 0), np.float32), np.asarray(jnp.where(seen, want, 0), np.float32),
        atol=tolerance * 4, rtol=0,
    )
    for name, a, b in zip("qkvt", got_grads, want_grads):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(b).max() > 0, name
        np.testing.assert_allclose(a, b, atol=tolerance * np.abs(b).max(), rtol=0, err_msg=name)


TINY = T5Config(
    vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, num_encoder_layers=2, num_decoder_layers=2,
    mlp_dim=48, dropout_rate=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=16,
)


def _packed_batch(rng):
    """Two rows of three packed examples each: tokens, segment ids (seqio's feature names)."""
    enc_seg, dec_seg = _packed_segments(rng, 2, 24), _packed_segments(rng, 2, 18)
    enc = np.where(enc_seg > 0, rng.integers(2, TINY.vocab_size, enc_seg.shape), 0)
    tgt = np.where(dec_seg > 0, rng.integers(2, TINY.vocab_size, dec_seg.shape), 0)
    first = np.concatenate([np.ones((2, 1), bool), dec_seg[:, 1:] != dec_seg[:, :-1]], axis=1)
    dec_in = np.where(first, 0, np.roll(tgt, 1, axis=1))
    return tuple(jnp.asarray(x) for x in (enc, dec_in, tgt, enc_seg, dec_seg))


def _loss_and_grads(config: T5Config, params, batch, dropout: bool):
    enc, dec_in, tgt, enc_seg, dec_seg = batch

    def loss(p):
        logits = Transformer(config).apply(
            {"params": p}, enc, dec_in, tgt, enc_seg, dec_seg, enable_dropout=dropout,
            rngs={"dropout": jax.random.key(7)},
        )
        log_probs = jax.nn.log_softmax(logits)
        picked = jnp.take_along_axis(log_probs, tgt[..., None], axis=-1)[..., 0]
        return -jnp.sum(picked * (tgt > 0)) / jnp.sum(tgt > 0)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_whole_model_loss_and_grads_equal_with_the_pallas_kernel(scan_layers):
    """Packed rows, dropout on: the kernel path drops the same value vectors as the
    einsum path (the masks are made before either), so loss and gradients agree."""
    base = dataclasses.replace(TINY, scan_layers=scan_layers, dropout_rate=0.1)
    tokens = jnp.ones((1, 8), jnp.int32)
    params = flax.linen.unbox(Transformer(base).init(jax.random.key(0), tokens, tokens, tokens, enable_dropout=False))
    params = params["params"]
    batch = _packed_batch(np.random.default_rng(1))
    want_loss, want_grads = _loss_and_grads(base, params, batch, dropout=True)
    got_loss, got_grads = _loss_and_grads(dataclasses.replace(base, attention_kernel="pallas"), params, batch, dropout=True)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    leaves = jax.tree_util.tree_leaves_with_path(want_grads)
    for (path, want), got in zip(leaves, jax.tree.leaves(got_grads)):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max() + 1e-8, rtol=0, err_msg=str(path))
    relpos = want_grads["encoder"]["relpos_bias"]["rel_embedding"]
    assert np.abs(relpos).max() > 0  # the table's gradient was compared, not zeros


def test_cudnn_kernel_falls_back_to_xla_with_one_warning(caplog):
    """On the CPU the 'cudnn' switch warns once and computes what the XLA path does."""
    params = scan.to_layout(
        flax.linen.unbox(
            Transformer(TINY).init(jax.random.key(0), *(jnp.ones((1, 8), jnp.int32),) * 3, enable_dropout=False)
        )["params"],
        False,
    )
    batch = _packed_batch(np.random.default_rng(2))
    attention.WARNED.clear()
    want_loss, want_grads = _loss_and_grads(TINY, params, batch, dropout=False)
    with caplog.at_level(logging.WARNING, logger="flan_jax.model.attention"):
        got_loss, got_grads = _loss_and_grads(dataclasses.replace(TINY, attention_kernel="cudnn"), params, batch, False)
    warnings = [r for r in caplog.records if "attention_kernel='cudnn'" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max() + 1e-8, rtol=0)


def test_unknown_attention_kernel_is_one_clear_error():
    with pytest.raises(Exception, match="attention_kernel"):
        T5Config(attention_kernel="flash")


FSDP_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    from flan_jax import optim, partitioning, step
    from flan_jax.bench.common import synthetic_batch
    from flan_jax.model import T5Config, Transformer

    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 8
    BASE = T5Config(vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, num_encoder_layers=2, num_decoder_layers=2,
                    mlp_dim=48, dropout_rate=0.1, scan_layers=True, relative_attention_num_buckets=8,
                    relative_attention_max_distance=16)
    lengths = {"inputs": 32, "targets": 16}
    batch = synthetic_batch(8, lengths, BASE.vocab_size)  # packed: several segments per row
    assert batch["encoder_segment_ids"].max() > 1

    def one_step(config, fused_stacked):
        tx = optim.adafactor(learning_rate=1e-2, min_dim_size_to_factor=16, fused_stacked=fused_stacked)
        partitioner = partitioning.Partitioner((8, 1), partitioning.FSDP_LOGICAL_AXIS_RULES)
        model, params, opt_state = step.initialize(Transformer(config), tx, partitioner, lengths, seed=0)
        with partitioner.activate():
            train_step = step.make_train_step(model, tx, partitioner)
            params, opt_state, metrics = train_step(params, opt_state, partitioner.shard_batch(batch),
                                                    jax.random.key(0), jnp.asarray(0))
        return float(metrics["loss"]), jax.device_get(params), params

    ref_loss, ref_params, _ = one_step(BASE, False)
    loss, params, sharded = one_step(dataclasses.replace(BASE, attention_kernel="pallas"), True)
    kernel = sharded["decoder"]["layers"]["mlp"]["wo"]["kernel"]
    assert kernel.addressable_shards[0].data.shape[-1] == 32 // 8, kernel.sharding.spec
    worst = max(np.linalg.norm(a - b) / np.linalg.norm(b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    print(f"loss {loss:.7f} against {ref_loss:.7f}; params max rel diff {worst:.1e}")
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) and worst <= 1e-5
    print("FSDP OK")
""")


def test_pallas_kernel_and_fused_adafactor_under_fsdp_on_8_devices():
    """One training step, 8 fake CPU devices, 8-way FSDP, scanned, packed, dropout on:
    the Pallas kernel with the fused Adafactor equals the einsum path with per_parameter."""
    result = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True, timeout=900)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert "FSDP OK" in result.stdout
