"""Evaluation: generate or rank, postprocess, score; per task, per suite, normalized.

Two users share one path:
  * training-time evaluation (`Evaluator`, EvalConfig's mixture every
    `eval_every` steps), and
  * `flan-jax eval --suite=...` (`run_suites`): held-out benchmarks scored the
    way the Flan-T5 paper reports them.

Examples come from the SeqIO task (render, tokenize), and each task's own
`postprocess_fn` and `predict_metric_fns` score them, as seqio.Evaluator
does. Two ways to get a prediction:

  generate  greedy decoding, then the task's postprocess_fn (e.g. the answer
            after "So the answer is").
  rank      rank classification: the log-likelihood of each option's target
            given the prompt (one teacher-forced pass over every option, many
            examples per batch); the prediction is the most likely option.
            Used for examples that carry options (multiple-choice tasks,
            non-CoT variants); other tasks are generated.

Examples are sorted by length and batched with lengths rounded up to a power
of two, so a suite compiles a handful of shapes. A prompt that needs more
than the input length (even after dropping exemplars) is never cut
silently: every task reports how many prompts did not fit whole
(`over_length`: exemplars were dropped) and how many were truncated.

A `Suite` is a named list of tasks with what its report needs: categories,
each example's random-guess accuracy, which tasks its score averages (MGSM:
the translated languages, not English) and other named averages. Its report
holds per-task, per-category and macro-averaged scores, and the *normalized*
score 100 * (score - chance) / (100 - chance), averaged over tasks. A
`CompositeSuite` runs several suites and averages their normalized scores:
`flan_heldout` (tasks/heldout.py), the paper's "normalized average" of six.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import gin
import numpy as np
import seqio
import tqdm

from flan_jax import data as data_lib
from flan_jax import errors
from flan_jax.errors import UserError

METHODS = ("generate", "rank")
MIN_BUCKET = 16  # The shortest padded length; lengths are rounded up to powers of two from here.


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What training-time evaluation covers and how.

    Two parts, either or both: the tasks of `mixture_or_task_name` (held-in
    or held-out tasks, scored per task, on average and per template variant)
    and the held-out `suites` (e.g. ("flan_heldout",): each suite's score,
    normalized score and `eval/normalized_average`, as `flan-jax eval
    --suite` reports them), on the first `suite_num_examples` examples of
    each of their tasks.
    """

    mixture_or_task_name: str | None = None
    split: str = "validation"
    num_examples: int | None = 64  # per task; None evaluates everything
    batch_size: int = 32
    task_feature_lengths: Mapping[str, int] | None = None  # None: the training lengths
    method: str = "generate"  # or "rank": rank classification where examples have options
    suites: Sequence[str] = ()  # suite names (flan-jax eval --suite's), resolved by the train command
    suite_num_examples: int | None = 20  # per suite task; None evaluates everything

    def __post_init__(self) -> None:
        errors.require_fields(
            self, mixture_or_task_name=errors.optional(errors.NAME), split=errors.NAME,
            num_examples=errors.optional(errors.POSITIVE_INT), batch_size=errors.POSITIVE_INT,
            task_feature_lengths=errors.optional(errors.FEATURE_LENGTHS),
            suite_num_examples=errors.optional(errors.POSITIVE_INT),
        )
        check_method(self.method, "EvalConfig.method")
        if isinstance(self.suites, str):  # A lone name, as gin users write it.
            object.__setattr__(self, "suites", tuple(n.strip() for n in self.suites.split(",") if n.strip()))

    @property
    def enabled(self) -> bool:
        return bool(self.mixture_or_task_name or self.suites)


def check_method(method: str, where: str) -> None:
    if method not in METHODS:
        raise UserError(f"{where}={method!r}: expected one of {', '.join(METHODS)}")


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """What evaluation needs from a model; `flan_jax.inference.ModelRunner` builds it.

    decode: (inputs [b, l] int32, max_decode_length) -> greedy tokens [b, max_decode_length]
    score:  (inputs [b, l], targets [b, t]) -> log p(targets | inputs) [b], summed over
            the targets' non-padding tokens (EOS included)
    """

    decode: Callable[[np.ndarray, int], np.ndarray]
    score: Callable[[np.ndarray, np.ndarray], np.ndarray]


