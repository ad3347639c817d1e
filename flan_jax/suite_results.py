"""Suites' results out: JSON files, TensorBoard scalars and printed tables (`flan-jax eval --suite`).

`report` writes and prints them on process 0 only: every process of a
multi-process evaluation computes the same scores, and several processes
writing one file or event directory on shared storage would race.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from flan_jax.errors import UserError
from flan_jax.suites import MACRO


def is_writer() -> bool:
    """Whether this process writes and prints results: process 0 of a multi-process run."""
    return jax.process_index() == 0


def report(results: Mapping[str, Any], output: str, tb_dir: str | None = None, step: int = 0) -> None:
    """On process 0 only: `results` as JSON to `output`, as TensorBoard scalars at `step` to
    `tb_dir` (if given), then the table and where they went printed; elsewhere nothing."""
    if not is_writer():
        return
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=1)
    if tb_dir:
        from clu import metric_writers

        writer = metric_writers.create_default_writer(tb_dir)
        writer.write_scalars(step, tensorboard_scalars(results))
        writer.close()
    print(format_results(results))
    print(f"results      {output}" + (f"\ntensorboard  {tb_dir}" if tb_dir else ""))


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
             f"{'over-length':>11} {'truncated':>9} {'unfinished':>10}"
    lines = [header, "-" * len(header)]
    for name, r in results["suites"].items():
        label = name if name not in results.get("extras", ()) else f"{name} (extra)"
        lines.append(f"{label:<24} {r['num_tasks']:>5} {r['num_examples']:>8} {r['score']:>7.2f} {r['chance']:>7.2f} "
                     f"{r['normalized']:>10.2f} {r['over_length']:>11} {r['truncated']:>9} {r.get('unfinished', 0):>10}")
        rows = {**r["categories"], **r.get("averages", {})}
        for row_name, row in rows.items():
            lines.append(f"  {row_name:<22} {row['num_tasks']:>5} {'':>8} {row['score']:>7.2f} {'':>7} "
                         f"{row['normalized']:>10.2f}")
        for task, row in r["tasks"].items() if r.get("list_tasks") else ():
            scored = "" if task in r.get("scored_tasks", r["tasks"]) else " *"
            lines.append(f"  {task + scored:<22} {'':>5} {row['num_examples']:>8} {row['score']:>7.2f} "
                         f"{row['chance']:>7.2f} {row['normalized']:>10.2f} {row['over_length']:>11} {row['truncated']:>9} "
                         f"{row.get('unfinished', 0):>10}")
        if r.get("list_tasks") and len(r.get("scored_tasks", r["tasks"])) < len(r["tasks"]):
            lines.append("  * listed beside the score, not in it")
        if r.get("average") == "examples":
            lines.append(f"  note: the score and categories average over examples (questions); "
                         f"'{MACRO}' is the mean of the task scores")
        lines += [f"  note: {key}: {text}" for key, text in r.get("notes", {}).items()]
    lines.append("-" * len(header))
    for name, composite in results.get("composites", {}).items():
        label = f"{name} normalized average ({len(composite['suites'])} suites)"
        lines.append(f"{label:<55} {composite['normalized_average']:>10.2f}")
    lines.append(f"{'normalized average':<24} {'':>5} {'':>8} {'':>7} {'':>7} {results['normalized_average']:>10.2f}")
    if results.get("extras") and results.get("composites"):
        lines.append(f"extras, not in the normalized average: {', '.join(results['extras'])}")
    if any(r.get("unfinished") for r in results["suites"].values()):
        lines.append("unfinished: rows that reached the decode limit with no EOS and no new exemplar (their answer "
                     "may be cut); raise --target_length to let them finish.")
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
