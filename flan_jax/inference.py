"""Load a model from any checkpoint format and answer prompts: a few, or files of them in batches."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
import seqio

from flan_jax import data as data_lib
from flan_jax import batching, decoding, evaluation, formats, partitioning
from flan_jax import step as step_lib
from flan_jax.errors import UserError
from flan_jax.model import Transformer

# Greedy tokens decoded between two looks at the text (ModelRunner.decode): a batch whose rows are all
# done stops within this many tokens, and each look costs one host round trip.
DECODE_CHUNK = 32


@dataclasses.dataclass
class LoadedModel:
    module: Transformer
    params: Any  # on `partitioner`'s mesh
    vocabulary: seqio.Vocabulary
    step: int
    format: str
    partitioner: partitioning.Partitioner = dataclasses.field(default_factory=partitioning.Partitioner)


def load_model(
    path: str,
    *,
    step: int | None = None,
    vocab_path: str | None = None,
    partitioner: partitioning.Partitioner | None = None,
    base: str | None = None,
) -> LoadedModel:
    """A model from a flan-jax run, a HF directory or a T5X checkpoint, plus its vocabulary.

    The params are read onto the partitioner's mesh (default: the gin-bound
    `Partitioner`), so with FSDP or tensor-parallel rules each device holds
    only its share of a model too large for one. A PEFT adapter directory is
    read onto `base` (see `formats.load_checkpoint`).
    """
    partitioner = partitioner or partitioning.Partitioner()
    shardings = None
    if partitioner.mesh.size > 1:
        # On one device, orbax's plain read: its sharded read of a corrupt step leaves tensorstore
        # callbacks printing "Event loop is closed" tracebacks after the step has been set aside.
        shardings = lambda config: step_lib.param_shardings(Transformer(config), partitioner)  # noqa: E731
    ckpt = formats.load_checkpoint(path, step=step, shardings=shardings, base=base)
    if vocab_path:
        vocab = seqio.SentencePieceVocabulary(vocab_path)
    elif ckpt.vocab_record:
        vocab = data_lib.load_vocabulary(ckpt.vocab_record, ckpt.vocab_dir)
    else:
        raise UserError(f"{path} ({ckpt.format}) carries no vocabulary; pass --vocab=PATH/TO/spiece.model")
    return LoadedModel(Transformer(ckpt.config), ckpt.params, vocab, ckpt.step, ckpt.format, partitioner)


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
    batch_size: int = 32,
    seed: int = 0,
    progress: Callable[[int], Any] | None = None,
    **options: Any,
) -> list[str]:
    """Answers to prompts, in their order (options: num_beams, alpha, temperature, top_k, top_p).

    Prompts (truncated to `max_input_length` tokens with EOS, the model's
    prompt slots included, see `data.prepend_prompt_slots`) go in batches of
    similar length, longest first, each padded to `batch_size` rows (fewer if
    there are fewer prompts) and a length from `batching.bucket`, so a long
    file compiles a few shapes only. Greedy and beam answers do not depend on the
    batching; sampling draws batch i's randomness from (seed, i).
    `progress(n)` is called after each batch with its number of prompts.
    """
    if not prompts:
        return []
    vocab, prompt_length = model.vocabulary, model.module.config.prompt_length
    data_lib.check_prompt_room(prompt_length, max_input_length, "--max_input_length")
    text_length = max_input_length - prompt_length
    rows = [
        data_lib.prepend_prompt_slots(np.asarray(vocab.encode(p)[: text_length - 1] + [vocab.eos_id], np.int32),
                                      prompt_length)
        for p in prompts
    ]
    rows_per_batch = min(batch_size, len(rows))
    fn = decode_fn(model.module, method, max_decode_length, **options)
    answers = [""] * len(rows)
    for index, batch in enumerate(batching.batches_by_length(rows, rows_per_batch)):
        inputs = jnp.asarray(batching.pad_rows([rows[i] for i in batch], rows_per_batch, max_input_length))
        args = (model.params, inputs)
        if method == "sample":
            args += (jax.random.fold_in(jax.random.key(seed), index),)
        with model.partitioner.activate():
            tokens = fetch(fn(*args))
        for i, row in zip(batch, tokens):
            answers[i] = vocab.decode(row.tolist())
        if progress:
            progress(len(batch))
    return answers


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Records with an `inputs` prompt from a file: JSON Lines (`.jsonl`: one object per line
    with a string `inputs`, other fields kept) or text (one prompt per line). Blank lines are
    skipped; a bad line is a UserError naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(enumerate(f, 1))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompts from {path}: {e}") from e
    records = []
    for number, line in lines:
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            records.append({"inputs": line.rstrip("\n")})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("inputs"), str):
            raise UserError(f"{path}:{number}: expected an object with a string \"inputs\"")
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no prompts")
    return records


def write_predictions(path: str, records: Sequence[dict[str, Any]], predictions: Sequence[str]) -> None:
    """One JSON object per line: each record with its `prediction`, in input order. Written to a
    temporary file and renamed, so an interrupted run leaves no partial file; an existing file is
    never replaced."""
    if os.path.exists(path):
        raise UserError(f"{path} exists; refusing to overwrite it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        for record, prediction in zip(records, predictions, strict=True):
            f.write(json.dumps({**record, "prediction": prediction}, ensure_ascii=False) + "\n")
    os.replace(partial, path)


def fetch(array: jax.Array) -> np.ndarray:
    """The array on this host, gathered from every host's devices if need be."""
    if not array.is_fully_addressable:  # Several hosts: each gathers every row.
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def _fallback_jit(fn: Callable[..., Any], module: Transformer) -> step_lib.FallbackJit:
    """fn(module, ...) jitted behind `step.FallbackJit`."""
    return step_lib.FallbackJit(lambda m: jax.jit(functools.partial(fn, m)), module)


