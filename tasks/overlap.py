"""Held out means held out: the catalog's side of n-gram decontamination (flan_jax/decontamination.py).

`eval_index(eval_tasks(suites))` indexes the query text of every task of
some suites (a composite such as `flan_heldout` counts as its members): the
source example's `question`, not the few-shot prompt around it. `training_streams`
lists what a mixture trains on, one stream per source, so a source several
variants share is read once, and `scan_mixture` streams them all past the
index (memory: the evaluation side only). `exemplars_in_eval` checks each
evaluation task's own few-shot exemplars against its evaluation examples.

`OverlapExclusion` is the same test as the training pipeline's example
filter (`data.get_train_dataset(example_filter=)`, installed through
tasks/seqio_tasks.py `set_training_filter` while the pipeline is built):
overlapping training examples are dropped and counted in
`sources.stats(<source>).counts[EXCLUDED]`, the examples checked in
`.counts[CHECKED]`; `exclusion_metrics()` gives them as the scalars training logs.

Not a task module: it has no `register()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import tqdm

from flan_jax import decontamination, evaluation
from flan_jax.suites import CompositeSuite, Suite, expand_suites
from flan_jax.errors import UserError
from tasks import collection, registry, seqio_tasks, sources
from tasks.family import RENDER_SEED, Source

TEXT_BATCH = 1024  # Rows of a text task read at a time.
EXCLUDED = "dropped_overlap"  # The SourceStats count of training examples dropped by `OverlapExclusion`,
CHECKED = "overlap_checked"  # and of those it checked (the pipeline reads lazily: what training has reached).


def example_text(example: Mapping[str, Any]) -> str:
    """All the text of an example, one field per line: a raw one's question, options, rationale and
    answer, a rendered one's inputs and targets."""
    parts = [example.get("question"), *(example.get("options") or ()), example.get("rationale"),
             example.get("answer"), example.get("inputs"), example.get("targets")]
    return "\n".join(p.decode() if isinstance(p, bytes) else str(p) for p in parts if p)


# --- the evaluation side -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """One suite task's examples: where they come from and which split."""

    name: str
    source: Source
    variant: str
    split: str
    size: int


def _task_sources() -> dict[str, tuple[Source, str]]:
    """{task name: (source, variant)} of every recorded family and source."""
    out: dict[str, tuple[Source, str]] = {}
    for family in registry.families().values():
        for variant in family.spec.variants:
            out[registry.task_name(family.name, variant)] = (family, variant)
    for source, tasks in registry.sources().values():
        out.update({task: (source, variant) for task, variant in tasks.items()})
    return out


def eval_tasks(suites: Sequence[Suite | CompositeSuite], *, split: str | None = None,
               limit: int | None = None) -> list[EvalTask]:
    """The tasks of `suites` (composites expanded), each on `split` (default: its suite's) and its first `limit`."""
    flat, _ = expand_suites(suites)
    known = _task_sources()
    out = []
    for suite in flat:
        for task in suite.tasks:
            if task not in known:
                raise UserError(f"suite {suite.name!r}: task {task!r} has no recorded source to read questions from")
            source, variant = known[task]
            task_split = split or suite.split
            if task_split not in source.splits:
                raise UserError(f"suite {suite.name!r}: task {task!r} has no split {task_split!r}; "
                                f"it has {', '.join(source.splits)}")
            size = source.split_size(task_split)
            out.append(EvalTask(task, source, variant, task_split, size if limit is None else min(size, limit)))
    return out


def eval_index(tasks: Sequence[EvalTask]) -> decontamination.OverlapIndex:
    """The n-gram index of every task's questions, keyed (task name, example index)."""
    index = decontamination.OverlapIndex()
    for task in tasks:
        for i in range(task.size):
            index.add(task.name, i, task.source.example(task.split, i)["question"])
    return index


def exemplars_in_eval(task: EvalTask, index: decontamination.OverlapIndex) -> dict[str, Any]:
    """The task's distinct few-shot exemplars, and those whose question overlaps its evaluation examples.

    {"exemplars": how many distinct, "in_eval": [{"exemplar": its question, "eval_indices": those sharing an
    n-gram with it, "identical": those whose question is the same, normalized}]}. Templated tasks (BBH's
    logical deduction) share n-grams between different questions; "identical" is the exemplar itself.
    Zero-shot variants have none.
    """
    questions: dict[str, None] = {}
    if task.variant.startswith("fs_"):
        for i in range(task.size):
            example = task.source.example(task.split, i)
            for exemplar in task.source.exemplars(task.split, i, example, RENDER_SEED):
                questions.setdefault(exemplar["question"])
    found = []
    for question in questions:
        hits = sorted(i for name, i in index.matches(question) if name == task.name)
        if hits:
            same = decontamination.words(question)
            identical = [i for i in hits
                         if decontamination.words(task.source.example(task.split, i)["question"]) == same]
            found.append({"exemplar": question, "eval_indices": hits, "identical": identical})
    return {"exemplars": len(questions), "in_eval": found}