# --- examples ------------------------------------------------------------------------


@dataclasses.dataclass
class TaskExamples:
    """One task's evaluation examples, tokenized, with what its report needs."""

    task: seqio.Task
    features: list[dict[str, Any]]  # as the SeqIO task yields them (numpy)
    input_length: int

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def vocabulary(self) -> seqio.Vocabulary:
        return self.task.output_features["targets"].vocabulary

    def texts(self, key: str) -> list[str]:
        return [ex[f"{key}_pretokenized"].decode() for ex in self.features]

    def options(self, i: int) -> list[str]:
        return [o.decode() for o in self.features[i].get("options", ())]

    @property
    def over_length(self) -> int:
        """Prompts that needed more than the input length with every exemplar."""
        return sum(int(ex.get("prompt_tokens", 0)) > self.input_length for ex in self.features)

    @property
    def truncated(self) -> int:
        """Prompts cut by the input length even after dropping exemplars."""
        return sum(int(ex.get("input_tokens", 0)) > self.input_length for ex in self.features)


def load_task_examples(
    name: str, split: str, lengths: Mapping[str, int], limit: int | None = None
) -> TaskExamples:
    """The first `limit` examples (all if None) of a SeqIO task's split, in order."""
    task = seqio.get_mixture_or_task(name)
    if not isinstance(task, seqio.Task):
        raise UserError(f"{name!r} is a mixture; evaluation takes its tasks one by one")
    if split not in task.splits:
        raise UserError(f"task {name!r} has no split {split!r}; it has {', '.join(task.splits)}")
    ds = task.get_dataset(dict(lengths), split=split, shuffle=False, num_epochs=1, use_cached=False)
    if limit is not None:
        ds = ds.take(limit)
    features = list(ds.as_numpy_iterator())
    del ds  # Let TensorFlow's iterator go now (see tasks/registry.py).
    return TaskExamples(task, features, lengths["inputs"])


def mixture_tasks(name: str) -> list[str]:
    """The names of a mixture's tasks (a task's own name for a task)."""
    task = data_lib.get_mixture_or_task(name)
    return [t.name for t in (task.tasks if isinstance(task, seqio.Mixture) else [task])]


# --- batching and prediction -----------------------------------------------------------


def bucket(length: int, limit: int) -> int:
    """`length` rounded up to a power of two (at least MIN_BUCKET), at most `limit`."""
    return min(limit, max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()))


