"""Batched autoregressive decoding with the decoder's kv cache; jit-compatible.

Every decoder runs the same way (`start_decoder`, `decoder_step`): encode
once, create the cache with the real encoder output, then call one decoder
step per token inside a `jax.lax.while_loop` that stops when every row is
done. Token 0 is both the decoder start id and the padding emitted after EOS.
Outputs [.., L] hold the new tokens only (no start token), EOS included.

Greedy decoding and sampling can also run in chunks (`init_decoding`, then
`extend_decoding` up to a given step, again and again), so that the caller can
look at the text between chunks and stop a batch whose rows are all done, e.g.
when each has started a new exemplar (`flan_jax.evaluation`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from flan_jax.model import Transformer
from flan_jax.model.attention import CROSS_CACHE

Array = jax.Array
PyTree = Any
StepFn = Callable[[Array, PyTree], tuple[Array, PyTree]]

EOS_ID = 1
# Large but finite: sums of it with log-probs never turn into NaN.
NEG_INF = -1.0e7


class DecoderContext(NamedTuple):
    """What every decoding step reads and none writes: the encoded inputs and their cross-attention projections."""

    encoded: Array  # [n, k, d]
    encoder_input_tokens: Array  # [n, k]
    cross: PyTree  # attention.CROSS_CACHE


def _apply_step(
    model: Transformer, variables: PyTree, context: DecoderContext, tokens: Array, max_decode_length: int,
    mutable: list[str],
) -> tuple[Array, PyTree]:
    step_tokens = tokens[:, None].astype(jnp.int32)  # [n, 1]
    logits, mutated = model.apply(
        variables, context.encoded, context.encoder_input_tokens, step_tokens, step_tokens, enable_dropout=False,
        decode=True, max_decode_length=max_decode_length, method=model.decode, mutable=mutable,
    )
    return logits[:, 0], mutated


def start_decoder(
    model: Transformer, params: PyTree, encoder_input_tokens: Array, max_decode_length: int, num_copies: int = 1,
) -> tuple[DecoderContext, PyTree]:
    """Encodes the inputs -> (context, empty self-attention cache) for `decoder_step`.

    Rows are repeated `num_copies` times (copies of a row are adjacent, as beams are).
    """
    params = nn.unbox(params)
    encoded = model.apply({"params": params}, encoder_input_tokens, enable_dropout=False, method=model.encode)
    if num_copies > 1:
        encoded = jnp.repeat(encoded, num_copies, axis=0)
        encoder_input_tokens = jnp.repeat(encoder_input_tokens, num_copies, axis=0)
    context = DecoderContext(encoded, encoder_input_tokens, {})
    # The creating call stores the cross-attention projections of `encoded`
    # and an empty self-attention cache; its logits are not used. Steps read
    # the projections without writing them back (see attention.CROSS_CACHE).
    params = decoder_layers_in_compute_dtype(params, model.config.dtype)
    _, created = _apply_step(model, {"params": params}, context, jnp.zeros(encoded.shape[:1], jnp.int32),
                             max_decode_length, ["cache", CROSS_CACHE])
    return context._replace(cross=created[CROSS_CACHE]), created["cache"]


def decoder_step(
    model: Transformer, params: PyTree, context: DecoderContext, tokens: Array, cache: PyTree, max_decode_length: int,
) -> tuple[Array, PyTree]:
    """One token per row: tokens [n] -> (logits [n, v] float32, cache). `params` as
    `decoder_layers_in_compute_dtype` gives them (cast once, outside the loop)."""
    variables = {"params": params, "cache": cache, CROSS_CACHE: context.cross}
    logits, mutated = _apply_step(model, variables, context, tokens, max_decode_length, ["cache"])
    return logits, mutated["cache"]


def prepare_decoder(
    model: Transformer,
    params: PyTree,
    encoder_input_tokens: Array,
    max_decode_length: int,
    num_copies: int = 1,
) -> tuple[PyTree, StepFn]:
    """Encodes the inputs and returns (initial cache, step).

    `step(tokens [n], cache) -> (logits [n, v] float32, cache)` feeds one token
    per row, n = batch * num_copies (copies of a row are adjacent, as beams are).
    """
    context, cache = start_decoder(model, params, encoder_input_tokens, max_decode_length, num_copies)
    params = decoder_layers_in_compute_dtype(nn.unbox(params), model.config.dtype)

    def run(tokens: Array, cache: PyTree) -> tuple[Array, PyTree]:
        return decoder_step(model, params, context, tokens, cache, max_decode_length)

    return cache, run


def decoder_layers_in_compute_dtype(params: PyTree, dtype: Any) -> PyTree:
    """params with the decoder layers' kernels and LoRA factors cast to the activation dtype.

    Their `Dense` casts them on every use, so the logits are the same; cast
    once before the decoding loop, the steps read half the bytes and XLA
    finds nothing to convert inside the loop. (The output layer computes in
    float32 and is left alone.)
    """

    def cast(path: tuple[Any, ...], x: Array) -> Array:
        keys = [getattr(k, "key", "") for k in path]
        in_layers = keys[0] == "decoder" and any(str(k).startswith("layers") for k in keys)
        return x.astype(dtype) if in_layers and keys[-1] in ("kernel", "lora_a", "lora_b") else x

    return jax.tree_util.tree_map_with_path(cast, params)


def argmax_first(logits: Array) -> Array:
    """argmax over the last axis (first index on ties).

    Same result as jnp.argmax, but as max + masked min: XLA's CPU backend
    lowers argmax's variadic reduce slowly (1.2 ms vs 0.2 ms over [8, 32128]),
    which was a fifth of a small model's decoding step.
    """
    best = logits.max(-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == best, index, logits.shape[-1]), axis=-1)


class DecodeState(NamedTuple):
    """Where a decoding loop stands; `extend_decoding` carries it on from where it stopped."""

    context: DecoderContext
    cache: PyTree
    step: Array  # [] tokens decoded so far
    sequences: Array  # [b, L] new tokens, 0 after EOS
    last: Array  # [b] the token fed next
    done: Array  # [b] EOS emitted


def init_decoding(model: Transformer, params: PyTree, encoder_input_tokens: Array, max_decode_length: int) -> DecodeState:
    """Encodes the inputs; no token decoded yet."""
    batch = encoder_input_tokens.shape[0]
    context, cache = start_decoder(model, params, encoder_input_tokens, max_decode_length)
    return DecodeState(
        context, cache, jnp.array(0, jnp.int32),
        jnp.zeros((batch, max_decode_length), jnp.int32),
        jnp.zeros((batch,), jnp.int32),  # decoder start id
        jnp.zeros((batch,), jnp.bool_),
    )


def extend_decoding(
    model: Transformer,
    params: PyTree,
    state: DecodeState,
    stop_at: Array | int,
    eos_id: int = EOS_ID,
    choose: Callable[[Array, Array], Array] | None = None,
) -> DecodeState:
    """Decodes until `stop_at` tokens (a traced scalar is fine: one compilation serves every
    chunk) or every row has emitted EOS; `choose(logits [b, v], step) -> [b]`, greedy by default."""
    choose = choose or (lambda logits, _: argmax_first(logits))
    max_decode_length = state.sequences.shape[1]
    params = decoder_layers_in_compute_dtype(nn.unbox(params), model.config.dtype)

    def cond(s: DecodeState):
        return (s.step < jnp.minimum(stop_at, max_decode_length)) & ~jnp.all(s.done)

    def body(s: DecodeState):
        logits, cache = decoder_step(model, params, s.context, s.last, s.cache, max_decode_length)
        token = jnp.where(s.done, 0, choose(logits, s.step).astype(jnp.int32))
        sequences = s.sequences.at[:, s.step].set(token)
        return s._replace(cache=cache, step=s.step + 1, sequences=sequences, last=token,
                          done=s.done | (token == eos_id))

    return lax.while_loop(cond, body, state)


def greedy_decode(
    model: Transformer,
    params: PyTree,
    encoder_input_tokens: Array,
    *,
    max_decode_length: int,
    eos_id: int = EOS_ID,
) -> Array:
    """Argmax decoding: encoder_input_tokens [b, k] -> tokens [b, max_decode_length]."""
    state = init_decoding(model, params, encoder_input_tokens, max_decode_length)
    return extend_decoding(model, params, state, max_decode_length, eos_id).sequences


def next_token_logits(model: Transformer, params: PyTree, encoder_input_tokens: Array, prefix: Array) -> Array:
    """The logits [b, v] float32 of the token after `prefix` [b, p] (p may be 0: the first decoding
    step, what `evaluate_flan.py` compares between the letters A-D), teacher-forced."""
    params = nn.unbox(params)
    batch = encoder_input_tokens.shape[0]
    decoder_inputs = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), prefix.astype(jnp.int32)], axis=1)
    # Targets only mark which positions are real (non-zero); their values are not read.
    logits = model.apply({"params": params}, encoder_input_tokens, decoder_inputs, jnp.ones_like(decoder_inputs),
                         enable_dropout=False)
    return logits[:, -1].astype(jnp.float32)


def sequence_log_likelihood(
    model: Transformer, params: PyTree, encoder_input_tokens: Array, target_tokens: Array
) -> Array:
    """log p(targets | inputs) per row [b], teacher-forced, summed over non-padding targets.

    encoder_input_tokens [b, k], target_tokens [b, q] (EOS included, 0 = padding).
    This is what rank classification compares between a question's options.
    """
    params = nn.unbox(params)
    decoder_inputs = jnp.pad(target_tokens[:, :-1], ((0, 0), (1, 0)))  # Shifted right after the start id 0.
    logits = model.apply({"params": params}, encoder_input_tokens, decoder_inputs, target_tokens,
                         enable_dropout=False)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    token_log_probs = jnp.take_along_axis(log_probs, target_tokens[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(target_tokens > 0, token_log_probs, 0.0), axis=-1)


def top_k_filter(logits: Array, k: int) -> Array:
    """Keeps the `k` best tokens (ties with the k-th included); the others get -inf."""
    kth_best = lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth_best, -jnp.inf, logits)


def top_p_filter(logits: Array, p: float) -> Array:
    """Keeps the smallest set of best tokens whose probability reaches p."""
    ranked = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < p  # the best token is always kept
    threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def temperature_sample(
    model: Transformer,
    params: PyTree,
    encoder_input_tokens: Array,
    rng: Array,
    *,
    max_decode_length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int = EOS_ID,
) -> Array:
    """Ancestral sampling from softmax(logits / temperature), optionally
    restricted to the top_k tokens and/or the top_p nucleus -> [b, L].

    `temperature`, `top_k`, `top_p` are static; temperature 0 is greedy.
    """

    def choose(logits: Array, i: Array) -> Array:
        if temperature == 0.0:
            return argmax_first(logits)
        logits = logits / temperature
        if top_k > 0:
            logits = top_k_filter(logits, top_k)
        if top_p < 1.0:
            logits = top_p_filter(logits, top_p)
        return jax.random.categorical(jax.random.fold_in(rng, i), logits, axis=-1)

    state = init_decoding(model, params, encoder_input_tokens, max_decode_length)
    return extend_decoding(model, params, state, max_decode_length, eos_id, choose).sequences


# --------------------------------------------------------------- beam search


class _Beams(NamedTuple):
    step: Array  # []
    alive_sequences: Array  # [b, K, L], best first, no EOS yet
    alive_log_probs: Array  # [b, K]
    finished_sequences: Array  # [b, K, L], best first
    finished_scores: Array  # [b, K] length-penalised
    cache: PyTree  # batch b * K


def _reorder_self_attention_cache(cache: PyTree, rows: Array) -> PyTree:
    """Gathers cached keys/values [b*K, h, L, d] by beam ([layers, b*K, ...]
    under a scanned stack). The cross-attention projections, identical across
    a row's beams, are not in the self-attention cache."""

    def pick(path, x):
        if path[-1].key not in ("cached_key", "cached_value"):
            return x
        scanned = any(getattr(k, "key", None) == "layers" for k in path)
        return x[:, rows] if scanned else x[rows]

    return jax.tree_util.tree_map_with_path(pick, cache)


