"""Greedy, beam and sampled decoding against HF `generate` and the model itself."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax import decoding
from flan_jax.formats.hf import params_from_hf_state_dict
from flan_jax.model import T5Config, Transformer


CONFIG = T5Config(
    vocab_size=256, emb_dim=64, num_heads=4, head_dim=16, num_encoder_layers=2, num_decoder_layers=2,
    mlp_dim=128, dropout_rate=0.0,
)
LENGTH = 32


@pytest.fixture(scope="module")
def hf_and_params():
    """A random HF T5 v1.1 whose EOS row copies a common token's row (x1.1), so
    that some hypotheses end early and others run to the length limit."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=CONFIG.vocab_size, d_model=CONFIG.emb_dim, d_kv=CONFIG.head_dim, d_ff=CONFIG.mlp_dim,
        num_layers=2, num_decoder_layers=2, num_heads=CONFIG.num_heads, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1,
    )
    hf = transformers.T5ForConditionalGeneration(hf_config).eval()
    head = torch.randn(CONFIG.vocab_size, CONFIG.emb_dim) * 0.5
    head[1] = head[113] * 1.1
    hf.lm_head.weight = torch.nn.Parameter(head)  # untied: see test_model.py
    params = params_from_hf_state_dict({k: v.detach().numpy() for k, v in hf.state_dict().items()}, CONFIG)
    return hf, jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, CONFIG.vocab_size, (4, 12))
    tokens[0, 8:] = 0
    tokens[1, 10:] = 0
    tokens[:, -1] = np.where(tokens[:, -1] > 0, 1, 0)
    return tokens


def _hf_generate(hf, tokens, **kwargs):
    import torch

    with torch.no_grad():
        return hf.generate(
            input_ids=torch.tensor(tokens), attention_mask=torch.tensor(tokens > 0), do_sample=False,
            max_new_tokens=LENGTH, **kwargs,
        )


def _zero_after_eos(sequences):
    """Pads to LENGTH and writes 0 after the first EOS (HF's beam search repeats EOS there)."""
    sequences = np.pad(sequences, [(0, 0)] * (sequences.ndim - 1) + [(0, LENGTH - sequences.shape[-1])])
    after_eos = np.cumsum(sequences == 1, axis=-1) - (sequences == 1) > 0
    return np.where(after_eos, 0, sequences)


def _eos_positions(sequences):
    return [int(np.argmax(row == 1)) if (row == 1).any() else -1 for row in sequences.reshape(-1, LENGTH)]


def test_greedy_matches_hf(hf_and_params, inputs):
    hf, params = hf_and_params
    want = _zero_after_eos(_hf_generate(hf, inputs, num_beams=1).numpy()[:, 1:])  # drop the start id
    decode = jax.jit(functools.partial(decoding.greedy_decode, Transformer(CONFIG), max_decode_length=LENGTH))
    got = np.asarray(decode(params, jnp.asarray(inputs)))
    assert got.shape == (4, LENGTH)
    ends = _eos_positions(got)
    assert -1 in ends and any(0 < e < LENGTH - 1 for e in ends)  # both kinds of rows
    np.testing.assert_array_equal(got, want)


def test_beam_search_matches_hf(hf_and_params, inputs):
    """All four beams and their scores, not just the best: with alpha = 0 both
    search exactly (finish only within the top K, stop once nothing alive can
    beat the K-th finished hypothesis)."""
    hf, params = hf_and_params
    out = _hf_generate(
        hf, inputs, num_beams=4, num_return_sequences=4, length_penalty=0.0, output_scores=True,
        return_dict_in_generate=True,
    )
    want = _zero_after_eos(out.sequences.numpy()[:, 1:]).reshape(4, 4, LENGTH)
    search = jax.jit(
        functools.partial(decoding.beam_search, Transformer(CONFIG), max_decode_length=LENGTH, num_beams=4, alpha=0.0)
    )
    sequences, scores = search(params, jnp.asarray(inputs))
    ends = _eos_positions(np.asarray(sequences))
    assert -1 in ends and any(0 < e < LENGTH - 1 for e in ends)
    np.testing.assert_array_equal(np.asarray(sequences), want)
    np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy().reshape(4, 4), atol=1e-4)


def test_beam_scores_are_length_penalised_log_probs(hf_and_params, inputs):
    _, params = hf_and_params
    model, alpha = Transformer(CONFIG), 0.6
    sequences, scores = decoding.beam_search(
        model, params, jnp.asarray(inputs), max_decode_length=LENGTH, num_beams=3, alpha=alpha
    )
    sequences, scores = np.asarray(sequences), np.asarray(scores)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    flat = sequences.reshape(-1, LENGTH)
    repeated = np.repeat(inputs, 3, axis=0)
    decoder_inputs = np.pad(flat, ((0, 0), (1, 0)))[:, :-1]
    logits = model.apply({"params": params}, repeated, decoder_inputs, flat, enable_dropout=False)
    log_probs = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), flat[..., None], axis=-1)[..., 0]
    lengths = (flat > 0).sum(-1)
    want = (log_probs * (flat > 0)).sum(-1) / ((5.0 + lengths) / 6.0) ** alpha
    np.testing.assert_allclose(scores.reshape(-1), want, atol=1e-4)


def test_sampling(hf_and_params, inputs):
    _, params = hf_and_params
    model, tokens = Transformer(CONFIG), jnp.asarray(inputs)
    sample = jax.jit(
        functools.partial(decoding.temperature_sample, model, max_decode_length=LENGTH),
        static_argnames=("temperature", "top_k", "top_p"),
    )
    greedy = np.asarray(decoding.greedy_decode(model, params, tokens, max_decode_length=LENGTH))
    key = jax.random.key(0)
    for static in ({"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6}):
        np.testing.assert_array_equal(np.asarray(sample(params, tokens, key, **static)), greedy, err_msg=str(static))
    hot = np.asarray(sample(params, tokens, key, temperature=2.0, top_k=20, top_p=0.95))
    np.testing.assert_array_equal(hot, np.asarray(sample(params, tokens, key, temperature=2.0, top_k=20, top_p=0.95)))
    assert not np.array_equal(hot, np.asarray(sample(params, tokens, jax.random.key(1), temperature=2.0)))
    assert not np.array_equal(hot, greedy)
    for row in hot:  # only padding after EOS
        if (row == 1).any():
            assert (row[np.argmax(row == 1) + 1 :] == 0).all()


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: np.isfinite(np.asarray(decoding.top_p_filter(logits, p)))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert np.isfinite(np.asarray(decoding.top_k_filter(logits, 2)))[0].tolist() == [True, True, False, False]
