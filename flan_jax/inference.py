"""Load a model from any checkpoint format and answer prompts."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
import seqio

from flan_jax import data as data_lib
from flan_jax import decoding, evaluation, formats, partitioning
from flan_jax.errors import UserError
from flan_jax.model import Transformer


@dataclasses.dataclass
class LoadedModel:
    module: Transformer
    params: Any
    vocabulary: seqio.Vocabulary
    step: int
    format: str


def load_model(path: str, *, step: int | None = None, vocab_path: str | None = None) -> LoadedModel:
    """A model from a flan-jax run, a HF directory or a T5X checkpoint, plus its vocabulary."""
    ckpt = formats.load_checkpoint(path, step=step)
    if vocab_path:
        vocab = seqio.SentencePieceVocabulary(vocab_path)
    elif ckpt.vocab_record:
        vocab = data_lib.load_vocabulary(ckpt.vocab_record, ckpt.vocab_dir)
    else:
        raise UserError(f"{path} ({ckpt.format}) carries no vocabulary; pass --vocab=PATH/TO/spiece.model")
    return LoadedModel(Transformer(ckpt.config), ckpt.params, vocab, ckpt.step, ckpt.format)


def encode_prompts(vocab: seqio.Vocabulary, prompts: Sequence[str], max_input_length: int) -> np.ndarray:
    """Tokenizes prompts (+ EOS) into one zero-padded [batch, length] array."""
    ids = [vocab.encode(p)[: max_input_length - 1] + [vocab.eos_id] for p in prompts]
    # Round the length up to a multiple of 32 so nearby lengths share one compilation.
    length = min(max_input_length, -(-max(len(x) for x in ids) // 32) * 32)
    out = np.zeros((len(ids), length), np.int32)
    for i, x in enumerate(ids):
        out[i, : len(x)] = x
    return out


def decode_fn(module: Transformer, method: str, max_decode_length: int, **options: Any) -> Callable[..., jax.Array]:
    """A jit-compiled (params, inputs[, rng]) -> tokens [batch, length] for one decoding method."""
    if method == "greedy":
        fn = functools.partial(decoding.greedy_decode, module, max_decode_length=max_decode_length)
    elif method == "beam":
        search = functools.partial(decoding.beam_search, module, max_decode_length=max_decode_length, **options)
        fn = lambda params, inputs: search(params, inputs)[0][:, 0]  # noqa: E731  (best beam)
    elif method == "sample":
        sample = functools.partial(decoding.temperature_sample, module, max_decode_length=max_decode_length, **options)
        fn = lambda params, inputs, rng: sample(params, inputs, rng)  # noqa: E731
    else:
        raise UserError(f"unknown decoding method {method!r}; use greedy, beam or sample")
    return jax.jit(fn)


def generate(
    model: LoadedModel,
    prompts: Sequence[str],
    *,
    method: str = "greedy",
    max_decode_length: int = 128,
    max_input_length: int = 512,
    seed: int = 0,
    **options: Any,
) -> list[str]:
    """Answers to a batch of prompts (options: num_beams, alpha, temperature, top_k, top_p)."""
    inputs = jnp.asarray(encode_prompts(model.vocabulary, prompts, max_input_length))
    fn = decode_fn(model.module, method, max_decode_length, **options)
    args = (model.params, inputs) + ((jax.random.key(seed),) if method == "sample" else ())
    tokens = np.asarray(fn(*args))
    return [model.vocabulary.decode(row.tolist()) for row in tokens]


class ModelRunner:
    """Greedy decoding and sequence scoring of one module on one mesh, jit-compiled once per shape.

    `fns(params)` gives what evaluation needs (`evaluation.ModelFns`); the
    parameters are an argument, so training can evaluate each step's.
    """

    def __init__(self, module: Transformer, partitioner: partitioning.Partitioner | None = None) -> None:
        self.module = module
        self.partitioner = partitioner or partitioning.Partitioner()
        self._decoders: dict[int, Callable[..., jax.Array]] = {}
        self._score = jax.jit(functools.partial(decoding.sequence_log_likelihood, module))

    def _fetch(self, array: jax.Array) -> np.ndarray:
        if not array.is_fully_addressable:  # Several hosts: each gathers every row.
            return np.asarray(multihost_utils.process_allgather(array, tiled=True))
        return np.asarray(jax.device_get(array))

    def decode(self, params: Any, inputs: np.ndarray, max_decode_length: int) -> np.ndarray:
        """Greedy tokens [b, max_decode_length] for inputs [b, l]."""
        if max_decode_length not in self._decoders:
            self._decoders[max_decode_length] = decode_fn(self.module, "greedy", max_decode_length)
        with self.partitioner.activate():
            return self._fetch(self._decoders[max_decode_length](params, jnp.asarray(inputs)))

    def score(self, params: Any, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """log p(targets | inputs) [b] for inputs [b, l] and targets [b, t]."""
        with self.partitioner.activate():
            return self._fetch(self._score(params, jnp.asarray(inputs), jnp.asarray(targets)))

    def fns(self, params: Any) -> evaluation.ModelFns:
        return evaluation.ModelFns(
            decode=functools.partial(self.decode, params), score=functools.partial(self.score, params)
        )
