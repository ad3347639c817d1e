"""Evaluation of tasks: load their examples, generate or rank, postprocess, score.

Two users share one path:
  * training-time evaluation (`training_eval.Evaluator`, EvalConfig's mixture
    every `eval_every` steps), and
  * `flan-jax eval --suite=...` (`suites.run_suites`): held-out benchmarks
    scored the way the Flan-T5 paper reports them.

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

Examples are sorted by length and batched with lengths rounded up to a
quarter-octave step (`bucket`), so a suite compiles a handful of shapes and
pads little. A prompt that needs more
than the input length (even after dropping exemplars) is never cut
silently: every task reports how many prompts did not fit whole
(`over_length`: exemplars were dropped) and how many were truncated.

Suites (`flan_jax.suites`) and training-time evaluation
(`flan_jax.training_eval`) build on `evaluate_tasks`.
"""

from __future__ import annotations

import dataclasses
import math
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
MIN_BUCKET = 16  # The shortest padded length, and the smallest step between padded lengths.
BUCKETS_PER_OCTAVE = 4  # Padded lengths between two powers of two (a few shapes, at most 25% padding).


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
    features: list[dict[str, Any]]  # as the SeqIO task yields them (numpy), "inputs" with the prompt slots
    input_length: int
    prompt_length: int = 0  # prompt slots in front of every input (T5Config.prompt_length)

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
    def text_length(self) -> int:
        """The tokens of text an input holds: the input length less the prompt slots."""
        return self.input_length - self.prompt_length

    @property
    def over_length(self) -> int:
        """Prompts that needed more than the text length with every exemplar."""
        return sum(int(ex.get("prompt_tokens", 0)) > self.text_length for ex in self.features)

    @property
    def truncated(self) -> int:
        """Prompts cut by the text length even after dropping exemplars."""
        return sum(int(ex.get("input_tokens", 0)) > self.text_length for ex in self.features)


def load_task_examples(
    name: str, split: str, lengths: Mapping[str, int], limit: int | None = None, prompt_length: int = 0
) -> TaskExamples:
    """The first `limit` examples (all if None) of a SeqIO task's split, in order, their inputs
    starting with `prompt_length` prompt slots (the model's T5Config.prompt_length) as in training."""
    task = seqio.get_mixture_or_task(name)
    if not isinstance(task, seqio.Task):
        raise UserError(f"{name!r} is a mixture; evaluation takes its tasks one by one")
    if split not in task.splits:
        raise UserError(f"task {name!r} has no split {split!r}; it has {', '.join(task.splits)}")
    ds = task.get_dataset(data_lib.text_lengths(lengths, prompt_length), split=split, shuffle=False, num_epochs=1,
                          use_cached=False)
    ds = data_lib.add_prompt_slots(ds, prompt_length)
    if limit is not None:
        ds = ds.take(limit)
    features = list(ds.as_numpy_iterator())
    del ds  # Let TensorFlow's iterator go now (see tasks/registry.py).
    return TaskExamples(task, features, lengths["inputs"], prompt_length)


def mixture_tasks(name: str) -> list[str]:
    """The names of a mixture's tasks (a task's own name for a task)."""
    task = data_lib.get_mixture_or_task(name)
    return [t.name for t in (task.tasks if isinstance(task, seqio.Mixture) else [task])]


# --- batching and prediction -----------------------------------------------------------


def bucket(length: int, limit: int) -> int:
    """`length` rounded up to the next of BUCKETS_PER_OCTAVE even steps above its power of
    two (1025..2048 -> 1280, 1536, 1792, 2048), steps of at least MIN_BUCKET; at most `limit`.

    Encoding cost grows faster than length (attention): t5.1.1-small in bf16 on
    CPU encodes a row in 0.65 s at 1,024 tokens, 1.16 s at 1,536 and 2.05 s at
    2,048, so powers of two made a 1,100-token prompt cost ~2.4x its 1,280.
    """
    length = max(int(length), 1)
    step = max(MIN_BUCKET, (1 << (length - 1).bit_length()) // (2 * BUCKETS_PER_OCTAVE))
    return min(limit, -(-length // step) * step)


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
