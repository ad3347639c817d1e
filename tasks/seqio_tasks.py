"""The catalog as SeqIO tasks and mixtures, tokenized with a vocabulary passed in.

`register_seqio(vocabulary)` registers what tasks/registry.py holds:

  families and sources  one task per (task name, variant): a
                        `seqio.FunctionDataSource` (the split's indices,
                        permuted when shuffling, mapped to raw examples)
                        -> `render_preprocessor` -> `seqio.preprocessors.tokenize`
                        -> `seqio.preprocessors.append_eos_after_trim`
  text tasks            tokenize -> EOS only (the text is rendered already)
  mixtures              the built-in ones (`mixing.family_mixtures`), then
                        the recorded ones, each after the entries it names

Every task's postprocess_fn extracts the final answer (`family.postprocess`,
or the source's own `postprocess_fn`), and its metric is exact match
(`t5.evaluation.metrics.accuracy`) unless the source names its `metric_fns`.
Registering again replaces the registrations instead of raising "already
registered". Which vocabulary to use is the caller's choice (`tasks.register`
picks the default one); this module never picks or trains one.

Rendering and example generation are Python, run by `tf.numpy_function`.
One consequence: let a dataset iterator go (end its function, or `del` it)
before the process exits. TensorFlow destroys iterators still alive at
interpreter shutdown while their threads can no longer run Python, which
can hang or abort the process.

No `seqio.CacheDatasetPlaceholder`: generating is cheaper than reading a
cache, and rendering needs the sequence length, which comes after caching.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import seqio
import t5.evaluation.metrics
import tensorflow as tf

from tasks import mixing, registry, sources, templates
from tasks.family import RENDER_SEED, Family, Source, postprocess, render_example, task_name

logger = logging.getLogger(__name__)

SHUFFLE_BUFFER_SIZE = 64

_vocabulary: seqio.Vocabulary | None = None  # That of the last `register_seqio`; None before the first.
_count = 0  # Calls of `register_seqio` in this process.
# (source or task name, example) -> whether training keeps it; None keeps all (see `set_training_filter`).
TrainingFilter = Callable[[str, Mapping[str, Any]], bool]
_training_filter: TrainingFilter | None = None


def set_training_filter(keep: TrainingFilter | None) -> None:
    """Filters the training examples of every dataset built from now on (None: no filter).

    `keep(name, example)` sees a source's raw train examples (name: the
    source's) and a text task's rows (name: the task's), before rendering.
    tasks/overlap.py installs one that drops examples overlapping evaluation
    suites and counts them.
    """
    global _training_filter
    _training_filter = keep


def register_seqio(vocabulary: seqio.Vocabulary) -> None:
    """(Re-)registers every recorded family, source and text task, then the mixtures, with `vocabulary`."""
    global _vocabulary, _count
    for family in sorted(registry.families().values(), key=lambda f: f.name):
        _register_tasks(family, {task_name(family.name, v): v for v in family.spec.variants}, vocabulary)
    for name, entries in mixing.family_mixtures(registry.families().values()).items():
        _add_mixture(name, entries)
    for source, tasks in registry.sources().values():
        _register_tasks(source, tasks, vocabulary)
    for name, (source, buffer_size) in registry.text_tasks().items():
        _register_text_task(name, source, buffer_size, vocabulary)
    _register_mixtures(registry.mixtures())
    _vocabulary = vocabulary
    _count += 1


def refresh() -> None:
    """Registers what was recorded since, with the vocabulary of the last registration.

    Before the first registration it does nothing: `tasks.register` will
    register everything. For code that records tasks after registration,
    e.g. `user_files.register_file_task` in a notebook.
    """
    if _vocabulary is not None:
        register_seqio(_vocabulary)


def registered_vocabulary() -> seqio.Vocabulary | None:
    """The vocabulary the tasks are registered with; None when nothing is registered yet."""
    return _vocabulary


def registration_count() -> int:
    """How many times this process registered the catalog with SeqIO (`register_seqio`)."""
    return _count


def _add_mixture(name: str, tasks: list[tuple[str, registry.MixtureRate]]) -> None:
    seqio.MixtureRegistry.remove(name)
    if tasks:
        seqio.MixtureRegistry.add(name, tasks)


def _register_mixtures(recorded: Mapping[str, list[tuple[str, registry.MixtureRate]]]) -> None:
    """Registers nested mixtures after the mixtures they name, whatever order the files recorded them in."""
    pending = dict(recorded)
    for name in pending:
        seqio.MixtureRegistry.remove(name)
    while pending:
        known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
        ready = [name for name, tasks in pending.items() if all(entry in known for entry, _ in tasks)]
        if not ready:  # They name tasks removed since (or never added): dropped, as seqio could not build them.
            logger.warning("mixtures %s are not registered: they name %s, which are not registered",
                           ", ".join(sorted(pending)),
                           ", ".join(sorted({e for tasks in pending.values() for e, _ in tasks} - known)))
            for name in pending:
                registry.remove_mixture(name)
            break
        for name in ready:
            _add_mixture(name, pending.pop(name))


def _features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {"inputs": seqio.Feature(vocabulary, add_eos=True), "targets": seqio.Feature(vocabulary, add_eos=True)}


def _register_text_task(name: str, source: seqio.DataSource, buffer_size: int, vocabulary: seqio.Vocabulary) -> None:
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=source, output_features=_features(vocabulary),
        preprocessors=[functools.partial(_filter_text, task=name), seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos_after_trim],
        metric_fns=[t5.evaluation.metrics.accuracy], shuffle_buffer_size=buffer_size,
    )


def _register_tasks(source: Source, tasks: Mapping[str, str], vocabulary: seqio.Vocabulary) -> None:
    """Registers one SeqIO task per (task name, variant) of `source`."""
    data_source = seqio.FunctionDataSource(
        functools.partial(_dataset_fn, source=source),
        splits=source.splits,
        # Generated families know their sizes; file sources are read only when
        # a dataset is built, so registering never needs the data.
        num_input_examples=(
            {split: source.split_size(split) for split in source.splits} if isinstance(source, Family) else None
        ),
    )
    for name, variant in tasks.items():
        seqio.TaskRegistry.remove(name)  # Re-registering must not raise.
        seqio.TaskRegistry.add(
            name,
            source=data_source,
            preprocessors=[
                functools.partial(render_preprocessor, source=source, variant=variant, task=name),
                seqio.preprocessors.tokenize,
                seqio.preprocessors.append_eos_after_trim,
            ],
            output_features=_features(vocabulary),
            postprocess_fn=getattr(source, "postprocess_fn", None) or postprocess,
            metric_fns=list(getattr(source, "metric_fns", None) or [t5.evaluation.metrics.accuracy]),
            # The source already permutes the whole split; a small buffer keeps
            # a mixture of many tasks from rendering thousands of examples
            # before its first batch.
            shuffle_buffer_size=SHUFFLE_BUFFER_SIZE,
        )


# ---------------------------------------------------------------------------
# A task's pipeline: a source of raw examples, then render -> tokenize -> EOS.


# These functions have no Python control flow on tensors, so AutoGraph has nothing
# to convert; skipping it makes building a task's dataset several times faster.
_plain_tf = tf.autograph.experimental.do_not_convert


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, source: Source) -> tf.data.Dataset:
    """The raw examples of one split, plus their `split` and `index`.

    Shuffling permutes the whole split (not just a buffer), so training sees
    every example once per epoch in a seed-determined order. Asking the size
    first reads a file source here, so a missing file fails when the dataset
    is built, with its own message, not later inside TensorFlow. The train
    split keeps only what `set_training_filter`'s filter keeps.
    """
    size = source.split_size(split)

    def lookup(index: np.int64) -> list[Any]:
        ex = source.example(split, int(index))
        options = np.array([o.encode() for o in ex.get("options") or ()], dtype=np.bytes_).reshape(-1)
        return [ex["question"], ex["answer"], ex["rationale"], options]

    @_plain_tf
    def to_features(index: tf.Tensor) -> dict[str, tf.Tensor]:
        values = tf.numpy_function(lookup, [index], [tf.string] * 4, stateful=False)
        features = {"split": tf.constant(split), "index": index}
        for name, value in zip(["question", "answer", "rationale", "options"], values):
            value.set_shape([None] if name == "options" else [])
            features[name] = value
        return features

    ds = tf.data.Dataset.range(size)
    if shuffle_files:
        ds = ds.shuffle(size, seed=seed, reshuffle_each_iteration=True)
    keep = _training_filter
    if keep is not None and split == "train":
        ds = ds.filter(_plain_tf(lambda index: tf.ensure_shape(tf.numpy_function(
            lambda i: keep(source.name, source.example(split, int(i))), [index], tf.bool, stateful=False), [])))
    return ds.map(to_features)


def _filter_text(dataset: tf.data.Dataset, *, task: str) -> tf.data.Dataset:
    """A text task's rows that `set_training_filter`'s filter keeps (every split: text tasks are training data)."""
    keep = _training_filter
    if keep is None:
        return dataset

    def py_keep(inputs: bytes, targets: bytes) -> bool:
        return keep(task, {"inputs": inputs.decode(), "targets": targets.decode()})

    return dataset.filter(_plain_tf(lambda ex: tf.ensure_shape(
        tf.numpy_function(py_keep, [ex["inputs"], ex["targets"]], tf.bool, stateful=False), [])))


def _token_counter(feature: seqio.Feature) -> Callable[[str], int]:
    vocabulary = feature.vocabulary
    # Cached: the few-shot fit and the truncation count measure the same prompt.
    return functools.lru_cache(maxsize=16)(lambda text: len(vocabulary.encode(text)))


def render_preprocessor(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None = None,
    output_features: Mapping[str, seqio.Feature] | None = None,
    *,
    source: Source,
    variant: str,
    task: str,
    seed: int = RENDER_SEED,
) -> tf.data.Dataset:
    """Maps raw examples to {"inputs", "targets", "answer", "options", "prompt_tokens", "input_tokens"}.

    With a sequence length, few-shot prompts drop exemplars until they fit in
    `sequence_length["inputs"]` tokens, counting the EOS that is appended
    later. What is dropped or will be truncated is counted in
    `sources.stats(task)` (see tasks/sources.py), never silently, and each
    example carries what evaluation reports:

      options        the target of each option (`templates.option_targets`),
                     for rank classification; empty when there is none
      prompt_tokens  tokens (EOS included) of the prompt with every exemplar
      input_tokens   tokens (EOS included) of the prompt as rendered, before
                     SeqIO trims it to the sequence length
    Both counts are 0 without a sequence length.
    """
    limits: dict[str, int] = {}
    length_fns: dict[str, Callable[[str], int]] = {}
    if sequence_length and output_features:
        for feature in ("inputs", "targets"):
            if sequence_length.get(feature) and feature in output_features:
                limits[feature] = sequence_length[feature] - 1
                length_fns[feature] = _token_counter(output_features[feature])
    task_stats = sources.stats(task)
    count_tokens = length_fns.get("inputs")

    def py_render(split: bytes, index: np.int64, question: bytes, answer: bytes, rationale: bytes,
                  options: np.ndarray) -> list[Any]:
        example = {"question": question.decode(), "answer": answer.decode(), "rationale": rationale.decode()}
        if len(options):
            example["options"] = [o.decode() for o in options]
        split_name, index = split.decode(), int(index)
        rendered = render_example(source, split_name, index, example, variant, seed=seed,
                                  max_input_length=limits.get("inputs"), length_fn=count_tokens or len)
        if rendered is None:
            task_stats.count("dropped_no_fit")
            return [b"", b"", np.zeros([0], np.bytes_), 0, 0, False]
        task_stats.count("rendered")
        for feature, limit in limits.items():
            if length_fns[feature](rendered[feature]) > limit:
                task_stats.count(f"{feature}_truncated")
        prompt_tokens = input_tokens = 0
        if count_tokens:
            full = render_example(source, split_name, index, example, variant, seed=seed)
            prompt_tokens, input_tokens = count_tokens(full["inputs"]) + 1, count_tokens(rendered["inputs"]) + 1
        candidates = templates.option_targets(
            source.spec, example, variant, templates.pick_template(source.spec.name, split_name, index, seed,
                                                                   len(source.spec.templates)))
        return [rendered["inputs"].encode(), rendered["targets"].encode(),
                np.array([c.encode() for c in candidates], dtype=np.bytes_).reshape(-1),
                prompt_tokens, input_tokens, True]

    @_plain_tf
    def fn(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        args = [ex["split"], ex["index"], ex["question"], ex["answer"], ex["rationale"], ex["options"]]
        types = [tf.string, tf.string, tf.string, tf.int64, tf.int64, tf.bool]
        inputs, targets, candidates, prompt_tokens, input_tokens, keep = tf.numpy_function(
            py_render, args, types, stateful=False)
        for value, shape in zip((inputs, targets, candidates, prompt_tokens, input_tokens, keep),
                                ([], [], [None], [], [], [])):
            value.set_shape(shape)
        return {"inputs": inputs, "targets": targets, "answer": ex["answer"], "options": candidates,
                "prompt_tokens": prompt_tokens, "input_tokens": input_tokens, "keep": keep}

    @_plain_tf
    def drop_flag(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {k: v for k, v in ex.items() if k != "keep"}

    return dataset.map(fn).filter(_plain_tf(lambda ex: ex["keep"])).map(drop_flag)
