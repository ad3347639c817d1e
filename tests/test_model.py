"""The T5 model: gin configs, parameter tree, HF parity, packing, kv cache."""

import dataclasses
import functools
import os
from pathlib import Path

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import pack_row

from flan_jax import decoding
from flan_jax.errors import UserError
from flan_jax.formats.hf import params_from_hf_state_dict
from flan_jax.model import T5Config, Transformer, scan

nn_unbox = flax.linen.unbox

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("FLAN_JAX_FIXTURES_DIR", REPO.parent / "shared" / "fixtures"))


TINY = T5Config(
    vocab_size=256, emb_dim=64, num_heads=4, head_dim=16, num_encoder_layers=2, num_decoder_layers=2,
    mlp_dim=128, dropout_rate=0.0,
)


def _init(config: T5Config, seed: int = 0):
    tokens = jnp.ones((1, 8), jnp.int32)
    variables = Transformer(config).init(jax.random.key(seed), tokens, tokens, tokens, enable_dropout=False)
    return flax.linen.unbox(variables["params"])


def _random_tokens(rng, shape, vocab, lengths):
    """Rows of random ids ending in EOS (1) at `lengths`, then padding."""
    tokens = rng.integers(2, vocab, shape)
    for row, n in enumerate(lengths):
        tokens[row, n - 1] = 1
        tokens[row, n:] = 0
    return tokens


def _shift_right(targets):
    return np.pad(targets, ((0, 0), (1, 0)))[:, :-1]


# ------------------------------------------------------------------ configs


# Parameter counts of the published checkpoints (HF's T5ForConditionalGeneration).
KNOWN_PARAM_COUNTS = {
    "flan_t5_small": 76_961_152,
    "flan_t5_base": 247_577_856,
    "t5_1_1_small": 76_961_152,
    "t5_1_1_base": 247_577_856,
    "t5_small": 60_506_624,
    "t5_base": 222_903_552,
}


def _model_gin_files():
    return sorted((REPO / "gin" / "models").glob("*.gin"))


def test_every_model_gin_file_parses():
    names = {path.stem for path in _model_gin_files()}
    sizes = ("small", "base", "large", "xl", "xxl")
    assert {f"t5_1_1_{s}" for s in sizes} | {f"flan_t5_{s}" for s in sizes} | {"t5_small", "t5_base", "tiny"} <= names
    try:
        for path in _model_gin_files():
            gin.clear_config()
            gin.parse_config_file(str(path))
            config = T5Config()
            assert config.vocab_size == (1024 if path.stem == "tiny" else 32128), path
            original_t5 = path.stem in ("t5_small", "t5_base")
            assert config.mlp_activations == (("relu",) if original_t5 else ("gelu", "linear")), path
            assert config.logits_via_embedding == original_t5, path
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name", sorted(KNOWN_PARAM_COUNTS))
def test_published_sizes_have_known_parameter_counts(name):
    try:
        gin.clear_config()
        gin.parse_config_file(str(REPO / "gin" / "models" / f"{name}.gin"))
        config = T5Config()
    finally:
        gin.clear_config()
    tokens = jnp.ones((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), tokens, tokens, tokens))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])) == KNOWN_PARAM_COUNTS[name]


def test_parameter_tree_and_axes_match_t5x():
    shapes_file = FIXTURES / "t5x" / "param_shapes.txt"
    if not shapes_file.exists():
        pytest.skip("T5X fixture not found")
    config = T5Config(
        vocab_size=512, emb_dim=64, num_heads=4, head_dim=16, num_encoder_layers=2, num_decoder_layers=2,
        mlp_dim=128,
    )
    tokens = jnp.ones((1, 4), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), tokens, tokens, tokens))["params"]
    flat = flax.traverse_util.flatten_dict(boxed, sep="/")
    got = {path: tuple(leaf.value.shape) for path, leaf in flat.items()}
    want = {}
    for line in shapes_file.read_text().splitlines():
        if line and not line.startswith("#"):
            path, shape, _ = line.split("\t")
            want[path] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    assert got == want
    axes = {path: leaf.names for path, leaf in flat.items()}
    assert axes["token_embedder/embedding"] == ("vocab", "embed")
    assert axes["encoder/relpos_bias/rel_embedding"] == ("heads", "relpos_buckets")
    assert axes["encoder/layers_0/attention/query/kernel"] == ("embed", "joined_kv")
    assert axes["decoder/layers_1/self_attention/out/kernel"] == ("joined_kv", "embed")
    assert axes["decoder/layers_0/mlp/wo/kernel"] == ("mlp", "embed")
    assert axes["decoder/logits_dense/kernel"] == ("embed", "vocab")


