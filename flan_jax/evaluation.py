"""Evaluation of tasks: load their examples, generate or rank, postprocess, score.

Two users share one path:
  * training-time evaluation (`training_eval.Evaluator`, EvalConfig's mixture
    every `eval_every` steps), and
  * `flan-jax eval --suite=...` (`suites.run_suites`): held-out benchmarks
    scored the way the Flan-T5 paper reports them.

Examples come from the SeqIO task (render, tokenize), and each task's own
`postprocess_fn` and `predict_metric_fns` score them, as seqio.Evaluator
does. Three ways to get a prediction:

  generate  greedy decoding, then the task's postprocess_fn (e.g. the answer
            after "So the answer is"). A row is finished at EOS or when its
            text starts a new exemplar (one of the suite's `stops`, e.g.
            "Q:"), as the published evaluation scripts stop generation there;
            the answer is read from the text before that point, and a batch
            stops decoding once all its rows are finished.
  rank      rank classification: the log-likelihood of each option's target
            given the prompt (one teacher-forced pass over every option, many
            examples per batch); the prediction is the most likely option.
  choice    the option whose token has the highest logit at the first decoding
            step (one pass per example), as hendrycks/test's
            `evaluate_flan.py` scores MMLU with the letters A-D; options of
            several tokens by their tokens' log-likelihood (no EOS).
Rank and choice apply to tasks whose examples carry options (multiple-choice
tasks, non-CoT variants); other tasks are generated.

Examples are sorted by length and batched with lengths rounded up to a
quarter-octave step (`batching.bucket`), so a suite compiles a handful of shapes and
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
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import gin
import numpy as np
import seqio
import tqdm

from flan_jax import data as data_lib
from flan_jax import errors
from flan_jax.batching import batches_by_length, pad_rows
from flan_jax.errors import UserError

METHODS = ("generate", "rank", "choice")


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
    method: str = "generate"  # or "rank" / "choice" where examples have options (see the module docstring)
    suites: Sequence[str] = ()  # suite names (flan-jax eval --suite's), resolved by the train command
    suite_num_examples: int | None = 20  # per suite task; None evaluates everything
    suite_decode_length: int | None = None  # None: each suite's own default (Suite.max_decode_length)

    def __post_init__(self) -> None:
        errors.require_fields(
            self, mixture_or_task_name=errors.optional(errors.NAME), split=errors.NAME,
            num_examples=errors.optional(errors.POSITIVE_INT), batch_size=errors.POSITIVE_INT,
            task_feature_lengths=errors.optional(errors.FEATURE_LENGTHS),
            suite_num_examples=errors.optional(errors.POSITIVE_INT),
            suite_decode_length=errors.optional(errors.POSITIVE_INT),
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

    decode: (inputs [b, l] int32, max_decode_length) -> greedy tokens in chunks [b, n]: the
            output's successive pieces, together at most max_decode_length long. It may
            end early once every row has emitted EOS; the caller stops taking chunks
            once every row is finished.
    score:  (inputs [b, l], targets [b, t]) -> log p(targets | inputs) [b], summed over
            the targets' non-padding tokens (EOS included)
    next_logits: (inputs [b, l], prefix [b, p]) -> the logits [b, vocab] of the decoded token
            after `prefix` (p = 0: the first decoding step)
    """

    decode: Callable[[np.ndarray, int], Iterable[np.ndarray]]
    score: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    next_logits: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


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


# --- prediction -----------------------------------------------------------------------


def stop_pattern(stops: Sequence[str]) -> re.Pattern[str] | None:
    """A pattern that finds where a decoded text starts a new exemplar: any of `stops`
    (e.g. "Q:", "Question:", "問題："), not inside a word ("FAQ:", "这个问题：" are no stops)."""
    if not stops:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(s) for s in stops) + ")")


def cut_at_stop(text: str, stops: re.Pattern[str] | None) -> tuple[str, bool]:
    """(the text before its first stop, whether it had one)."""
    found = stops.search(text) if stops else None
    return (text[: found.start()], True) if found else (text, False)


