"""BIG-Bench Hard (suzgunmirac/BIG-Bench-Hard): 27 held-out evaluation tasks, 3-shot.

Files, under `<data dir>/bbh/` (see tasks/sources.py):
  bbh/<task>.json          {"examples": [{"input": ..., "target": ...}, ...]}
  cot-prompts/<task>.txt   a canary line, a "-----" line, the task
                           description, then three exemplars
                           "Q: ...\\nA: Let's think step by step. ... So the answer is X."

Tasks, for each of the 27 tasks:
  bbh_{task}_cot     the prompt file as is (canary and "-----" lines removed),
                     then "\\n\\nQ: {input}\\nA: Let's think step by step."
  bbh_{task}_direct  the same exemplars with the reasoning removed,
                     "Q: ...\\nA: X", then "\\n\\nQ: {input}\\nA:"
Both are rendered by the template library (fs_cot and fs_noopt; the
description is the spec's prefix), so an over-long prompt drops exemplars
like any other task. The target is the answer ("So the answer is X." for
CoT); postprocessing extracts X from predictions and targets alike, and the
metric is exact match.
Generation stops at EOS or when the model starts a new "Q:" (Suzgun et al.
stop their model at the next exemplar too), up to DECODE_LENGTHS tokens; the
answer is read from the text before that.

Splits: BBH has one set of examples, registered as "test" and, under the
same examples, "validation", so that seqio.Evaluator's and EvalConfig's
default split works. Mixtures: `bbh_direct`, `bbh_cot` (rate 1 per task:
evaluation visits every task anyway), and suites of the same names (test
split) for `flan-jax eval --suite`, whose random-guess baseline per example
is `chance`.
"""

from __future__ import annotations

import json
import os
import re

from flan_jax.suites import Suite
from flan_jax.errors import UserError
from tasks import files, registry, sources, templates
from tasks.templates import ANSWER_PHRASE, COT_TRIGGER, TaskSpec, Template

PUBLISHED_AT = "https://github.com/suzgunmirac/BIG-Bench-Hard (bbh/ and cot-prompts/)"
SPLITS = ("validation", "test")
MODES = ("direct", "cot")
TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects", "logical_deduction_three_objects",
    "movie_recommendation", "multistep_arithmetic_two", "navigate", "object_counting",
    "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
    "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects", "web_of_lies", "word_sorting",
)
_TEMPLATE = Template("Q: {question}\nA:")
# Tokens decoded per answer (default vocabulary): the longest CoT exemplar target is 1,294 tokens
# (geometric_shapes), the longest answer-only gold target 130 (word_sorting); tests/test_heldout.py checks.
DECODE_LENGTHS = {"cot": 1536, "direct": 256}
# Answers that are one of two words (boolean_expressions, navigate, formal_fallacies, ...).
_BINARY_ANSWERS = ({"True", "False"}, {"Yes", "No"}, {"yes", "no"}, {"valid", "invalid"})
_OPTION_LINE = re.compile(r"^\([A-Z]\) ", re.MULTILINE)
_OPTION_LETTER = re.compile(r"\([A-Z]\)")


def parse_prompt(text: str, path: str = "<prompt>") -> tuple[str, list[sources.Example], str]:
    """Splits a cot-prompts file into (description, exemplars, joiner).

    Each exemplar has question, answer and rationale. The joiner is what
    follows "Let's think step by step." in the file ("\\n", or " " in
    sports_understanding), so rendering reproduces the file exactly.
    """
    lines = text.split("\n")
    if len(lines) < 3 or lines[1].strip() != "-----":
        raise sources.MalformedRow(f"{path}: expected a canary line and a '-----' line first")
    description, *blocks = "\n".join(lines[2:]).strip().split("\n\nQ: ")
    exemplars, joiners = [], set()
    for block in blocks:
        question, marker, reply = block.partition("\nA: ")
        if not marker or not reply.startswith(COT_TRIGGER):
            raise sources.MalformedRow(f"{path}: exemplar {question[:40]!r} has no 'A: {COT_TRIGGER}'")
        joiners.add(reply[len(COT_TRIGGER)])
        rationale, marker, answer = reply[len(COT_TRIGGER) + 1:].rpartition(f" {ANSWER_PHRASE} ")
        if not marker or not answer.endswith("."):
            raise sources.MalformedRow(f"{path}: exemplar {question[:40]!r} does not end in '{ANSWER_PHRASE} X.'")
        exemplars.append({"question": question, "answer": answer[:-1], "rationale": rationale})
    if not exemplars or len(joiners) != 1:
        raise sources.MalformedRow(f"{path}: expected exemplars laid out alike, found {len(exemplars)}")
    return description, exemplars, joiners.pop()


