"""Task families, data sources and their SeqIO registration.

A `Family` is a `TaskSpec` (templates) plus a function that draws one example
from a random generator. `add_family` records it; `register_seqio` (run by
`import tasks` after every module in the package is imported) registers, for
each family and each of its variants, the SeqIO task
`builtin_{family}_{variant}`, and then the mixtures:

  builtin_train          train split of every family not held out, all variants.
                         Rates: equal per family, split evenly over its
                         variants (so multiple-choice families, which have six
                         variants instead of four, are not over-sampled).
  builtin_validation_zs  the same families' zero-shot variants, for
                         in-distribution evaluation on the validation split.
  builtin_heldout        every variant of the held-out families, never trained on.

Examples are deterministic in (family, split, index). Train examples whose
question also occurs in the validation split are redrawn, so the splits are
disjoint even where a family's space of questions is small.

Any other `Source` (e.g. a `sources.LoadedSource` reading real files) is
recorded with `add_source(source, {task name: variant})`, its mixtures with
`add_mixture`; `register_seqio` registers those too, with the same pipeline.
Text already rendered (the Flan Collection export, tasks/collection.py) is
a SeqIO data source recorded with `add_text_task`: tokenize -> EOS only.

Each task's pipeline: a `seqio.FunctionDataSource` (the split's indices,
permuted when shuffling, mapped to raw examples) -> `render_preprocessor`
-> `seqio.preprocessors.tokenize` -> `seqio.preprocessors.append_eos_after_trim`.
Every task's postprocess_fn extracts the final answer (`postprocess`, or the
source's own `postprocess_fn`), and its metric is exact match
(`t5.evaluation.metrics.accuracy`) unless the source names its `metric_fns`.

Held-out benchmarks are also recorded as suites (`add_suite`): named lists of
tasks with what `flan-jax eval --suite` reports (see flan_jax/evaluation.py).
Rendering and example generation are Python, run by `tf.numpy_function`.
One consequence: let a dataset iterator go (end its function, or `del` it)
before the process exits. TensorFlow destroys iterators still alive at
interpreter shutdown while their threads can no longer run Python, which
can hang or abort the process.

No `seqio.CacheDatasetPlaceholder`: generating is cheaper than reading a
cache, and rendering needs the sequence length, which comes after caching.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import seqio
import t5.evaluation.metrics
import tensorflow as tf

from flan_jax import evaluation
from flan_jax.errors import UserError
from tasks import sources, templates

logger = logging.getLogger(__name__)

TRAIN_MIXTURE = "builtin_train"
HELDOUT_MIXTURE = "builtin_heldout"
VALIDATION_MIXTURE = "builtin_validation_zs"
# What the smoke run evaluates: held-out families plus in-distribution zero-shot.
EVAL_MIXTURE = "builtin_eval"
SPLITS = ("train", "validation")
TASK_PREFIX = "builtin_"
SHUFFLE_BUFFER_SIZE = 64
RENDER_SEED = 0  # Seeds template and exemplar choice; fixed so a task's data never changes.

Example = dict[str, Any]
MixtureRate = float | Callable[[seqio.Task], float]


class Source(Protocol):
    """What a task's pipeline needs from where its examples come from."""

    name: str
    spec: templates.TaskSpec
    splits: tuple[str, ...]

    def split_size(self, split: str) -> int: ...

    def example(self, split: str, index: int) -> Example: ...

    def exemplars(self, split: str, index: int, example: Mapping[str, Any], seed: int) -> list[Example]:
        """Few-shot exemplars for example `index` of `split`, never the example itself."""
        ...


@dataclasses.dataclass(frozen=True)
class Family:
    """A task family: how to render its examples and how to generate them."""

    spec: templates.TaskSpec
    generate: Callable[[random.Random], Example]
    train_size: int = 10_000
    validation_size: int = 100
    heldout: bool = False

    splits = SPLITS

    @property
    def name(self) -> str:
        return self.spec.name

    def split_size(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"family {self.name!r} has no split {split!r}; it has {SPLITS}")
        return self.train_size if split == "train" else self.validation_size

    def example(self, split: str, index: int) -> Example:
        """Example `index` of `split`; the same arguments always give the same example."""
        if not 0 <= index < self.split_size(split):
            raise IndexError(f"{self.name}/{split} has no example {index}")
        # A str seed is hashed with sha512, so it is stable across processes.
        rng = random.Random(f"{self.name}/{split}/{index}")
        example = self.generate(rng)
        if split == "train":
            while example["question"] in _validation_questions(self):
                example = self.generate(rng)
        return example

    def exemplars(self, split: str, index: int, example: Mapping[str, Any], seed: int) -> list[Example]:
        """`spec.num_shots` train examples drawn at random, never the query itself."""
        return templates.pick_exemplars(
            self.name, split, index, seed, example,
            train_example=functools.partial(self.example, "train"),
            num_train=self.train_size, count=self.spec.num_shots,
        )


