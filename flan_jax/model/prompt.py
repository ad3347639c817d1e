"""Prompt tuning (Lester et al. 2021): P learned vectors in front of every encoder input.

The data path puts P "slot" tokens at the start of every encoder input
(`flan_jax.data.prepend_prompt_slots`); `Prompt` replaces the embeddings of
the first P positions of every segment by the learned prompt [P, e]. The
slots are ordinary nonzero tokens, so the padding and packing masks and the
relative position biases need nothing new, and a packed row gives each of
its examples the same result as that example alone.

As in T5X's prompt-tuning project, the prompt starts as a sample of rows of
the token embedding (of its first `POPULATION` ids, the frequent ones);
after a pretrained base replaces the embedding, `flan_jax.peft.init_prompt_from_embeddings`
draws the prompt again from the loaded one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

POPULATION = 5000  # T5X samples prompt rows from the embeddings of the first 5000 ids


def sample_embedding_rows(rng: Array, embedding: Array, count: int) -> Array:
    """`count` rows [count, e] float32 of `embedding` [v, e], drawn from its
    first min(POPULATION, v) rows (distinct while there are enough)."""
    population = min(POPULATION, embedding.shape[0])
    ids = jax.random.choice(rng, population, (count,), replace=count > population)
    return jnp.asarray(embedding)[ids].astype(jnp.float32)


def segment_positions(segment_ids: Array) -> Array:
    """[b, l] segment ids (packed rows) -> each token's position inside its segment."""
    index = jnp.arange(segment_ids.shape[-1])
    first = jnp.ones_like(segment_ids[..., :1], jnp.bool_)
    starts = jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    # The index where the current segment started: the last start at or before each token.
    start_index = lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return index - start_index


class Prompt(nn.Module):
    """The learned prompt `prompt` [length, e], written over the slot positions."""

    length: int

    @nn.compact
    def __call__(self, x: Array, tokens: Array, segment_ids: Array | None, embedding: Array) -> Array:
        """x [b, l, e] (the token embeddings of `tokens` [b, l]) -> x with the
        first `length` positions of every segment (of every row without
        `segment_ids`) replaced by the prompt. `embedding` [v, e] is the token
        embedding, sampled to initialise the prompt."""

        def init(rng: Array, shape: tuple[int, int], dtype: jnp.dtype = jnp.float32) -> Array:
            return sample_embedding_rows(rng, embedding, shape[0]).astype(dtype)

        prompt = self.param(
            "prompt", nn.with_logical_partitioning(init, (None, "embed")), (self.length, x.shape[-1]), jnp.float32
        )
        if segment_ids is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        else:
            positions = segment_positions(segment_ids)
        # Padding keeps its embedding: a row of padding (a filler row of an
        # evaluation batch) has no slots.
        in_prompt = (positions < self.length) & (tokens > 0)
        vectors = jnp.take(prompt, jnp.minimum(positions, self.length - 1), axis=0).astype(x.dtype)
        return jnp.where(in_prompt[..., None], vectors, x)
