"""Flan-style instruction templates: templates are data, rendering is one function.

A task is described by a `TaskSpec`: a name, a list of `Template`s (an input
and a target format string over the example's fields), whether it is
multiple choice, and how few-shot prompts are put together. `render` turns
one example into one *variant*:

  zs_noopt  zero-shot, no options              (not when spec.options_required)
  zs_opt    zero-shot, options listed          (multiple-choice tasks only)
  zs_cot    zero-shot, chain of thought        (options listed if multiple choice)
  fs_noopt  few-shot versions of the above: exemplars, then the query
  fs_opt
  fs_cot

An example is a dict of strings with at least `question`, `answer` and
`rationale` (which may be empty for evaluation-only data); multiple-choice
examples also have `options`, a list of strings that contains `answer`.

Exact rendering, for a template `t`, a spec `spec` and an example `ex`:

  base       = t.input.format(**ex)
  options    = "\\n\\nOPTIONS:\\n- " + "\\n- ".join(ex["options"])
  zs_noopt   input  = base
             target = t.target.format(**ex)           (t.target defaults to "{answer}")
  zs_opt     input  = base + options
             target = as zs_noopt
  zs_cot     input  = base [+ options if multiple choice] + spec.cot_separator + spec.cot_trigger
             target = ex["rationale"] + " " + spec.answer_phrase + " " + ex["answer"] + "."
                      (just the answer phrase and answer, if the rationale is empty;
                      spec.answer_phrase defaults to "So the answer is")
  fs_X       input  = spec.shot_separator.join(
                          [e.input + spec.shot_joiner + e.target for e in exemplars] + [q.input])
             target = q.target
             where q is the query and each e an exemplar rendered as zs_X with
             the same template t.
  Every input then starts with spec.prefix (default "", e.g. a task description).

Defaults: cot_separator "\\n", cot_trigger "Let's think step by step.",
shot_joiner "\\n", shot_separator "\\n\\n".

The template is picked per example by `pick_template` from a hash of (task
name, split, index, seed), so every variant of one example uses the same
template. Few-shot exemplars come from the task's source: `pick_exemplars`
draws them from the train split, evaluation sets use a fixed few-shot pool;
either way they never include the query itself. If a maximum input length is given (in
characters by default, or in any unit via `length_fn`; SeqIO tasks pass the
vocabulary's token count), exemplars are dropped from the end one by one
until the prompt fits. If none is left (none fits, or none was given),
`spec.few_shot_fallback` decides: "zero_shot" (default) renders the query
alone, prefix included, leaving a query that alone is too long to the
tokenizer's truncation; "drop" makes `render` return None, so the example is
left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

COT_TRIGGER = "Let's think step by step."
ANSWER_PHRASE = "So the answer is"
OPTIONS_HEADER = "\n\nOPTIONS:\n- "
OPTION_SEPARATOR = "\n- "
COT_SEPARATOR = "\n"  # Between the prompt and the chain-of-thought trigger.
SHOT_JOINER = "\n"  # Between an exemplar's input and its target.

NOOPT_VARIANTS = ("zs_noopt", "fs_noopt", "zs_cot", "fs_cot")
MC_VARIANTS = ("zs_noopt", "zs_opt", "fs_noopt", "fs_opt", "zs_cot", "fs_cot")
OPT_VARIANTS = ("zs_opt", "fs_opt", "zs_cot", "fs_cot")  # Questions that make no sense without their options.
ZERO_SHOT_VARIANTS = ("zs_noopt", "zs_opt", "zs_cot")
FEW_SHOT_FALLBACKS = ("zero_shot", "drop")

# Fields a template may not put in the input: they would give the answer away.
_TARGET_ONLY_FIELDS = frozenset({"answer", "rationale"})


@dataclasses.dataclass(frozen=True)
class Template:
    """One phrasing of a task: format strings over the example's fields."""

    input: str
    target: str = "{answer}"

    def __post_init__(self) -> None:
        leaked = _field_names(self.input) & _TARGET_ONLY_FIELDS
        if leaked:
            raise ValueError(f"template input {self.input!r} uses target-only field(s) {sorted(leaked)}")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything needed to render a task's examples: templates, options, few-shot layout.

    See the module docstring for where each string goes.
    """

    name: str
    templates: tuple[Template, ...]
    multiple_choice: bool = False
    options_required: bool = False  # No *_noopt variants: the question needs its options.
    cot_trigger: str = COT_TRIGGER
    num_shots: int = 3
    prefix: str = ""
    shot_separator: str = "\n\n"
    shot_joiner: str = SHOT_JOINER
    cot_separator: str = COT_SEPARATOR
    few_shot_fallback: str = "zero_shot"  # Or "drop"; see the module docstring.
    answer_phrase: str = ANSWER_PHRASE  # Before a CoT target's answer (MMLU's published prompts: "The answer is").

    def __post_init__(self) -> None:
        if not self.templates:
            raise ValueError(f"task {self.name!r} has no templates")
        if self.options_required and not self.multiple_choice:
            raise ValueError(f"task {self.name!r}: options_required needs multiple_choice")
        if self.few_shot_fallback not in FEW_SHOT_FALLBACKS:
            raise ValueError(f"task {self.name!r}: few_shot_fallback must be one of {FEW_SHOT_FALLBACKS}, "
                             f"not {self.few_shot_fallback!r}")
        # Accept a list for convenience but store a tuple so specs stay hashable.
        object.__setattr__(self, "templates", tuple(self.templates))

    @property
    def variants(self) -> tuple[str, ...]:
        if self.options_required:
            return OPT_VARIANTS
        return MC_VARIANTS if self.multiple_choice else NOOPT_VARIANTS


def _field_names(fmt: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(fmt) if field}


def _rng(*key: Any) -> random.Random:
    # Python's hash() of a str changes between processes; sha256 does not.
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def pick_template(task_name: str, split: str, index: int, seed: int, num_templates: int) -> int:
    """The template index for one example: a deterministic hash, not a counter."""
    return _rng(task_name, split, index, seed, "template").randrange(num_templates)


def same_question(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two examples ask the same thing: same question and same options.

    Options count: in some data sets many rows share one question text and
    differ only in their options ("Which sentence does not make sense?").
    """
    return a["question"] == b["question"] and list(a.get("options") or ()) == list(b.get("options") or ())