def beam_search(
    model: Transformer,
    params: PyTree,
    encoder_input_tokens: Array,
    *,
    max_decode_length: int,
    num_beams: int = 4,
    alpha: float = 0.6,
    eos_id: int = EOS_ID,
) -> tuple[Array, Array]:
    """Beam search -> (sequences [b, K, L], scores [b, K]), best first.

    score = sum log p / ((5 + length) / 6) ** alpha (T5X's length penalty;
    alpha 0 scores by the plain sum). Each step extends the K alive beams to
    their 2K best continuations; as in HF and fairseq, a continuation ending in
    EOS (or at max_decode_length) finishes only if it ranks in the top K. A row
    stops when no alive beam can beat its K-th finished one even at full length.
    """
    batch, beams, length = encoder_input_tokens.shape[0], num_beams, max_decode_length
    cache, step = prepare_decoder(model, params, encoder_input_tokens, length, num_copies=beams)

    def penalty(n):
        return ((5.0 + n) / 6.0) ** alpha

    def take(x, index):  # x [b, n, ...], index [b, m] -> [b, m, ...]
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def cond(s: _Beams):
        best_possible = s.alive_log_probs[:, 0] / penalty(length)
        done = s.finished_scores[:, -1] >= best_possible
        return (s.step < length) & ~jnp.all(done)

    def body(s: _Beams):
        i = s.step
        last = jnp.where(i > 0, s.alive_sequences[:, :, jnp.maximum(i - 1, 0)], 0)  # [b, K]
        logits, cache = step(last.reshape(-1), s.cache)
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits).reshape(batch, beams, vocab)
        candidates = (s.alive_log_probs[:, :, None] + log_probs).reshape(batch, beams * vocab)
        top_log_probs, top_index = lax.top_k(candidates, 2 * beams)  # [b, 2K]
        parent, token = top_index // vocab, top_index % vocab
        sequences = take(s.alive_sequences, parent).at[:, :, i].set(token)  # [b, 2K, L]
        ends = (token == eos_id) | (i == length - 1)

        alive_log_probs, keep = lax.top_k(jnp.where(ends, NEG_INF, top_log_probs), beams)
        rows = (jnp.arange(batch)[:, None] * beams + take(parent, keep)).reshape(-1)
        cache = _reorder_self_attention_cache(cache, rows)

        finishing = ends & (jnp.arange(2 * beams) < beams)
        new_scores = jnp.where(finishing, top_log_probs / penalty(i + 1), NEG_INF)
        finished_scores, best = lax.top_k(jnp.concatenate([s.finished_scores, new_scores], axis=1), beams)
        finished_sequences = take(jnp.concatenate([s.finished_sequences, sequences], axis=1), best)
        return _Beams(i + 1, take(sequences, keep), alive_log_probs, finished_sequences, finished_scores, cache)

    start = _Beams(
        step=jnp.array(0, jnp.int32),
        alive_sequences=jnp.zeros((batch, beams, length), jnp.int32),
        # Only beam 0 is live at first, so the first step does not pick copies.
        alive_log_probs=jnp.tile(jnp.array([0.0] + [NEG_INF] * (beams - 1), jnp.float32), (batch, 1)),
        finished_sequences=jnp.zeros((batch, beams, length), jnp.int32),
        finished_scores=jnp.full((batch, beams), NEG_INF, jnp.float32),
        cache=cache,
    )
    final = lax.while_loop(cond, body, start)
    return final.finished_sequences, final.finished_scores