@functools.lru_cache(maxsize=None)
def _validation_questions(family: Family) -> frozenset[str]:
    return frozenset(family.example("validation", i)["question"] for i in range(family.validation_size))


_FAMILIES: dict[str, Family] = {}
_SOURCES: dict[str, tuple[Source, dict[str, str]]] = {}  # By source name: (source, {task name: variant}).
_MIXTURES: dict[str, list[tuple[str, MixtureRate]]] = {}
_SUITES: dict[str, evaluation.Suite] = {}
_TEXT_TASKS: dict[str, tuple[seqio.DataSource, int]] = {}  # By task name: (source, shuffle buffer).


def add_family(family: Family) -> Family:
    """Records a family; `register_seqio` turns it into SeqIO tasks.

    Adding a family under a name already present replaces it, so re-importing
    a module is harmless.
    """
    _FAMILIES[family.name] = family
    return family


def remove_family(name: str) -> None:
    """Forgets a family and unregisters its SeqIO tasks; run `register_seqio` to update the mixtures."""
    family = _FAMILIES.pop(name)
    for variant in family.spec.variants:
        seqio.TaskRegistry.remove(task_name(name, variant))


def families() -> dict[str, Family]:
    """Every recorded family, by name."""
    return dict(_FAMILIES)


def add_source(source: Source, tasks: Mapping[str, str]) -> list[str]:
    """Records a source and its SeqIO tasks, {task name: variant}; returns the task names.

    `register_seqio` registers them. Adding a source under a name already
    present replaces it (its old tasks are unregistered).
    """
    for variant in tasks.values():
        if variant not in source.spec.variants:
            raise ValueError(f"source {source.name!r} has no variant {variant!r}; it has {source.spec.variants}")
    if source.name in _SOURCES:
        for name in _SOURCES[source.name][1]:
            seqio.TaskRegistry.remove(name)
    _SOURCES[source.name] = (source, dict(tasks))
    return list(tasks)


def remove_source(name: str) -> None:
    """Forgets a source and unregisters its SeqIO tasks; run `register_seqio` to update the mixtures."""
    _, tasks = _SOURCES.pop(name)
    for task in tasks:
        seqio.TaskRegistry.remove(task)


def get_source(name: str) -> Source:
    """A source recorded with `add_source`, by name (e.g. "flan_cot_aqua", "mmlu_anatomy")."""
    return _SOURCES[name][0]


def add_mixture(name: str, tasks: Sequence[tuple[str, MixtureRate]]) -> None:
    """Records a mixture of (task name, rate); `register_seqio` registers it after the entries it names.

    A rate may be a function of the task, evaluated when a dataset is built
    (e.g. a file's row count, which is not known before the file is read).
    """
    _MIXTURES[name] = list(tasks)


def add_text_task(name: str, source: seqio.DataSource, *, shuffle_buffer_size: int = 2_000) -> str:
    """Records a task whose source yields rendered text {"inputs", "targets", ...}; returns its name.

    Its pipeline is tokenize -> EOS (nothing to render), its metric exact
    match. `register_seqio` registers it; the name replaces any earlier one.
    """
    seqio.TaskRegistry.remove(name)
    _TEXT_TASKS[name] = (source, shuffle_buffer_size)
    return name


def remove_text_task(name: str) -> None:
    """Forgets a task of `add_text_task` and unregisters it."""
    _TEXT_TASKS.pop(name, None)
    seqio.TaskRegistry.remove(name)


def remove_mixture(name: str) -> None:
    """Forgets a mixture of `add_mixture` and unregisters it."""
    _MIXTURES.pop(name, None)
    seqio.MixtureRegistry.remove(name)


def add_suite(suite: evaluation.Suite) -> None:
    """Records a held-out benchmark for `flan-jax eval --suite` (its tasks must be registered too)."""
    _SUITES[suite.name] = suite


def suites() -> dict[str, evaluation.Suite]:
    """Every recorded suite, by name."""
    return dict(_SUITES)


def get_suite(name: str) -> evaluation.Suite:
    if name not in _SUITES:
        raise UserError(f"unknown suite {name!r}; known: {', '.join(sorted(_SUITES)) or 'none'}")
    return _SUITES[name]


def task_name(family_name: str, variant: str) -> str:
    return f"{TASK_PREFIX}{family_name}_{variant}"