def parse_example(row: sources.Row) -> sources.Example:
    """{"input", "target"} -> {question, answer}; raises MalformedRow."""
    if not isinstance(row, dict):
        raise sources.MalformedRow("not a JSON object")
    example = {"question": str(row.get("input", "")), "answer": str(row.get("target", "")).strip(), "rationale": ""}
    return sources.require_fields(example, ("question", "answer"))


def spec(task: str, mode: str, description: str = "", joiner: str = "\n") -> TaskSpec:
    """The spec of bbh_{task}_{mode}; the description and joiner come from the prompt file."""
    if mode == "direct":
        return TaskSpec(f"bbh_{task}_direct", [_TEMPLATE], prefix=description + "\n\n", shot_joiner=" ")
    return TaskSpec(f"bbh_{task}_cot", [_TEMPLATE], prefix=description + "\n\n", shot_joiner=joiner,
                    cot_separator=" ")


class BbhSource(sources.LoadedSource):
    """One BBH task in one mode. Its spec depends on the prompt file, so it is set when the file is read."""

    def __init__(self, task: str, mode: str) -> None:
        super().__init__(f"bbh_{task}_{mode}", spec(task, mode), SPLITS, locate=_location, read=self._read_files,
                         exemplar_split="prompt", fixed_exemplars=True)
        self.task, self.mode = task, mode

    def _read_files(self, location: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
        path, data = files.read_data_file(self.name, location, f"cot-prompts/{self.task}.txt",
                                            sources.get_it_from(PUBLISHED_AT))
        try:
            description, exemplars, joiner = parse_prompt(data.decode("utf-8"), path)
        except (sources.MalformedRow, UnicodeDecodeError) as e:
            # Without its prompt a task cannot be evaluated as published: stop.
            raise UserError(f"{self.name}: unusable prompt file: {e}") from None
        self.spec = spec(self.task, self.mode, description, joiner)
        path, data = files.read_data_file(self.name, location, f"bbh/{self.task}.json",
                                            sources.get_it_from(PUBLISHED_AT))
        try:
            rows = json.loads(data)["examples"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{self.name}: {path} is not a BBH examples file: {e!r}") from None
        examples = sources.parse_rows(((f"{path}:examples[{i}]", row) for i, row in enumerate(rows)),
                                      parse_example, stats)
        return {"validation": examples, "test": examples, "prompt": exemplars}


def chance(inputs: str, target: str) -> float:
    """The probability that a random guess answers this example right.

    1/n for a choice among the query's n lettered options, 1/2 for a two-word
    answer (True/False, Yes/No, valid/invalid), 0 for free-form answers
    (numbers, sorted words, bracket sequences).
    """
    answer = templates.extract_answer(target)
    if _OPTION_LETTER.fullmatch(answer):
        query = inputs.rpartition("\n\nQ: ")[2]  # After the exemplars, which list options too.
        return 1.0 / max(1, len(_OPTION_LINE.findall(query)))
    return 0.5 if any(answer in pair for pair in _BINARY_ANSWERS) else 0.0


def _location() -> str:
    return os.path.join(sources.data_dir_or_raise("bbh", "the BIG-Bench Hard files", PUBLISHED_AT), "bbh")


def register() -> None:
    """Records the BBH sources, the mixtures and suites `bbh_direct` and `bbh_cot` (run by `tasks.register`)."""
    for mode in MODES:
        names = []
        for task in TASKS:
            variant = "fs_cot" if mode == "cot" else "fs_noopt"
            names += registry.add_source(BbhSource(task, mode), {f"bbh_{task}_{mode}": variant})
        registry.add_mixture(f"bbh_{mode}", [(name, 1.0) for name in names])
        registry.add_suite(Suite(
            f"bbh_{mode}", tuple(names), f"BIG-Bench Hard, 27 tasks, 3-shot, {'chain of thought' if mode == 'cot' else 'answer only'}",
            max_decode_length=DECODE_LENGTHS[mode], chance=chance, stops=_stops,
        ))


def _stops() -> tuple[str, ...]:
    """An answer is done when the model starts a new "Q:" (the exemplars' layout), where Suzgun et al. stop too."""
    return ("Q:",)