# --- the training side -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainingStream:
    """One source of a mixture's training examples: its name and its (task name, text) pairs."""

    name: str
    rows: Callable[[], Iterator[tuple[str, str]]]


def _source_rows(source: Source) -> Iterator[tuple[str, str]]:
    for i in range(source.split_size("train")):
        yield source.name, example_text(source.example("train", i))


def _text_rows(source: Any, name: str) -> Iterator[tuple[str, str]]:
    """A text task's train split, unshuffled (a Flan Collection stream unthinned: every row it may draw)."""
    if isinstance(source, collection.StreamSource):
        source = collection.StreamSource(source.index, {k: 1.0 for k in source.keep}, name=source.name)
    # Batched: tf.data hands rows to Python at half the speed one at a time; prefetched: reading overlaps matching.
    batches = source.get_dataset("train", shuffle=False).batch(TEXT_BATCH).prefetch(2)
    for batch in batches.as_numpy_iterator():
        tasks = batch["task_name"] if "task_name" in batch else [name.encode()] * len(batch["inputs"])
        for task, inputs, targets in zip(tasks, batch["inputs"], batch["targets"]):
            yield task.decode(), example_text({"inputs": inputs, "targets": targets})


def training_streams(task_names: Sequence[str]) -> list[TrainingStream]:
    """The sources of `task_names`' train splits, each once (variants of one source share it)."""
    by_task = _task_sources()
    text = registry.text_tasks()
    streams: dict[str, TrainingStream] = {}
    for task in task_names:
        if task in by_task:
            source, _ = by_task[task]
            if "train" in source.splits and source.name not in streams:
                streams[source.name] = TrainingStream(source.name, lambda s=source: _source_rows(s))
        elif task in text:
            data_source, _ = text[task]
            key = _text_source_key(data_source, task)
            if key not in streams:
                streams[key] = TrainingStream(task, lambda s=data_source, n=task: _text_rows(s, n))
        else:
            raise UserError(f"task {task!r} has no recorded source or text to read")
    return list(streams.values())


def _text_source_key(source: Any, task: str) -> str:
    """Text tasks over the same export submixture share one stream (its rows are named by their task)."""
    if isinstance(source, collection.StreamSource):
        return "export:" + ",".join(s.path for s in source.index.shards)
    return task


def scan_mixture(index: decontamination.OverlapIndex, streams: Sequence[TrainingStream],
                 report: decontamination.OverlapReport, *, max_rows: int | None = None,
                 progress: bool = True) -> decontamination.OverlapReport:
    """Streams each source's rows (its first `max_rows`, if given) past `index` into `report`."""
    for stream in streams:
        rows = itertools.islice(stream.rows(), max_rows)
        bar = tqdm.tqdm(rows, desc=stream.name, unit=" rows", disable=not progress, mininterval=2.0)
        decontamination.scan(index, bar, report)
    return report


# --- the report ---------------------------------------------------------------------------