def pick_exemplars(
    task_name: str,
    split: str,
    index: int,
    seed: int,
    query: Mapping[str, Any],
    train_example: Callable[[int], Mapping[str, Any]],
    num_train: int,
    count: int,
) -> list[Mapping[str, Any]]:
    """Draws `count` distinct few-shot exemplars from the train split.

    Deterministic in (task_name, split, index, seed). The query never appears:
    neither its own train index nor any train example with the same question
    and options (`same_question`; a validation query may repeat a train one).
    """
    rng = _rng(task_name, split, index, seed, "exemplars")
    tried: set[int] = {index} if split == "train" else set()
    chosen: list[Mapping[str, Any]] = []
    while len(chosen) < count and len(tried) < num_train:
        i = rng.randrange(num_train)
        if i in tried:
            continue
        tried.add(i)
        candidate = train_example(i)
        if not same_question(candidate, query):
            chosen.append(candidate)
    return chosen


def _options_block(example: Mapping[str, Any]) -> str:
    options = example.get("options")
    if not options:
        raise ValueError(f"multiple-choice example has no options: {example!r}")
    if example["answer"] not in options:
        raise ValueError(f"answer {example['answer']!r} is not among the options {list(options)!r}")
    return OPTIONS_HEADER + OPTION_SEPARATOR.join(options)


def cot_target(example: Mapping[str, Any], answer_phrase: str = ANSWER_PHRASE) -> str:
    """The chain-of-thought target: rationale, then the answer in a fixed phrase."""
    answer = f"{answer_phrase} {example['answer']}."
    # Evaluation data has no rationale; its target only needs to carry the answer.
    return f"{example['rationale']} {answer}" if example["rationale"] else answer