@dataclasses.dataclass
class Generated:
    """One task's generated texts (cut before any new exemplar) and how many reached the
    decode limit unfinished (no EOS, no new exemplar)."""

    texts: list[str]
    unfinished: int = 0


def _generate(
    examples: Sequence[TaskExamples], fns: ModelFns, batch_size: int, max_decode_length: int, bar: tqdm.tqdm,
    stops: Sequence[str] = (),
) -> list[Generated]:
    """Greedy predictions of every example of every task; a batch stops once all its rows are finished."""
    rows = [(t, i) for t, task in enumerate(examples) for i in range(len(task.features))]
    inputs = [examples[t].features[i]["inputs"] for t, i in rows]
    limit = max(t.input_length for t in examples) if examples else 0
    pattern = stop_pattern(stops)
    generated = [Generated([""] * len(task.features)) for task in examples]
    for batch in batches_by_length(inputs, batch_size):
        vocabularies = [examples[rows[j][0]].vocabulary for j in batch]
        chunks, tokens = [], np.zeros((batch_size, 0), np.int32)
        texts, finished = [""] * len(batch), [False] * len(batch)
        for chunk in fns.decode(pad_rows([inputs[j] for j in batch], batch_size, limit), max_decode_length):
            chunks.append(np.asarray(chunk))
            tokens = np.concatenate(chunks, axis=1)
            texts = [vocab.decode(row.tolist()) for vocab, row in zip(vocabularies, tokens)]
            finished = [(row == vocab.eos_id).any() or cut_at_stop(text, pattern)[1]
                        for vocab, row, text in zip(vocabularies, tokens, texts)]
            if all(finished):
                break
        for j, text, done in zip(batch, texts, finished):
            t, i = rows[j]
            generated[t].texts[i] = cut_at_stop(text, pattern)[0]
            generated[t].unfinished += int(not done and tokens.shape[1] >= max_decode_length)
        bar.update(len(batch))
    return generated


def _rank(
    examples: Sequence[TaskExamples], fns: ModelFns, batch_size: int, target_length: int, bar: tqdm.tqdm
) -> list[list[str]]:
    """The most likely option (with EOS: the whole answer) of every example of every task."""
    which = [(t, i) for t, task in enumerate(examples) for i in range(len(task.features))]
    limit = max(t.input_length for t in examples) if examples else 0
    chosen = iter(_most_likely(examples, which, fns, batch_size, limit, eos=True, target_length=target_length,
                               bar=bar))
    return [[next(chosen) for _ in task.features] for task in examples]


def _choose(examples: Sequence[TaskExamples], fns: ModelFns, batch_size: int, bar: tqdm.tqdm) -> list[list[str]]:
    """The option of every example whose tokens (without EOS) are likeliest as the answer's start.

    With one token per option (T5's vocabulary writes "A" as "▁A") that is the
    option whose token has the highest logit at the first decoding step, one
    pass per example, as `evaluate_flan.py` scores MMLU. Options of several
    tokens (a vocabulary that writes "▁", "A") are compared by the summed
    log-probability of their tokens, teacher-forced, the same rule for longer options.
    """
    if fns.next_logits is None:
        raise UserError("method 'choice' needs a model's next-token logits, which this evaluation has not")
    single, several = [], []  # (t, i) of examples whose options are one token each, and the rest
    for t, task in enumerate(examples):
        for i in range(len(task.features)):
            (single if all(len(o) == 1 for o in _option_tokens(task, i)) else several).append((t, i))
    limit = max(t.input_length for t in examples) if examples else 0
    predictions: list[list[str]] = [[""] * len(task.features) for task in examples]
    inputs = [examples[t].features[i]["inputs"] for t, i in single]
    for batch in batches_by_length(inputs, batch_size):
        padded = pad_rows([inputs[j] for j in batch], batch_size, limit)
        logits = np.asarray(fns.next_logits(padded, np.zeros((batch_size, 0), np.int32)))
        for j, row_logits in zip(batch, logits):
            t, i = single[j]
            tokens = [o[0] for o in _option_tokens(examples[t], i)]
            predictions[t][i] = examples[t].options(i)[int(np.argmax(row_logits[tokens]))]
        bar.update(len(batch))
    bar.total += sum(len(examples[t].options(i)) - 1 for t, i in several)  # a pass per option, not per example
    bar.refresh()
    for (t, i), option in zip(several, _most_likely(examples, several, fns, batch_size, limit, eos=False, bar=bar)):
        predictions[t][i] = option
    return predictions