def overlap_report(mixture: str, suites: Sequence[Suite | CompositeSuite], *,
                   split: str | None = None, limit: int | None = None, max_rows: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """What `flan-jax data overlap` reports: overlapping pairs, exemplars found among evaluation examples.

    Needs the catalog registered with SeqIO (the mixture's tasks are looked up there).
    """
    tasks = eval_tasks(suites, split=split, limit=limit)
    index = eval_index(tasks)
    report = decontamination.OverlapReport({t.name: t.size for t in tasks})
    scan_mixture(index, training_streams(evaluation.mixture_tasks(mixture)), report, max_rows=max_rows,
                 progress=progress)
    return {
        "mixture": mixture, "suites": [s.name for s in suites], "ngram": index.n, "min_words": index.min_words,
        "max_shared": index.max_shared, "boilerplate_ngrams": index.boilerplate(),
        "eval_tasks": {t.name: {"split": t.split, "examples": t.size, "too_short": index.too_short.get(t.name, 0),
                                **exemplars_in_eval(t, index)} for t in tasks},
        **report.as_dict(),
    }


def format_report(result: Mapping[str, Any]) -> str:
    """The printed table: one line per overlapping pair, then exemplars found among evaluation examples."""
    read = sum(result["training_read"].values())
    lines = [f"{read:,} training examples of {result['mixture']} against "
             f"{sum(t['examples'] for t in result['eval_tasks'].values()):,} evaluation examples of "
             f"{', '.join(result['suites'])} ({result['ngram']}-word n-grams)"]
    if result["pairs"]:
        width = max(len(r["training_task"]) for r in result["pairs"])
        lines.append(f"{'training task':<{width}}  {'eval task':<24} {'eval hit':>9} {'share':>7} {'train rows':>10}")
        for row in result["pairs"]:
            lines.append(f"{row['training_task']:<{width}}  {row['eval_task']:<24} "
                         f"{row['eval_examples']:>5}/{row['eval_size']:<4}{row['eval_share']:>7.1%} "
                         f"{row['training_examples']:>10,}")
    else:
        lines.append("no overlap found")
    for name, task in result["eval_tasks"].items():
        if task["in_eval"]:
            hit = {i for e in task["in_eval"] for i in e["eval_indices"]}
            identical = sum(1 for e in task["in_eval"] if e["identical"])
            lines.append(f"{name}: of its {task['exemplars']} few-shot exemplars, {identical} are evaluation "
                         f"examples and {len(task['in_eval'])} share an n-gram with {len(hit)} of its "
                         f"{task['examples']}")
    return "\n".join(lines)


# --- exclusion in the training pipeline --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OverlapExclusion:
    """`TrainConfig.exclude_overlap_with` as the training pipeline's `data.ExampleFilter`: drops the
    training examples that overlap `index` (the suites' evaluation questions) and counts them."""

    suites: tuple[str, ...]
    index: decontamination.OverlapIndex

    @classmethod
    def of(cls, suites: Sequence[Suite | CompositeSuite]) -> OverlapExclusion:
        """Indexes the evaluation questions of `suites` (a composite counts as its members)."""
        return cls(tuple(s.name for s in suites), eval_index(eval_tasks(suites)))

    def keep(self, source_name: str, example: Mapping[str, Any]) -> bool:
        source_stats = sources.stats(source_name)
        source_stats.count(CHECKED)
        if self.index.matches(example_text(example)):
            source_stats.count(EXCLUDED)
            return False
        return True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The datasets built meanwhile drop overlapping training examples (seqio_tasks.set_training_filter)."""
        seqio_tasks.set_training_filter(self.keep)
        try:
            yield
        finally:
            seqio_tasks.set_training_filter(None)

    def metrics(self) -> dict[str, float]:
        return exclusion_metrics()

    def report(self) -> dict[str, Any]:
        """{"suites", "checked", "dropped": by source}: the run directory's excluded_overlap.json."""
        return {"suites": list(self.suites), "checked": checked_count(), "dropped": excluded_counts()}


def format_exclusion(report: Mapping[str, Any]) -> str:
    """One line: the training examples read and those dropped, by source (`OverlapExclusion.report`).

    The pipeline reads ahead of training (shuffle and prefetch buffers), so
    "read" counts what it reached, a little more than the steps consumed.
    """
    dropped = report["dropped"]
    by_source = f" ({', '.join(f'{k}: {n}' for k, n in sorted(dropped.items()))})" if dropped else ""
    return (f"exclude_overlap_with={','.join(report['suites'])}: dropped {sum(dropped.values())} of "
            f"{report['checked']} training examples read{by_source}")


def excluded_counts() -> dict[str, int]:
    """Training examples dropped by `OverlapExclusion` so far, by source (or text task)."""
    return {name: s.counts[EXCLUDED] for name, s in sources.all_stats().items() if s.counts.get(EXCLUDED)}


def checked_count() -> int:
    """Training examples `OverlapExclusion` has checked so far, all sources together."""
    return sum(s.counts.get(CHECKED, 0) for s in sources.all_stats().values())


def exclusion_metrics() -> dict[str, float]:
    """The counts so far as training scalars: `data/overlap_checked`, `data/overlap_excluded` and
    `data/overlap_excluded/<source>` (by training source, as in excluded_overlap.json).

    The tf.data pipeline reads ahead of the training step (shuffle and prefetch
    buffers), so these are the examples the pipeline has checked so far, not
    those the steps logged so far consumed.
    """
    counts = excluded_counts()
    return {"data/overlap_checked": float(checked_count()), "data/overlap_excluded": float(sum(counts.values())),
            **{f"data/overlap_excluded/{name}": float(n) for name, n in sorted(counts.items())}}