def test_scanned_parameter_tree_stacks_the_layers():
    """Scanned stacks hold `layers/...` with a leading 'layers' axis; the tree
    converts to and from the unrolled one without loss."""
    config = dataclasses.replace(TINY, scan_layers=True, num_encoder_layers=3)
    tokens = jnp.ones((1, 4), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), tokens, tokens, tokens))["params"]
    flat = flax.traverse_util.flatten_dict(boxed, sep="/")
    query = flat["encoder/layers/attention/query/kernel"]
    assert query.names == ("layers", "embed", "joined_kv") and query.value.shape == (3, 64, 64)
    assert flat["decoder/layers/mlp/wo/kernel"].value.shape == (2, 128, 64)
    assert "encoder/relpos_bias/rel_embedding" in flat  # shared by all layers: not stacked
    unrolled = _init(dataclasses.replace(config, scan_layers=False))
    stacked = scan.stack_layers(unrolled)
    assert jax.tree.structure(stacked) == jax.tree.structure(nn_unbox(boxed))
    np.testing.assert_array_equal(
        stacked["encoder"]["layers"]["mlp"]["wi_0"]["kernel"][2], unrolled["encoder"]["layers_2"]["mlp"]["wi_0"]["kernel"]
    )
    back = scan.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(unrolled)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(unrolled)):
        np.testing.assert_array_equal(a, b)


# -------------------------------------------------------------- HF parity


def _hf_model(v1_1: bool, seed: int = 0):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf_config = transformers.T5Config(
        vocab_size=TINY.vocab_size, d_model=TINY.emb_dim, d_kv=TINY.head_dim, d_ff=TINY.mlp_dim,
        num_layers=TINY.num_encoder_layers, num_decoder_layers=TINY.num_decoder_layers, num_heads=TINY.num_heads,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu" if v1_1 else "relu", tie_word_embeddings=not v1_1,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    if v1_1:
        # transformers 5.x ties lm_head to `shared` even with tie_word_embeddings=False.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(TINY.vocab_size, TINY.emb_dim) * 0.5)
        assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if v1_1:
        assert not np.array_equal(state["lm_head.weight"], state["shared.weight"])
    return model, state


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("v1_1", [True, False], ids=["v1_1_gated_gelu_untied", "original_relu_tied"])
def test_logits_match_hf(v1_1, scan_layers):
    import torch

    hf, state = _hf_model(v1_1)
    config = TINY if v1_1 else dataclasses.replace(TINY, mlp_activations=("relu",), logits_via_embedding=True)
    config = dataclasses.replace(config, scan_layers=scan_layers)
    params = params_from_hf_state_dict(state, config)
    assert ("layers" in params["encoder"]) == scan_layers
    rng = np.random.default_rng(1)
    encoder_tokens = _random_tokens(rng, (3, 14), config.vocab_size, [14, 9, 5])
    targets = _random_tokens(rng, (3, 10), config.vocab_size, [10, 6, 3])
    decoder_inputs = _shift_right(targets)

    got = Transformer(config).apply(
        {"params": params}, jnp.asarray(encoder_tokens), jnp.asarray(decoder_inputs), jnp.asarray(targets),
        enable_dropout=False,
    )
    with torch.no_grad():
        want = hf(
            input_ids=torch.tensor(encoder_tokens),
            attention_mask=torch.tensor(encoder_tokens > 0),
            decoder_input_ids=torch.tensor(decoder_inputs),
        ).logits.numpy()
    real = targets > 0
    assert np.abs(want[real]).max() > 0.1  # not a degenerate model
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-4, rtol=0)


def test_hf_mapping_rejects_a_mismatched_config():
    state = {k: np.zeros(v.shape, v.dtype) for k, v in _hf_model(v1_1=True)[1].items()}
    with pytest.raises(UserError, match="does not fit"):
        params_from_hf_state_dict(state, dataclasses.replace(TINY, mlp_dim=96))
    del state["lm_head.weight"]
    with pytest.raises(UserError, match="lm_head"):
        params_from_hf_state_dict(state, TINY)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("fused_attention", [False, True], ids=["einsum", "fused"])