def render_example(source: Source, split: str, index: int, example: Mapping[str, Any], variant: str, *,
                   seed: int = RENDER_SEED, max_input_length: int | None = None,
                   length_fn: Callable[[str], int] = len) -> dict[str, str] | None:
    """Renders example `index` of `split` as `variant`: picks the template and exemplars, then renders.

    None means the example is dropped (see `templates.render`).
    """
    spec = source.spec
    exemplars = source.exemplars(split, index, example, seed) if variant.startswith("fs_") else []
    return templates.render(
        spec, example, variant,
        template_index=templates.pick_template(spec.name, split, index, seed, len(spec.templates)),
        exemplars=exemplars, max_input_length=max_input_length, length_fn=length_fn,
    )


def postprocess(output: str | bytes, example: Mapping[str, Any] | None = None, is_target: bool = False) -> str:
    """SeqIO postprocess_fn: the final answer, for predictions and targets alike."""
    del example, is_target  # Same extraction either way, so exact match compares answers.
    return templates.extract_answer(output)


# ---------------------------------------------------------------------------
# SeqIO plumbing: a source of raw examples, then render -> tokenize -> EOS.


# These functions have no Python control flow on tensors, so AutoGraph has nothing
# to convert; skipping it makes building a task's dataset several times faster.
_plain_tf = tf.autograph.experimental.do_not_convert


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *, source: Source) -> tf.data.Dataset:
    """The raw examples of one split, plus their `split` and `index`.

    Shuffling permutes the whole split (not just a buffer), so training sees
    every example once per epoch in a seed-determined order. Asking the size
    first reads a file source here, so a missing file fails when the dataset
    is built, with its own message, not later inside TensorFlow.
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
    return ds.map(to_features)


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


def _register_tasks(source: Source, tasks: Mapping[str, str], vocabulary: seqio.Vocabulary) -> None:
    """Registers one SeqIO task per (task name, variant) of `source`."""
    output_features = {
        "inputs": seqio.Feature(vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
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
            output_features=output_features,
            postprocess_fn=getattr(source, "postprocess_fn", None) or postprocess,
            metric_fns=list(getattr(source, "metric_fns", None) or [t5.evaluation.metrics.accuracy]),
            # The source already permutes the whole split; a small buffer keeps
            # a mixture of many tasks from rendering thousands of examples
            # before its first batch.
            shuffle_buffer_size=SHUFFLE_BUFFER_SIZE,
        )


def _add_mixture(name: str, tasks: list[tuple[str, MixtureRate]]) -> None:
    seqio.MixtureRegistry.remove(name)
    if tasks:
        seqio.MixtureRegistry.add(name, tasks)


def register_seqio(vocabulary: seqio.Vocabulary | None = None) -> None:
    """(Re-)registers every recorded family's and source's tasks, and the mixtures.

    Idempotent. Call it again after `add_family` or `add_source` outside a
    `tasks/` module (e.g. in a notebook) to make the new tasks visible.
    """
    if vocabulary is None:
        from tasks import vocab  # Late import: the vocabulary is built from the families.

        vocabulary = vocab.get_default_vocabulary()
    train, validation, heldout = [], [], []
    for family in sorted(_FAMILIES.values(), key=lambda f: f.name):
        _register_tasks(family, {task_name(family.name, v): v for v in family.spec.variants}, vocabulary)
        variants = family.spec.variants
        names = [task_name(family.name, v) for v in variants]
        if family.heldout:
            heldout += [(n, 1.0) for n in names]
        else:
            train += [(n, 1.0 / len(variants)) for n in names]
            validation += [(task_name(family.name, v), 1.0) for v in variants if v in templates.ZERO_SHOT_VARIANTS]
    _add_mixture(TRAIN_MIXTURE, train)
    _add_mixture(VALIDATION_MIXTURE, validation)
    _add_mixture(HELDOUT_MIXTURE, heldout)
    _add_mixture(EVAL_MIXTURE, heldout + validation)
    for source, tasks in _SOURCES.values():
        _register_tasks(source, tasks, vocabulary)
    text_features = {
        "inputs": seqio.Feature(vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
    for name, (source, buffer_size) in _TEXT_TASKS.items():
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name, source=source, output_features=text_features,
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
            metric_fns=[t5.evaluation.metrics.accuracy], shuffle_buffer_size=buffer_size,
        )
    # Nested mixtures after the mixtures they name, whatever order the files recorded them in.
    pending = dict(_MIXTURES)
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
                del _MIXTURES[name]
            break
        for name in ready:
            _add_mixture(name, pending.pop(name))
