"""Suites' prompts out and predictions in, as JSON Lines: score a model that runs elsewhere.

`flan-jax eval --suite=S --export_prompts=FILE` writes one record per example:

  {"suite", "task", "index", "inputs", "target", "stops"[, "options"]}

(`index`: the example's position in its task, in the order evaluation loads
them; `stops`: texts that start a new exemplar, where generation should
stop). `flan-jax eval --suite=S --predictions=FILE` reads one record per
example, {"task", "index", "prediction"} (other fields are ignored), and
scores them with the suite's own extraction and metrics
(`suites.score_predictions`). Every example must have exactly one
prediction: a missing, duplicate or unknown row is a UserError naming the
file and line.
"""

from __future__ import annotations

import json
import os

from flan_jax.errors import UserError
from flan_jax.suites import LoadedSuites


def export_prompts(loaded: LoadedSuites, path: str) -> int:
    """Writes every loaded example's prompt record to `path` (JSON Lines, atomically); returns the count."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = 0
    with open(f"{path}.partial", "w", encoding="utf-8") as f:
        for suite in loaded.suites:
            stops = list(suite.stops())
            for task in loaded.examples[suite.name]:
                for index, (inputs, target) in enumerate(zip(task.texts("inputs"), task.texts("targets"))):
                    record = {"suite": suite.name, "task": task.name, "index": index, "inputs": inputs,
                              "target": target, "stops": stops}
                    if task.options(index):
                        record["options"] = task.options(index)
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    count += 1
    os.replace(f"{path}.partial", path)
    return count


def read_predictions(path: str, loaded: LoadedSuites) -> dict[tuple[str, int], str]:
    """{(task, index): prediction} for every loaded example, from a JSON Lines file."""
    sizes = {task.name: len(task.features) for examples in loaded.examples.values() for task in examples}
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(enumerate(f, 1))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read predictions from {path}: {e}") from None
    predictions: dict[tuple[str, int], str] = {}
    seen_at: dict[tuple[str, int], int] = {}
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg})") from None
        if not (isinstance(record, dict) and isinstance(record.get("task"), str)
                and isinstance(record.get("index"), int) and isinstance(record.get("prediction"), str)):
            raise UserError(f'{where}: expected an object with "task" (string), "index" (integer) and '
                            f'"prediction" (string)')
        key = (record["task"], record["index"])
        if key[0] not in sizes:
            raise UserError(f"{where}: unknown task {key[0]!r}: not in the suites evaluated")
        if not 0 <= key[1] < sizes[key[0]]:
            raise UserError(f"{where}: {key[0]} has no example {key[1]} (it has {sizes[key[0]]}, indices from 0)")
        if key in seen_at:
            raise UserError(f"{where}: a second prediction for {key[0]} example {key[1]} (the first is on line "
                            f"{seen_at[key]})")
        seen_at[key] = number
        predictions[key] = record["prediction"]
    missing = [(task, i) for task, size in sizes.items() for i in range(size) if (task, i) not in predictions]
    if missing:
        task, index = missing[0]
        raise UserError(f"{path}: no prediction for {task} example {index}"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return predictions