def test_packed_example_sees_what_it_sees_alone(fused_attention):
    params = _init(TINY)
    model = Transformer(dataclasses.replace(TINY, fused_attention=fused_attention))
    apply = jax.jit(model.apply, static_argnames="enable_dropout")
    rng = np.random.default_rng(2)
    # Three examples (inputs, targets), EOS-terminated.
    examples = [
        (_random_tokens(rng, (1, n), TINY.vocab_size, [n])[0], _random_tokens(rng, (1, m), TINY.vocab_size, [m])[0])
        for n, m in [(5, 4), (7, 3), (4, 5)]
    ]

    enc, enc_seg, enc_pos = pack_row([x for x, _ in examples], 20)
    tgt, dec_seg, dec_pos = pack_row([y for _, y in examples], 14)
    # seqio shifts targets right within each packed example.
    dec_in = np.where(dec_pos == 0, 0, np.roll(tgt, 1, axis=1))
    packed = apply(
        {"params": params}, enc, dec_in, tgt, enc_seg, dec_seg, enc_pos, dec_pos, enable_dropout=False
    )
    for segment, (inputs, targets) in enumerate(examples, 1):
        alone = apply(
            {"params": params}, inputs[None], _shift_right(targets[None]), targets[None], enable_dropout=False
        )
        rows = np.asarray(dec_seg[0] == segment)
        np.testing.assert_allclose(np.asarray(packed)[0, rows], np.asarray(alone)[0], atol=1e-5, rtol=0)


# --------------------------------------------------------------- kv cache


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("extra_cache", [0, 5])
def test_cached_decoding_matches_the_full_forward_pass(extra_cache, scan_layers):
    params = scan.to_layout(_init(TINY, seed=3), scan_layers)
    model = Transformer(dataclasses.replace(TINY, scan_layers=scan_layers))
    rng = np.random.default_rng(3)
    encoder_tokens = _random_tokens(rng, (2, 12), TINY.vocab_size, [12, 7])
    targets = rng.integers(2, TINY.vocab_size, (2, 9))
    decoder_inputs = _shift_right(targets)
    full = jax.jit(model.apply, static_argnames="enable_dropout")(
        {"params": params}, encoder_tokens, decoder_inputs, targets, enable_dropout=False
    )

    cache, step = decoding.prepare_decoder(model, params, jnp.asarray(encoder_tokens), targets.shape[1] + extra_cache)
    step = jax.jit(step)
    for t in range(targets.shape[1]):
        logits, cache = step(jnp.asarray(decoder_inputs[:, t]), cache)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, t]), atol=1e-5, rtol=0, err_msg=f"step {t}")


