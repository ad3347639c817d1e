"""Training-time evaluation: EvalConfig's tasks (per task, on average, per
template variant) and suites (score, normalized score, normalized average).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from flan_jax.evaluation import EvalConfig, ModelFns, TaskResult, evaluate_tasks, load_task_examples, mixture_tasks
from flan_jax.suite_results import tensorboard_scalars
from flan_jax.suites import CompositeSuite, Suite, load_suites, run_suites


class Evaluator:
    """Training-time evaluation: EvalConfig's tasks and suites, their examples loaded once."""

    def __init__(self, config: EvalConfig, task_feature_lengths: Mapping[str, int],
                 suites: Sequence[Suite | CompositeSuite] = (), prompt_length: int = 0) -> None:
        """`prompt_length`: the model's T5Config.prompt_length (inputs start with that many slots)."""
        if not config.mixture_or_task_name and not suites:
            raise ValueError("EvalConfig has neither mixture_or_task_name nor suites")
        self.config = config
        self.lengths = dict(config.task_feature_lengths or task_feature_lengths)
        self.examples = [
            load_task_examples(name, config.split, self.lengths, config.num_examples, prompt_length)
            for name in (mixture_tasks(config.mixture_or_task_name) if config.mixture_or_task_name else ())
        ]
        self.suites = (load_suites(suites, self.lengths, config.suite_num_examples, log=lambda _: None,
                                   prompt_length=prompt_length) if suites else None)

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
            flat.update(task_averages(results))
        if self.suites:
            results = run_suites(self.suites.suites, fns, lengths=self.lengths, batch_size=self.config.batch_size,
                                 decode_length=self.config.suite_decode_length, limit=self.config.suite_num_examples,
                                 show_progress=show_progress, log=lambda _: None, loaded=self.suites)
            flat.update({f"eval/{name.removeprefix('eval_suites/')}": value
                         for name, value in tensorboard_scalars(results).items()})
        return flat


# A task name's template variant, as tasks/templates.py names them: "..._fs_cot", "..._zs_noopt".
_VARIANT = re.compile(r"_((?:zs|fs)_(?:noopt|opt|cot))$")


def task_averages(results: Mapping[str, TaskResult]) -> dict[str, float]:
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