def _option_tokens(task: TaskExamples, i: int, eos: bool = False) -> list[list[int]]:
    vocab = task.vocabulary
    return [vocab.encode(option) + ([vocab.eos_id] if eos else []) for option in task.options(i)]


def _most_likely(
    examples: Sequence[TaskExamples], which: Sequence[tuple[int, int]], fns: ModelFns, batch_size: int,
    input_limit: int, eos: bool, target_length: int | None = None, bar: tqdm.tqdm | None = None,
) -> list[str]:
    """The option of each (task, example) in `which` with the highest log p(option tokens | prompt)."""
    rows, inputs, targets = [], [], []  # One row per (example, option).
    for n, (t, i) in enumerate(which):
        for k, tokens in enumerate(_option_tokens(examples[t], i, eos)):
            rows.append((n, k))
            inputs.append(examples[t].features[i]["inputs"])
            targets.append(np.asarray(tokens, np.int32))
    target_limit = target_length or max((len(x) for x in targets), default=1)
    scores = [[-math.inf] * len(examples[t].options(i)) for t, i in which]
    for batch in batches_by_length(inputs, batch_size):
        loglik = fns.score(pad_rows([inputs[j] for j in batch], batch_size, input_limit),
                           pad_rows([targets[j] for j in batch], batch_size, target_limit))
        for j, value in zip(batch, np.asarray(loglik)):
            n, k = rows[j]
            scores[n][k] = float(value)
        if bar:
            bar.update(len(batch))
    return [examples[t].options(i)[int(np.argmax(scores[n]))] for n, (t, i) in enumerate(which)]


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
    unfinished: int = 0  # generated rows that reached the decode limit with no EOS and no new exemplar


def score_task(task: TaskExamples, method: str, predictions: Sequence[str], unfinished: int = 0) -> TaskResult:
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
    return TaskResult(task.name, method, len(task.features), metrics, task.over_length, task.truncated, samples,
                      unfinished)


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
    stops: Sequence[str] = (),
) -> dict[str, TaskResult]:
    """Scores every task: rank or choice for tasks whose every example has options, if asked;
    the others are generated, a row finished at EOS or at any of `stops` (a new exemplar)."""
    check_method(method, "method")
    by_options = [t for t in examples if method != "generate" and t.features
                  and all(t.options(i) for i in range(len(t.features)))]
    generated = [t for t in examples if t not in by_options]
    options = sum(len(t.options(i)) for t in by_options for i in range(len(t.features)))
    total = sum(len(t.features) for t in generated) + (
        options if method == "rank" else sum(len(t.features) for t in by_options))
    with tqdm.tqdm(total=total, desc=description, unit="row", disable=not show_progress, dynamic_ncols=True) as bar:
        results = {}
        pick = _rank(by_options, fns, batch_size, target_length, bar) if method == "rank" else (
            _choose(by_options, fns, batch_size, bar) if by_options else [])
        for task, predictions in zip(by_options, pick):
            results[task.name] = score_task(task, method, predictions)
        for task, output in zip(generated, _generate(generated, fns, batch_size, max_decode_length, bar, stops)):
            results[task.name] = score_task(task, "generate", output.texts, output.unfinished)
    return {t.name: results[t.name] for t in examples}