def test_a_scanned_decoding_step_is_unrolled_and_carries_only_the_self_attention_cache():
    """What keeps a scanned model's decoding step fast (`flan-jax bench decode --scan_layers`):
    the step runs its layers unrolled, the cross-attention projections stay out of the
    carried cache, and the decoder layers' kernels arrive in the activation dtype."""
    config = dataclasses.replace(TINY, num_decoder_layers=3, dtype="bfloat16")
    params = scan.to_layout(_init(config, seed=3), True)
    config = dataclasses.replace(config, scan_layers=True)
    model = Transformer(config)
    tokens = jnp.ones((2, 6), jnp.int32)
    cache, step = decoding.prepare_decoder(model, params, tokens, 4)
    names = {getattr(k, "key", None) for path, _ in jax.tree_util.tree_leaves_with_path(cache) for k in path}
    assert {"cached_key", "cached_value"} <= names and not names & {"projected_key", "projected_value"}
    jaxpr = jax.make_jaxpr(step)(jnp.zeros((2,), jnp.int32), cache)
    assert [e.params["unroll"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"] == [3]
    cast = decoding.decoder_layers_in_compute_dtype(params, config.dtype)
    dtypes = {"/".join(str(getattr(k, "key", k)) for k in path): x.dtype
              for path, x in jax.tree_util.tree_leaves_with_path(cast)}
    assert dtypes["decoder/layers/mlp/wo/kernel"] == jnp.bfloat16
    assert dtypes["decoder/layers/encoder_decoder_attention/key/kernel"] == jnp.bfloat16
    assert dtypes["decoder/logits_dense/kernel"] == jnp.float32  # computed in float32
    assert dtypes["encoder/layers/mlp/wo/kernel"] == jnp.float32  # encoded once, outside the loop


def test_decode_mode_takes_one_token_per_call():
    params = _init(TINY)
    model = Transformer(TINY)
    tokens = jnp.ones((1, 4), jnp.int32)
    cache, _ = decoding.prepare_decoder(model, params, tokens, 4)
    encoded = model.apply({"params": params}, tokens, enable_dropout=False, method=model.encode)
    with pytest.raises(ValueError, match="one token per call"):
        model.apply(
            {"params": params, "cache": cache}, encoded, tokens, tokens, tokens, enable_dropout=False, decode=True,
            max_decode_length=4, method=model.decode, mutable=["cache"],
        )


# ------------------------------------------------------------ dtype/dropout


def test_bfloat16_activations_and_dropout():
    config = dataclasses.replace(TINY, dtype="bfloat16", dropout_rate=0.1)
    params = _init(config)
    model = Transformer(config)
    tokens = jnp.asarray(_random_tokens(np.random.default_rng(4), (2, 8), config.vocab_size, [8, 5]))
    quiet = model.apply({"params": params}, tokens, tokens, tokens, enable_dropout=False)
    assert quiet.dtype == jnp.float32 and bool(jnp.isfinite(quiet).all())
    noisy = [
        model.apply({"params": params}, tokens, tokens, tokens, rngs={"dropout": jax.random.key(s)}) for s in (0, 1)
    ]
    assert not np.allclose(noisy[0], noisy[1])
    np.testing.assert_array_equal(quiet, model.apply({"params": params}, tokens, tokens, tokens, enable_dropout=False))


def test_fused_attention_matches_the_einsum_path():
    """`fused_attention` (jax.nn.dot_product_attention) gives the einsum path's
    logits and gradients, relative-position biases and padding masks included;
    in bfloat16 within bfloat16 tolerance."""
    rng = np.random.default_rng(5)
    encoder_tokens = jnp.asarray(_random_tokens(rng, (3, 14), TINY.vocab_size, [14, 9, 5]))
    targets = jnp.asarray(_random_tokens(rng, (3, 10), TINY.vocab_size, [10, 6, 3]))
    decoder_inputs = jnp.asarray(_shift_right(np.asarray(targets)))
    for dtype, tolerance in (("float32", 1e-5), ("bfloat16", 5e-2)):
        base = dataclasses.replace(TINY, dtype=dtype)
        params = _init(base)

        def loss(p, config):
            logits = Transformer(config).apply({"params": p}, encoder_tokens, decoder_inputs, targets, enable_dropout=False)
            return (logits * (targets > 0)[..., None]).sum() / 1e3, logits

        # Jitted, as in training (and one compile is faster than op-by-op dispatch).
        loss_and_grads = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
        (_, want), want_grads = loss_and_grads(params, base)
        (_, got), got_grads = loss_and_grads(params, dataclasses.replace(base, fused_attention=True))
        real = np.asarray(targets) > 0
        scale = np.abs(np.asarray(want)[real]).max()
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=tolerance * scale, rtol=0)
        for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tolerance * np.abs(np.asarray(b)).max() + 1e-7, rtol=0)

    # With dropout both paths drop the same value vectors (T5X's attention
    # dropout, whose mask is shared by all queries).
    noisy = dataclasses.replace(TINY, dropout_rate=0.2)
    params = _init(noisy)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def forward(p, config, enable_dropout):
        return Transformer(config).apply({"params": p}, encoder_tokens, decoder_inputs, targets,
                                         enable_dropout=enable_dropout, rngs={"dropout": jax.random.key(3)})

    outputs = [forward(params, dataclasses.replace(noisy, fused_attention=fused), True) for fused in (False, True)]
    quiet = forward(params, noisy, False)
    assert np.abs(np.asarray(outputs[0]) - np.asarray(quiet)).max() > 0.1
    np.testing.assert_allclose(np.asarray(outputs[1]), np.asarray(outputs[0]), atol=1e-4, rtol=0)


def test_remat_and_dropout_under_scan():
    """Dropout draws differ per layer under scan (split rngs), and remat
    recomputes the same masks in the backward pass (gradients equal without remat)."""
    config = dataclasses.replace(TINY, dropout_rate=0.3, scan_layers=True)
    params = scan.stack_layers(_init(TINY))
    tokens = jnp.asarray(_random_tokens(np.random.default_rng(6), (2, 8), config.vocab_size, [8, 5]))

    def grads(remat_policy):
        module = Transformer(dataclasses.replace(config, remat_policy=remat_policy))
        loss = lambda p: module.apply({"params": p}, tokens, tokens, tokens, rngs={"dropout": jax.random.key(1)}).sum()  # noqa: E731
        return jax.jit(jax.grad(loss))(params)  # jitted, as in training

    reference = grads("none")
    for policy in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(grads(policy)), jax.tree.leaves(reference)):
            np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max() + 1e-7, rtol=0)


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 8, 13])
def test_broadcast_over_batch_sums_its_gradient_over_the_batch(batch):
    """The shared attention bias's gradient (summed by halving, not XLA's
    reduce) equals the plain broadcast's, odd batch sizes included."""
    from flan_jax.model.attention import broadcast_over_batch

    rng = np.random.default_rng(batch)
    bias = jnp.asarray(rng.normal(size=(1, 2, 3, 4)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(batch, 2, 3, 4)), jnp.float32)
    ours = jax.grad(lambda b: (jnp.sin(broadcast_over_batch(b, batch)) * weights).sum())(bias)
    plain = jax.grad(lambda b: (jnp.sin(jnp.broadcast_to(b, weights.shape)) * weights).sum())(bias)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), rtol=1e-5, atol=1e-6)
    assert broadcast_over_batch(bias, batch).shape == weights.shape