class ModelRunner:
    """Greedy decoding, next-token logits and sequence scoring of one module on one mesh, jit-compiled
    once per shape.

    `fns(params)` gives what evaluation needs (`evaluation.ModelFns`); the
    parameters are an argument, so training can evaluate each step's. Greedy
    decoding runs in chunks of `decode_chunk` tokens (one compilation serves
    them all), so that evaluation can stop a batch once every row is done.
    """

    def __init__(self, module: Transformer, partitioner: partitioning.Partitioner | None = None,
                 decode_chunk: int = DECODE_CHUNK) -> None:
        self.module = module
        self.partitioner = partitioner or partitioning.Partitioner()
        self.decode_chunk = decode_chunk
        self._init_decoding: dict[int, Callable[..., decoding.DecodeState]] = {}
        self._extend = jax.jit(functools.partial(decoding.extend_decoding, module), donate_argnums=1)
        # Scoring and the encoder take the training path's attention kernel, and its fallback.
        self._score = _fallback_jit(decoding.sequence_log_likelihood, module)
        self._next_logits = _fallback_jit(decoding.next_token_logits, module)

    def _check_slots(self, inputs: np.ndarray) -> None:
        """Inputs of a prompt-tuned model must start with its prompt slots (`evaluation.load_task_examples`
        puts them there); otherwise the model would write the prompt over the start of the text."""
        slots = inputs[:, : self.module.config.prompt_length]
        rows = inputs.any(axis=1)  # all-padding filler rows carry no slots
        if not (slots[rows] == data_lib.PROMPT_SLOT_ID).all():
            raise ValueError(f"inputs of a prompt-tuned model must start with its {slots.shape[1]} prompt slots")

    def decode(self, params: Any, inputs: np.ndarray, max_decode_length: int) -> Iterator[np.ndarray]:
        """Greedy tokens for inputs [b, l], in chunks [b, n] of at most `decode_chunk` tokens, which
        together are at most `max_decode_length` long; it ends early once every row has emitted EOS."""
        self._check_slots(inputs)
        if max_decode_length not in self._init_decoding:
            self._init_decoding[max_decode_length] = _fallback_jit(
                functools.partial(decoding.init_decoding, max_decode_length=max_decode_length), self.module)
        with self.partitioner.activate():
            state = self._init_decoding[max_decode_length](params, jnp.asarray(inputs))
        decoded = 0
        while decoded < max_decode_length:
            stop_at = min(decoded + self.decode_chunk, max_decode_length)
            with self.partitioner.activate():
                state = self._extend(params, state, jnp.int32(stop_at))
            sequences, done = fetch(state.sequences), fetch(state.done)
            yield sequences[:, decoded:stop_at]
            decoded = stop_at
            if done.all():
                return

    def next_logits(self, params: Any, inputs: np.ndarray, prefix: np.ndarray) -> np.ndarray:
        """The logits [b, v] of the token after `prefix` [b, p] (p >= 0) for inputs [b, l]."""
        self._check_slots(inputs)
        with self.partitioner.activate():
            return fetch(self._next_logits(params, jnp.asarray(inputs), jnp.asarray(prefix)))

    def score(self, params: Any, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """log p(targets | inputs) [b] for inputs [b, l] and targets [b, t]."""
        self._check_slots(inputs)
        with self.partitioner.activate():
            return fetch(self._score(params, jnp.asarray(inputs), jnp.asarray(targets)))

    def fns(self, params: Any) -> evaluation.ModelFns:
        return evaluation.ModelFns(
            decode=functools.partial(self.decode, params), score=functools.partial(self.score, params),
            next_logits=functools.partial(self.next_logits, params),
        )