def render_zero_shot(spec: TaskSpec, template: Template, example: Mapping[str, Any], kind: str) -> tuple[str, str]:
    """Renders `example` as zs_{kind} (kind: "noopt", "opt" or "cot")."""
    try:
        prompt = template.input.format(**example)
        target = template.target.format(**example)
    except KeyError as e:
        raise KeyError(f"task {spec.name!r}: template refers to missing field {e}") from None
    if kind == "noopt":
        return prompt, target
    if kind == "opt":
        return prompt + _options_block(example), target
    if kind == "cot":
        if spec.multiple_choice:
            prompt += _options_block(example)
        return prompt + spec.cot_separator + spec.cot_trigger, cot_target(example, spec.answer_phrase)
    raise ValueError(f"unknown variant kind {kind!r}")


def _parse_variant(spec: TaskSpec, variant: str) -> tuple[bool, str]:
    if variant not in spec.variants:
        raise ValueError(f"task {spec.name!r} has no variant {variant!r}; it has {spec.variants}")
    shots, kind = variant.split("_", 1)
    return shots == "fs", kind


def render(
    spec: TaskSpec,
    example: Mapping[str, Any],
    variant: str,
    *,
    template_index: int,
    exemplars: Sequence[Mapping[str, Any]] = (),
    max_input_length: int | None = None,
    length_fn: Callable[[str], int] = len,
) -> dict[str, str] | None:
    """Renders one example as one variant; returns {"inputs": ..., "targets": ...}.

    Returns None only for a few-shot variant left with no exemplar when
    `spec.few_shot_fallback` is "drop".

    Args:
      spec: the task's templates and settings.
      example: the query example's fields.
      variant: one of `spec.variants`.
      template_index: which of `spec.templates` to use (see `pick_template`).
      exemplars: few-shot exemplars (used by fs_* variants, at most
        `spec.num_shots`); the caller keeps the query out of them.
      max_input_length: if given, exemplars are dropped from the end until
        `length_fn(inputs) <= max_input_length`.
      length_fn: measures a prompt; `len` counts characters, pass a tokenizer's
        length to count tokens.
    """
    few_shot, kind = _parse_variant(spec, variant)
    template = spec.templates[template_index]
    query_input, query_target = render_zero_shot(spec, template, example, kind)
    if not few_shot:
        return {"inputs": spec.prefix + query_input, "targets": query_target}

    shots = []
    for exemplar in exemplars[: spec.num_shots]:
        shot_input, shot_target = render_zero_shot(spec, template, exemplar, kind)
        shots.append(shot_input + spec.shot_joiner + shot_target)
    while shots:
        inputs = spec.prefix + spec.shot_separator.join(shots + [query_input])
        if max_input_length is None or length_fn(inputs) <= max_input_length:
            return {"inputs": inputs, "targets": query_target}
        shots.pop()
    if spec.few_shot_fallback == "drop":
        return None
    return {"inputs": spec.prefix + query_input, "targets": query_target}


def option_targets(spec: TaskSpec, example: Mapping[str, Any], variant: str, template_index: int) -> list[str]:
    """The target each of the example's options would have, for rank classification.

    Empty when there is nothing to rank: the example has no options, or the
    variant is chain-of-thought (its target is a rationale, not an option).
    """
    _, kind = _parse_variant(spec, variant)
    if kind == "cot" or not example.get("options"):
        return []
    template = spec.templates[template_index]
    return [template.target.format(**{**example, "answer": option}) for option in example["options"]]


def extract_answer(text: str | bytes) -> str:
    """The final answer in a model output or target.

    Chain-of-thought text yields what follows the last "So the answer is",
    without the trailing period; any other text is returned stripped.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    _, phrase, tail = text.rpartition(ANSWER_PHRASE)
    if not phrase:
        return text.strip()
    answer = tail.strip()
    return answer[:-1].rstrip() if answer.endswith(".") else answer