def pad_rows(rows: Sequence[np.ndarray], batch_size: int, limit: int) -> np.ndarray:
    """Zero-pads rows into [batch_size, bucketed length]; missing rows are all padding."""
    out = np.zeros((batch_size, bucket(max(len(r) for r in rows), limit)), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row[: out.shape[1]]
    return out


def batches_by_length(rows: Sequence[np.ndarray], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of similar length, longest first (a memory error shows at once)."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _generate(
    examples: Sequence[TaskExamples], fns: ModelFns, batch_size: int, max_decode_length: int, bar: tqdm.tqdm
) -> list[list[str]]:
    """Greedy predictions (decoded text) for every example of every task."""
    rows = [(t, i) for t, task in enumerate(examples) for i in range(len(task.features))]
    inputs = [examples[t].features[i]["inputs"] for t, i in rows]
    limit = max(t.input_length for t in examples) if examples else 0
    predictions: list[list[str]] = [[""] * len(task.features) for task in examples]
    for batch in batches_by_length(inputs, batch_size):
        tokens = fns.decode(pad_rows([inputs[j] for j in batch], batch_size, limit), max_decode_length)
        for j, output in zip(batch, np.asarray(tokens)):
            t, i = rows[j]
            predictions[t][i] = examples[t].vocabulary.decode(output.tolist())
        bar.update(len(batch))
    return predictions


def _rank(
    examples: Sequence[TaskExamples], fns: ModelFns, batch_size: int, target_length: int, bar: tqdm.tqdm
) -> list[list[str]]:
    """The most likely option of every example of every task."""
    rows, inputs, targets = [], [], []  # One row per (task, example, option).
    for t, task in enumerate(examples):
        vocab = task.vocabulary
        for i, ex in enumerate(task.features):
            for k, option in enumerate(task.options(i)):
                rows.append((t, i, k))
                inputs.append(ex["inputs"])
                targets.append(np.asarray(vocab.encode(option) + [vocab.eos_id], np.int32))
    limit = max(t.input_length for t in examples) if examples else 0
    scores: dict[tuple[int, int], list[float]] = {}
    for batch in batches_by_length(inputs, batch_size):
        loglik = fns.score(pad_rows([inputs[j] for j in batch], batch_size, limit),
                           pad_rows([targets[j] for j in batch], batch_size, target_length))
        for j, value in zip(batch, np.asarray(loglik)):
            t, i, k = rows[j]
            scores.setdefault((t, i), [-math.inf] * len(examples[t].options(i)))[k] = float(value)
        bar.update(len(batch))
    return [
        [task.options(i)[int(np.argmax(scores[(t, i)]))] for i in range(len(task.features))]
        for t, task in enumerate(examples)
    ]


@dataclasses.dataclass
class TaskResult:
    """One task's scores and what its prompts looked like."""

    task: str
    method: str
    num_examples: int
    metrics: dict[str, float]
    over_length: int
    truncated: int
    samples: list[dict[str, str]]  # the first few (prompt end, target, prediction)


def _score(task: TaskExamples, method: str, predictions: Sequence[str]) -> TaskResult:
    """Postprocesses predictions and targets with the task's own functions, then its metrics."""
    postprocess = task.task.postprocess_fn or (lambda x, **_: x)
    targets = [postprocess(t, example=ex, is_target=True) for t, ex in zip(task.texts("targets"), task.features)]
    answers = [postprocess(p, example=ex, is_target=False) for p, ex in zip(predictions, task.features)]
    metrics: dict[str, float] = {}
    if task.features:
        for metric_fn in task.task.predict_metric_fns:
            for key, value in metric_fn(targets, answers).items():
                metrics[key] = float(getattr(value, "value", value))
    samples = [
        {"prompt_end": prompt[-200:], "target": target, "prediction": prediction}
        for prompt, target, prediction in zip(task.texts("inputs")[:3], task.texts("targets"), predictions)
    ]
    return TaskResult(task.name, method, len(task.features), metrics, task.over_length, task.truncated, samples)


def evaluate_tasks(
    examples: Sequence[TaskExamples],
    fns: ModelFns,
    *,
    method: str = "generate",
    batch_size: int = 32,
    max_decode_length: int = 64,
    target_length: int = 64,
    description: str = "evaluating",
    show_progress: bool = True,
) -> dict[str, TaskResult]:
    """Scores every task; rank classification for tasks whose every example has options, if asked."""
    check_method(method, "method")
    ranked = [t for t in examples if method == "rank" and t.features and all(t.options(i) for i in range(len(t.features)))]
    generated = [t for t in examples if t not in ranked]
    total = sum(len(t.features) for t in generated) + sum(len(t.options(i)) for t in ranked for i in range(len(t.features)))
    with tqdm.tqdm(total=total, desc=description, unit="row", disable=not show_progress, dynamic_ncols=True) as bar:
        results = {}
        for task, predictions in zip(ranked, _rank(ranked, fns, batch_size, target_length, bar)):
            results[task.name] = _score(task, "rank", predictions)
        for task, predictions in zip(generated, _generate(generated, fns, batch_size, max_decode_length, bar)):
            results[task.name] = _score(task, "generate", predictions)
    return {t.name: results[t.name] for t in examples}


class Evaluator:
    """Training-time evaluation: EvalConfig's tasks and suites, their examples loaded once."""

    def __init__(self, config: EvalConfig, task_feature_lengths: Mapping[str, int],
                 suites: Sequence[Suite | CompositeSuite] = ()) -> None:
        if not config.mixture_or_task_name and not suites:
            raise ValueError("EvalConfig has neither mixture_or_task_name nor suites")
        self.config = config
        self.lengths = dict(config.task_feature_lengths or task_feature_lengths)
        self.examples = [
            load_task_examples(name, config.split, self.lengths, config.num_examples)
            for name in (mixture_tasks(config.mixture_or_task_name) if config.mixture_or_task_name else ())
        ]
        self.suites = load_suites(suites, self.lengths, config.suite_num_examples, log=lambda _: None) if suites else None

    @property
    def task_names(self) -> list[str]:
        suite_tasks = [t.name for examples in (self.suites.examples.values() if self.suites else ()) for t in examples]
        return [t.name for t in self.examples] + suite_tasks

    @property
    def max_decode_length(self) -> int:
        return self.lengths["targets"]

    def evaluate(self, fns: ModelFns, step: int, show_progress: bool = False) -> dict[str, float]:
        """Returns {"eval/<task>/<metric>": value, ..., "eval/average_<metric>": mean over tasks,
        "eval/variant/<variant>/<metric>": mean over the tasks of one template variant,
        "eval/<suite>/score" and ".../normalized", "eval/normalized_average"}."""
        del step  # The caller logs the step.
        flat: dict[str, float] = {}
        if self.examples:
            results = evaluate_tasks(
                self.examples, fns, method=self.config.method, batch_size=self.config.batch_size,
                max_decode_length=self.max_decode_length, target_length=self.max_decode_length,
                show_progress=show_progress,
            )
            flat.update(_task_averages(results))
        if self.suites:
            results = run_suites(self.suites.suites, fns, lengths=self.lengths, batch_size=self.config.batch_size,
                                 limit=self.config.suite_num_examples, show_progress=show_progress,
                                 log=lambda _: None, loaded=self.suites)
            flat.update({f"eval/{name.removeprefix('eval_suites/')}": value
                         for name, value in tensorboard_scalars(results).items()})
        return flat


# A task name's template variant, as tasks/templates.py names them: "..._fs_cot", "..._zs_noopt".
_VARIANT = re.compile(r"_((?:zs|fs)_(?:noopt|opt|cot))$")


def _task_averages(results: Mapping[str, TaskResult]) -> dict[str, float]:
    """Per-task metrics, their means over tasks and over the tasks of each template variant."""
    flat: dict[str, float] = {}
    groups: dict[str, dict[str, list[float]]] = {}
    for task, result in sorted(results.items()):
        variant = _VARIANT.search(task)
        for name, value in result.metrics.items():
            flat[f"eval/{task}/{name}"] = value
            groups.setdefault("average", {}).setdefault(name, []).append(value)
            if variant:
                groups.setdefault(f"variant/{variant.group(1)}", {}).setdefault(name, []).append(value)
    for group, metrics in groups.items():
        for name, values in metrics.items():
            key = f"eval/average_{name}" if group == "average" else f"eval/{group}/{name}"
            flat[key] = float(np.mean(values))
    return flat


# --- suites --------------------------------------------------------------------------


def no_chance(inputs: str, target: str) -> float:
    """Random guessing never gets a free-form answer right."""
    del inputs, target
    return 0.0


@dataclasses.dataclass(frozen=True)
class Suite:
    """A held-out benchmark: its tasks and what its report needs.

    chance: (rendered prompt, target) -> the probability that a uniformly random
    guess among the example's answer choices is right (0 for free-form answers).
    scored: the tasks whose macro average is the suite's score (and normalized
    score); empty means all of them. The others are evaluated and listed
    beside it (MGSM's English, the source the ten languages were translated from).
    averages: more named macro averages reported beside the score, e.g.
    {"all_languages": every task}.
    notes: called after evaluation; what the report must say about how it was
    evaluated (e.g. where TyDiQA's exemplars came from).
    list_tasks: the printed table has a row per task (per language).
    """

    name: str
    tasks: tuple[str, ...]
    description: str
    split: str = "test"
    max_decode_length: int = 256
    categories: Mapping[str, str] = dataclasses.field(default_factory=dict)  # task -> category
    chance: Callable[[str, str], float] = no_chance
    metric: str = "accuracy"
    scored: tuple[str, ...] = ()
    averages: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    notes: Callable[[], Mapping[str, str]] = dict
    list_tasks: bool = False


@dataclasses.dataclass(frozen=True)
class CompositeSuite:
    """Several suites run together and summarized by one normalized average over them.

    The Flan-T5 paper's headline (`flan_heldout`, tasks/heldout.py) is the
    macro average of six suites' normalized scores. `members` is called when
    the composite is run, so it may name suites registered after it.
    """

    name: str
    description: str
    members: Callable[[], Sequence[Suite]]


def expand_suites(suites: Sequence[Suite | CompositeSuite]) -> tuple[list[Suite], dict[str, list[str]]]:
    """The suites to run, each once, and each composite's member names.

    A suite named twice with different splits (e.g. MMLU in `flan_heldout`,
    validation, and alone, test) would give two reports of one name: refused.
    """
    flat: dict[str, Suite] = {}
    composites: dict[str, list[str]] = {}
    for entry in suites:
        if isinstance(entry, CompositeSuite):
            members = list(entry.members())
            composites[entry.name] = [m.name for m in members]
        else:
            members = [entry]
        for suite in members:
            known = flat.setdefault(suite.name, suite)
            if known.split != suite.split:
                raise UserError(f"suite {suite.name!r} is asked for on two splits ({known.split}, {suite.split}); "
                                f"evaluate them in separate runs")
    return list(flat.values()), composites


def normalize(score: float, chance: float) -> float:
    """The score's share of the way from random guessing (0) to perfect (100)."""
    return 100.0 * (score - chance) / (100.0 - chance) if chance < 100.0 else 0.0


def suite_report(suite: Suite, examples: Sequence[TaskExamples], results: Mapping[str, TaskResult]) -> dict:
    """Per-task, per-category and macro-averaged scores of one suite, raw and normalized."""
    tasks = {}
    for task in examples:
        result = results[task.name]
        chance = 100.0 * float(np.mean([suite.chance(i, t) for i, t in zip(task.texts("inputs"), task.texts("targets"))]
                                       )) if task.features else 0.0
        score = result.metrics.get(suite.metric, math.nan)
        tasks[task.name] = {
            "score": score, "chance": chance, "normalized": normalize(score, chance),
            "category": suite.categories.get(task.name, ""), **dataclasses.asdict(result),
        }
    categories: dict[str, list[str]] = {}
    for name, row in tasks.items():
        if row["category"]:
            categories.setdefault(row["category"], []).append(name)
    scored = [name for name in tasks if name in suite.scored] if suite.scored else list(tasks)

    def mean(key: str, names: Sequence[str]) -> float:
        return float(np.mean([tasks[n][key] for n in names])) if names else math.nan

    def average(names: Sequence[str]) -> dict:
        return {"score": mean("score", names), "normalized": mean("normalized", names), "num_tasks": len(names)}

    metric_names = dict.fromkeys(m for n in scored for m in tasks[n]["metrics"])
    return {
        "suite": suite.name,
        "description": suite.description,
        "metric": suite.metric,
        "split": suite.split,
        "num_tasks": len(tasks),
        "num_examples": sum(r["num_examples"] for r in tasks.values()),
        "score": mean("score", scored),
        "chance": mean("chance", scored),
        "normalized": mean("normalized", scored),
        "scored_tasks": scored,
        "metrics": {m: float(np.mean([tasks[n]["metrics"].get(m, math.nan) for n in scored])) for m in metric_names},
        "averages": {name: average([n for n in names if n in tasks]) for name, names in suite.averages.items()},
        "notes": dict(suite.notes()),
        "over_length": sum(r["over_length"] for r in tasks.values()),
        "truncated": sum(r["truncated"] for r in tasks.values()),
        "methods": sorted({r["method"] for r in tasks.values()}),
        "categories": {c: average(n) for c, n in sorted(categories.items())},
        "list_tasks": suite.list_tasks,
        "tasks": tasks,
    }


@dataclasses.dataclass
class LoadedSuites:
    """Suites' examples, loaded once (`load_suites`), to evaluate any number of times (`run_suites`)."""

    suites: list[Suite]  # each suite once, composites expanded
    composites: dict[str, list[str]]  # composite name -> member suite names
    examples: dict[str, list[TaskExamples]]  # suite name -> its tasks' examples
    lengths: dict[str, int]
    limit: int | None


def load_suites(
    suites: Sequence[Suite | CompositeSuite], lengths: Mapping[str, int], limit: int | None = None,
    log: Callable[[str], None] = print,
) -> LoadedSuites:
    """Loads (renders and tokenizes) the first `limit` examples of every task of `suites`."""
    to_run, composites = expand_suites(suites)
    examples = {}
    for suite in to_run:
        log(f"{suite.name}: loading {len(suite.tasks)} tasks ({suite.split} split"
            f"{f', first {limit} examples each' if limit else ''})...")
        examples[suite.name] = [load_task_examples(name, suite.split, lengths, limit) for name in suite.tasks]
    return LoadedSuites(to_run, composites, examples, dict(lengths), limit)


def run_suites(
    suites: Sequence[Suite | CompositeSuite],
    fns: ModelFns,
    *,
    lengths: Mapping[str, int],
    method: str = "generate",
    batch_size: int = 32,
    limit: int | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    loaded: LoadedSuites | None = None,
) -> dict:
    """Evaluates each suite; returns {"suites": {name: report}, "normalized_average", "seconds", ...}.

    lengths: {"inputs", "targets"}; "targets" caps option targets (rank) and each
    suite's decode length. With composites among `suites`, "normalized_average"
    is the mean over their members' normalized scores, and suites asked for
    beside them are "extras", reported but not averaged (GSM8K beside
    `flan_heldout`); without, it is the mean over every suite. Each composite
    also gets its own entry in "composites". `loaded` (from `load_suites`
    with the same suites, lengths and limit) skips loading the examples again.
    """
    check_method(method, "--method")
    start = time.perf_counter()
    loaded = loaded or load_suites(suites, lengths, limit, log)
    reports, composites = {}, loaded.composites
    for suite in loaded.suites:
        t0 = time.perf_counter()
        examples = loaded.examples[suite.name]
        results = evaluate_tasks(
            examples, fns, method=method, batch_size=batch_size,
            max_decode_length=min(suite.max_decode_length, lengths["targets"]),
            target_length=lengths["targets"], description=suite.name, show_progress=show_progress,
        )
        reports[suite.name] = suite_report(suite, examples, results)
        reports[suite.name]["seconds"] = time.perf_counter() - t0
    averaged = list(dict.fromkeys(n for names in composites.values() for n in names)) or list(reports)
    return {
        "suites": reports,
        "normalized_average": _mean_normalized(reports, averaged),
        "averaged_suites": averaged,
        "extras": [name for name in reports if name not in averaged],
        "composites": {
            name: {"suites": names, "normalized_average": _mean_normalized(reports, names),
                   "scores": {n: {k: reports[n][k] for k in ("score", "chance", "normalized", "split")} for n in names}}
            for name, names in composites.items()
        },
        "method": method,
        "lengths": dict(lengths),
        "limit": limit,
        "seconds": time.perf_counter() - start,
    }


def _mean_normalized(reports: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> float:
    return float(np.mean([reports[n]["normalized"] for n in names])) if names else math.nan


def tensorboard_scalars(results: Mapping[str, Any]) -> dict[str, float]:
    """The scores of `run_suites`' results as flat TensorBoard scalar names."""
    scalars = {"eval_suites/normalized_average": results["normalized_average"]}
    for name, composite in results.get("composites", {}).items():
        scalars[f"eval_suites/{name}/normalized_average"] = composite["normalized_average"]
    for name, report in results["suites"].items():
        for key in ("score", "normalized"):
            scalars[f"eval_suites/{name}/{key}"] = report[key]
        for average, row in {**report["categories"], **report.get("averages", {})}.items():
            scalars[f"eval_suites/{name}/category/{average}"] = row["score"]
        for task, row in report["tasks"].items():
            scalars[f"eval_suites/{name}/task/{task}"] = row["score"]
    return scalars


def format_results(results: Mapping[str, Any]) -> str:
    """One table: a line per suite (and per category, average or task), then the normalized averages."""
    header = f"{'suite':<24} {'tasks':>5} {'examples':>8} {'score':>7} {'chance':>7} {'normalized':>10} " \
             f"{'over-length':>11} {'truncated':>9}"
    lines = [header, "-" * len(header)]
    for name, r in results["suites"].items():
        label = name if name not in results.get("extras", ()) else f"{name} (extra)"
        lines.append(f"{label:<24} {r['num_tasks']:>5} {r['num_examples']:>8} {r['score']:>7.2f} {r['chance']:>7.2f} "
                     f"{r['normalized']:>10.2f} {r['over_length']:>11} {r['truncated']:>9}")
        rows = {**r["categories"], **r.get("averages", {})}
        for row_name, row in rows.items():
            lines.append(f"  {row_name:<22} {row['num_tasks']:>5} {'':>8} {row['score']:>7.2f} {'':>7} "
                         f"{row['normalized']:>10.2f}")
        for task, row in r["tasks"].items() if r.get("list_tasks") else ():
            scored = "" if task in r.get("scored_tasks", r["tasks"]) else " *"
            lines.append(f"  {task + scored:<22} {'':>5} {row['num_examples']:>8} {row['score']:>7.2f} "
                         f"{row['chance']:>7.2f} {row['normalized']:>10.2f} {row['over_length']:>11} {row['truncated']:>9}")
        if r.get("list_tasks") and len(r.get("scored_tasks", r["tasks"])) < len(r["tasks"]):
            lines.append("  * listed beside the score, not in it")
        lines += [f"  note: {key}: {text}" for key, text in r.get("notes", {}).items()]
    lines.append("-" * len(header))
    for name, composite in results.get("composites", {}).items():
        label = f"{name} normalized average ({len(composite['suites'])} suites)"
        lines.append(f"{label:<55} {composite['normalized_average']:>10.2f}")
    lines.append(f"{'normalized average':<24} {'':>5} {'':>8} {'':>7} {'':>7} {results['normalized_average']:>10.2f}")
    if results.get("extras") and results.get("composites"):
        lines.append(f"extras, not in the normalized average: {', '.join(results['extras'])}")
    if any(r["over_length"] for r in results["suites"].values()):
        lines.append("over-length: prompts that needed more than the input length with all their exemplars "
                     "(exemplars were dropped); truncated: cut even so. Raise --input_length to score them whole.")
    return "\n".join(lines)


def read_results(path: str) -> dict:
    """A results file written by `flan-jax eval --suite`."""
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such results file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a results file ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("suites"), dict):
        raise UserError(f"{path}: not a results file of `flan-jax eval --suite` (no 'suites')")
    return results


def compare_results(named: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Results side by side: a row per suite and split (score / normalized), a column per file."""
    names = [os.path.basename(n) for n, _ in named]
    width = max(18, *(len(n) for n in names))

    def label(suite: str, report: Mapping[str, Any]) -> str:
        split = report.get("split", "test")
        return suite if split == "test" else f"{suite} [{split}]"

    rows = {label(s, report): s for _, r in named for s, report in r["suites"].items()}
    lines = [f"{'suite':<28} " + " ".join(f"{n:>{width}}" for n in names),
             f"{'':<28} " + " ".join(f"{'score / normalized':>{width}}" for _ in names)]
    for row_label, suite in rows.items():
        cells = []
        for _, r in named:
            row = r["suites"].get(suite)
            same = row is not None and label(suite, row) == row_label
            cells.append(f"{row['score']:7.2f} / {row['normalized']:6.2f}" if same else "-")
        lines.append(f"{row_label:<28} " + " ".join(f"{c:>{width}}" for c in cells))
    for composite in dict.fromkeys(c for _, r in named for c in r.get("composites", {})):
        cells = [r.get("composites", {}).get(composite) for _, r in named]
        lines.append(f"{composite + ' normalized avg':<28} "
                     + " ".join(f"{c['normalized_average']:>{width}.2f}" if c else f"{'-':>{width}}" for c in cells))
    lines.append(f"{'normalized average':<28} " + " ".join(f"{r['normalized_average']:>{width}.2f}" for _, r in named))
    return "\n".join(lines)
