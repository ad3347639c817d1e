"""Held-out evaluation through seqio.Evaluator: decode, postprocess, score.

Each task's own `postprocess_fn` (e.g. chain-of-thought answer extraction)
and `metric_fns` (e.g. exact-match accuracy) are applied by SeqIO, exactly as
T5X does; this module only supplies the predictions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from flan_jax import data as data_lib
from flan_jax import errors

# (encoder_input_tokens [batch, in_len]) -> output tokens [batch, max_decode_len]
DecodeFn = Callable[[np.ndarray], np.ndarray]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how much of it."""

    mixture_or_task_name: str | None = None
    split: str = "validation"
    num_examples: int | None = 64  # per task; None evaluates everything
    batch_size: int = 32
    task_feature_lengths: Mapping[str, int] | None = None  # None: the training lengths

    def __post_init__(self) -> None:
        errors.require_fields(
            self, mixture_or_task_name=errors.optional(errors.NAME), split=errors.NAME,
            num_examples=errors.optional(errors.POSITIVE_INT), batch_size=errors.POSITIVE_INT,
            task_feature_lengths=errors.optional(errors.FEATURE_LENGTHS),
        )


def make_predict_fn(decode_fn: DecodeFn, batch_size: int) -> Callable[[tf.data.Dataset], list[tuple[int, np.ndarray]]]:
    """A seqio predict_fn: batches (index, features), pads the last batch, decodes."""

    def predict_fn(ds: tf.data.Dataset) -> list[tuple[int, np.ndarray]]:
        results: list[tuple[int, np.ndarray]] = []
        for indices, features in ds.batch(batch_size).as_numpy_iterator():
            inputs = features["encoder_input_tokens"]
            n = inputs.shape[0]
            if n < batch_size:  # Keep one compiled shape.
                inputs = np.pad(inputs, ((0, batch_size - n), (0, 0)))
            outputs = np.asarray(decode_fn(inputs))[:n]
            results.extend(zip(indices.tolist(), outputs))
        return results

    return predict_fn


class Evaluator:
    """Decodes the tasks of a mixture and reports SeqIO metrics per task."""

    def __init__(self, config: EvalConfig, task_feature_lengths: Mapping[str, int]) -> None:
        if not config.mixture_or_task_name:
            raise ValueError("EvalConfig.mixture_or_task_name is not set")
        data_lib.get_mixture_or_task(config.mixture_or_task_name)
        self.config = config
        self.task_feature_lengths = dict(config.task_feature_lengths or task_feature_lengths)
        self._evaluator = seqio.Evaluator(
            mixture_or_task_name=config.mixture_or_task_name,
            feature_converter=data_lib.feature_converter(pack=False),
            eval_split=config.split,
            sequence_length=self.task_feature_lengths,
            num_examples=config.num_examples,
            logger_cls=(),
            async_compute_metrics=False,
        )

    @property
    def task_names(self) -> Sequence[str]:
        return [t.name for t in self._evaluator.eval_tasks]

    @property
    def max_decode_length(self) -> int:
        return self.task_feature_lengths["targets"]

    def evaluate(self, decode_fn: DecodeFn, step: int) -> dict[str, float]:
        """Returns {"eval/<task>/<metric>": value, ..., "eval/average_<metric>": mean}."""
        predict_fn = make_predict_fn(decode_fn, self.config.batch_size)
        future, _ = self._evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn)
        flat: dict[str, float] = {}
        per_metric: dict[str, list[float]] = {}
        for task, metrics in sorted(future.result().items()):
            for name, value in metrics.items():
                value = float(getattr(value, "value", value))
                flat[f"eval/{task}/{name}"] = value
                per_metric.setdefault(name, []).append(value)
        for name, values in per_metric.items():
            flat[f"eval/average_{name}"] = float(np.mean(values))
        return flat
