"""Accelerator switches that must not change the numbers: the scanned layer
loop's unroll factor and the fused Adafactor for stacked parameters."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flan_jax import optim
from flan_jax.model import T5Config, Transformer

TINY = T5Config(
    vocab_size=64, emb_dim=32, num_heads=2, head_dim=8, num_encoder_layers=3, num_decoder_layers=3,
    mlp_dim=48, dropout_rate=0.1, scan_layers=True,
)


def _params(config: T5Config):
    tokens = jnp.ones((1, 8), jnp.int32)
    return flax.linen.unbox(Transformer(config).init(jax.random.key(0), tokens, tokens, tokens, enable_dropout=False))[
        "params"
    ]


def test_unrolled_scan_equals_the_scan():
    """scan_unroll=2 unrolls the 3-layer encoder partly (with a remainder) and the
    2-layer decoder fully: same loss and gradients (dropout on), the parameter
    tree still stacked."""
    config = dataclasses.replace(TINY, num_decoder_layers=2)
    params = _params(config)
    unrolled = dataclasses.replace(config, scan_unroll=2)
    assert jax.tree.structure(jax.eval_shape(lambda: _params(unrolled))) == jax.tree.structure(params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, TINY.vocab_size, (2, 12)))

    def loss_and_grads(config):
        def loss(p):
            logits = Transformer(config).apply({"params": p}, tokens, tokens, tokens, rngs={"dropout": jax.random.key(1)})
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

        return jax.jit(jax.value_and_grad(loss))(params)

    def scan_unrolls(config):
        jaxpr = jax.make_jaxpr(lambda p: Transformer(config).apply({"params": p}, tokens, tokens, tokens, enable_dropout=False))
        return sorted(e.params["unroll"] for e in jaxpr(params).jaxpr.eqns if e.primitive.name == "scan")

    assert scan_unrolls(config) == [1, 1] and scan_unrolls(unrolled) == [2, 2]  # the switch reached lax.scan
    want_loss, want_grads = loss_and_grads(config)
    got_loss, got_grads = loss_and_grads(unrolled)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max() + 1e-9, rtol=0)


def test_scan_unroll_must_be_positive():
    with pytest.raises(Exception, match="scan_unroll"):
        T5Config(scan_unroll=0)


@pytest.mark.parametrize("min_dim_size_to_factor", [16, 128], ids=["factored", "unfactored"])
def test_fused_adafactor_equals_per_parameter_over_ten_steps(min_dim_size_to_factor):
    """Scanned parameters, warmup or constant rate, clipping and parameter scaling on:
    parameters and optimizer state within 1e-6 relative of `per_parameter`'s."""
    params = _params(TINY)
    warmup_steps = 3 if min_dim_size_to_factor == 16 else 0  # a schedule, and a constant rate
    kwargs = dict(learning_rate=1e-2, warmup_steps=warmup_steps, min_dim_size_to_factor=min_dim_size_to_factor)
    reference, fused = optim.adafactor(**kwargs), optim.adafactor(**kwargs, fused_stacked=True)
    states = [tx.init(params) for tx in (reference, fused)]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
    factored = [s for s in jax.tree.leaves(states[0], is_leaf=lambda x: isinstance(x, optax.FactoredState))
                if isinstance(s, optax.FactoredState) and s.v_row.size > s.v_row.shape[0]]
    assert bool(factored) == (min_dim_size_to_factor == 16)

    def step(p, state, grads, which):
        tx = (reference, fused)[which]
        updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    step = jax.jit(step, static_argnums=3)
    ours = [params, params]
    rng = np.random.default_rng(0)
    for _ in range(10):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * rng.uniform(0.01, 3.0), p.dtype), params)
        for which in (0, 1):
            ours[which], states[which] = step(ours[which], states[which], grads, which)
    for got, want in zip(jax.tree.leaves((ours[1], states[1])), jax.tree.leaves((ours[0], states[0]))):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ours[0]), jax.tree.leaves(params)))
    assert moved > 1e-3


def test_xla_presets_combine_and_reject_unknown_names():
    from flan_jax import xla_presets
    from flan_jax.errors import UserError

    both = xla_presets.flags("lhs+no_triton_gemm")
    assert both == [*xla_presets.PRESETS["lhs"], *xla_presets.PRESETS["no_triton_gemm"]]
    assert xla_presets.flags("") == xla_presets.flags("none") == []
    env = xla_presets.with_flags({"XLA_FLAGS": "--xla_foo=1"}, "lhs")
    assert env["XLA_FLAGS"] == "--xla_foo=1 " + " ".join(xla_presets.PRESETS["lhs"])
    with pytest.raises(UserError, match="'lsh'.*lhs"):
        xla_presets.flags("lsh")


def test_every_xla_preset_is_a_flag_this_xla_knows():
    """XLA aborts the process on an unknown flag: start one per preset."""
    import subprocess
    import sys

    from flan_jax import xla_presets

    for name in xla_presets.PRESETS:
        env = xla_presets.with_flags({"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}, name)
        result = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (name, result.stderr[-2000:])
