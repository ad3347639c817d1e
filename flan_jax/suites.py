"""Held-out suites: named lists of tasks scored, averaged and normalized the
way the Flan-T5 paper reports them (`flan-jax eval --suite`).

A `Suite` is a named list of tasks with what its report needs: categories,
each example's random-guess accuracy, which tasks its score averages (MGSM:
the translated languages, not English) and other named averages. Its report
holds per-task, per-category and macro-averaged scores, and the *normalized*
score 100 * (score - chance) / (100 - chance), averaged over tasks. A
`CompositeSuite` runs several suites and averages their normalized scores:
`flan_heldout` (tasks/heldout.py), the paper's "normalized average" of six.
Results are written, logged and printed by `flan_jax.suite_results`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flan_jax.errors import UserError
from flan_jax.evaluation import (ModelFns, TaskExamples, TaskResult, check_method, cut_at_stop, evaluate_tasks,
                                 load_task_examples, score_task, stop_pattern)


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
    max_decode_length: the default decode length (`--target_length` or
    EvalConfig.suite_decode_length replace it); long enough for the longest
    exemplar target, so a model that reasons like its exemplars is not cut.
    method: how predictions are made unless the caller says otherwise
    (evaluation.METHODS; MMLU-Direct: "choice", as `evaluate_flan.py`).
    stops: called when the suite is evaluated; texts that start a new exemplar
    ("Q:"; MGSM: every language's question prefix). Generation of a row stops
    there and its answer is read from the text before.
    average: "tasks", the macro average over tasks (BBH: over its 27 tasks), or
    "examples", over every example of the scored tasks (MMLU, as
    `evaluate_flan.py` and lm-eval average over questions); then the macro
    average over tasks is reported beside it.
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
    method: str = "generate"
    stops: Callable[[], Sequence[str]] = tuple
    average: str = "tasks"

    def __post_init__(self) -> None:
        check_method(self.method, f"suite {self.name!r}: method")
        if self.average not in ("tasks", "examples"):
            raise ValueError(f"suite {self.name!r}: average={self.average!r}, expected 'tasks' or 'examples'")


MACRO = "macro over tasks"  # The averages entry of a suite averaged over examples (MMLU: the 57 subjects).


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
    """Per-task, per-category and averaged scores of one suite, raw and normalized.

    Averages follow `suite.average`: over tasks, or over examples (each task
    weighted by its number of examples; normalized from the weighted score and
    chance).
    """
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

    def mean(values: Sequence[float], names: Sequence[str], by_examples: bool) -> float:
        if not names:
            return math.nan
        weights = [tasks[n]["num_examples"] for n in names] if by_examples else None
        return float(np.average(values, weights=weights)) if not weights or sum(weights) else math.nan

    def average(names: Sequence[str], by_examples: bool = suite.average == "examples") -> dict:
        score = mean([tasks[n]["score"] for n in names], names, by_examples)
        if by_examples:
            chance = mean([tasks[n]["chance"] for n in names], names, by_examples)
            normalized = normalize(score, chance) if names else math.nan
        else:
            chance, normalized = (mean([tasks[n][k] for n in names], names, False) for k in ("chance", "normalized"))
        return {"score": score, "chance": chance, "normalized": normalized, "num_tasks": len(names),
                "num_examples": sum(tasks[n]["num_examples"] for n in names)}

    overall = average(scored)
    averages = {name: average([n for n in names if n in tasks]) for name, names in suite.averages.items()}
    if suite.average == "examples":
        averages[MACRO] = average(scored, by_examples=False)
    metric_names = dict.fromkeys(m for n in scored for m in tasks[n]["metrics"])
    return {
        "suite": suite.name,
        "description": suite.description,
        "metric": suite.metric,
        "split": suite.split,
        "average": suite.average,
        "num_tasks": len(tasks),
        "num_examples": sum(r["num_examples"] for r in tasks.values()),
        "score": overall["score"],
        "chance": overall["chance"],
        "normalized": overall["normalized"],
        "scored_tasks": scored,
        "metrics": {m: mean([tasks[n]["metrics"].get(m, math.nan) for n in scored], scored,
                            suite.average == "examples") for m in metric_names},
        "averages": averages,
        "notes": dict(suite.notes()),
        "over_length": sum(r["over_length"] for r in tasks.values()),
        "truncated": sum(r["truncated"] for r in tasks.values()),
        "unfinished": sum(r["unfinished"] for r in tasks.values()),
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
    log: Callable[[str], None] = print, prompt_length: int = 0,
) -> LoadedSuites:
    """Loads (renders and tokenizes) the first `limit` examples of every task of `suites`, their
    inputs starting with `prompt_length` prompt slots (the model's T5Config.prompt_length)."""
    to_run, composites = expand_suites(suites)
    examples = {}
    for suite in to_run:
        log(f"{suite.name}: loading {len(suite.tasks)} tasks ({suite.split} split"
            f"{f', first {limit} examples each' if limit else ''})...")
        examples[suite.name] = [
            load_task_examples(name, suite.split, lengths, limit, prompt_length) for name in suite.tasks
        ]
    return LoadedSuites(to_run, composites, examples, dict(lengths), limit)


def run_suites(
    suites: Sequence[Suite | CompositeSuite],
    fns: ModelFns,
    *,
    lengths: Mapping[str, int],
    method: str | None = None,
    decode_length: int | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    loaded: LoadedSuites | None = None,
    prompt_length: int = 0,
) -> dict:
    """Evaluates each suite; returns `summarize`'s results ({"suites": {name: report}, "normalized_average", ...}).

    lengths: {"inputs", "targets"}; "targets" caps option targets (rank).
    method: None, each suite's own (Suite.method). decode_length: the most
    tokens generated per row; None, each suite's default (Suite.max_decode_length).
    `loaded` (from `load_suites` with the same suites, lengths, limit and
    prompt_length) skips loading the examples again. `prompt_length`: the
    model's T5Config.prompt_length.
    """
    if method is not None:
        check_method(method, "--method")
    start = time.perf_counter()
    loaded = loaded or load_suites(suites, lengths, limit, log, prompt_length)
    reports = {}
    for suite in loaded.suites:
        t0 = time.perf_counter()
        examples = loaded.examples[suite.name]
        results = evaluate_tasks(
            examples, fns, method=method or suite.method, batch_size=batch_size,
            max_decode_length=decode_length or suite.max_decode_length, target_length=lengths["targets"],
            description=suite.name, show_progress=show_progress, stops=tuple(suite.stops()),
        )
        reports[suite.name] = suite_report(suite, examples, results)
        reports[suite.name]["decode_length"] = decode_length or suite.max_decode_length
        reports[suite.name]["seconds"] = time.perf_counter() - t0
    return summarize(reports, loaded.composites, lengths=dict(lengths), limit=limit,
                     seconds=time.perf_counter() - start)


def score_predictions(
    loaded: LoadedSuites, predictions: Mapping[tuple[str, int], str], source: str = "predictions",
) -> dict:
    """Scores predictions made elsewhere ({(task, index): text}, one per loaded example; see
    `suite_files.read_predictions`) exactly as `run_suites` scores a model's: each text is cut
    at the suite's stops, then the task's postprocessing and metrics; the same results."""
    start = time.perf_counter()
    reports = {}
    for suite in loaded.suites:
        pattern = stop_pattern(tuple(suite.stops()))
        results = {
            task.name: score_task(task, source, [
                cut_at_stop(predictions[(task.name, i)], pattern)[0] for i in range(len(task.features))])
            for task in loaded.examples[suite.name]
        }
        reports[suite.name] = suite_report(suite, loaded.examples[suite.name], results)
    return summarize(reports, loaded.composites, lengths=loaded.lengths, limit=loaded.limit,
                     seconds=time.perf_counter() - start)


def summarize(reports: Mapping[str, dict], composites: Mapping[str, list[str]], **extra: Any) -> dict:
    """Suite reports with their normalized averages: with composites among the suites,
    "normalized_average" is the mean over their members' normalized scores, and suites asked
    for beside them are "extras", reported but not averaged (GSM8K beside `flan_heldout`);
    without, it is the mean over every suite. Each composite also gets its own entry."""
    averaged = list(dict.fromkeys(n for names in composites.values() for n in names)) or list(reports)
    return {
        "suites": dict(reports),
        "normalized_average": _mean_normalized(reports, averaged),
        "averaged_suites": averaged,
        "extras": [name for name in reports if name not in averaged],
        "composites": {
            name: {"suites": names, "normalized_average": _mean_normalized(reports, names),
                   "scores": {n: {k: reports[n][k] for k in ("score", "chance", "normalized", "split")} for n in names}}
            for name, names in composites.items()
        },
        **extra,
    }


def _mean_normalized(reports: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> float:
    return float(np.mean([reports[n]["normalized"] for n in names])) if names else math.nan
