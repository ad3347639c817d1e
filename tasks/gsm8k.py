"""GSM8K test set (openai/grade-school-math): held-out few-shot chain-of-thought evaluation.

Files, under `<data dir>/gsm8k/`:
  test.jsonl           one `{"question", "answer"}` per line; the answer is a
                       worked solution with calculator annotations `<<48/2=24>>`
                       and a last line `#### 72`. The example's answer is the
                       number after "####" (commas removed), its rationale the
                       solution with the annotations removed.
  cot_exemplars.jsonl  the eight chain-of-thought exemplars of Wei et al.
                       (2022), the standard GSM8K prompt ("There are 15 trees
                       in the grove..."), one `{"question", "rationale",
                       "answer"}` per line. A line that is not one (or a
                       missing file) stops the task with one line naming it.

Task `gsm8k_cot` (split "test"; also registered as "validation" so training
can evaluate on it), suite `gsm8k_cot` (outside `flan_heldout`'s average:
run it beside it as an extra). The prompt is the eight exemplars in file
order, then the query, in Wei et al.'s layout:

  Q: {question}
  A: {rationale} The answer is {answer}.

  ...

  Q: {query}
  A:

(each exemplar's reply is `templates.cot_target` with answer phrase "The
answer is"). Exemplars are dropped from the end while the prompt is too
long. The target is the number; predictions and targets are reduced to one
normalized number (`mgsm.final_number`, English numbers, shared with MGSM),
a prediction read only up to a new "Q:" (STOP_PREFIXES: the model has begun
a question of its own), compared by exact match.
"""

from __future__ import annotations

import os
import re

from flan_jax.suites import Suite
from flan_jax.errors import UserError
from tasks import files, registry, sources, templates
from tasks.mgsm import final_number  # One number extraction for GSM8K and MGSM.
from tasks.templates import TaskSpec, Template

NAME = "gsm8k_cot"
PUBLISHED_AT = "https://github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)"
EXEMPLARS_FILE = "cot_exemplars.jsonl"
EXEMPLARS_AT = "the math word problem prompt of Wei et al. (2022), https://arxiv.org/abs/2201.11903"
ANSWER_PHRASE = "The answer is"
NUM_SHOTS = 8
SPLITS = ("validation", "test")
STOP_PREFIXES = ("Q:",)  # The prompt's question prefix: a model that writes it has begun a new problem.
SPEC = TaskSpec(NAME, [Template("Q: {question}\nA:")], num_shots=NUM_SHOTS, shot_joiner=" ")
_ANNOTATION = re.compile(r"<<[^>]*>>")
_EXEMPLAR_FIELDS = ("question", "rationale", "answer")


def parse_row(row: sources.Row) -> sources.Example:
    """{"question", "answer": "...\\n#### 72"} -> {question, answer "72", rationale}."""
    if not isinstance(row, dict):
        raise sources.MalformedRow("not a JSON object")
    solution, marker, answer = str(row.get("answer", "")).rpartition("####")
    if not marker:
        raise sources.MalformedRow("answer has no '#### <number>' line")
    rationale = " ".join(line.strip() for line in _ANNOTATION.sub("", solution).splitlines() if line.strip())
    example = {"question": str(row.get("question", "")).strip(), "answer": answer.strip().replace(",", ""),
               "rationale": rationale}
    return sources.require_fields(example)


def parse_exemplar(row: sources.Row) -> sources.Example:
    """{"question", "rationale", "answer"} -> an exemplar whose answer is its whole reply, "... The answer is 6."."""
    if not isinstance(row, dict):
        raise sources.MalformedRow("not a JSON object")
    fields = sources.require_fields({name: row.get(name) for name in _EXEMPLAR_FIELDS}, _EXEMPLAR_FIELDS)
    return {"question": fields["question"], "answer": templates.cot_target(fields, ANSWER_PHRASE), "rationale": ""}


def read_exemplars(location: str) -> list[sources.Example]:
    """The exemplars of `location/cot_exemplars.jsonl`, in file order; UserError naming the file and line if bad."""
    path, data = files.read_data_file(NAME, location, EXEMPLARS_FILE, sources.get_it_from(EXEMPLARS_AT))
    # Exemplars are the prompt itself: a bad line stops the task instead of being skipped like a bad test row.
    line_stats = sources.SourceStats(f"{NAME} exemplars", log_later=True)
    exemplars = sources.parse_file(data, path, "jsonl", parse_exemplar, line_stats)
    if line_stats.problems:
        raise UserError(f"{NAME}: bad exemplar at {line_stats.problems[0]} (each line must be a JSON object "
                        f"with non-empty string fields {', '.join(_EXEMPLAR_FIELDS)})")
    if not exemplars:
        raise UserError(f"{NAME}: no exemplar in {path}")
    return exemplars


def read(location: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
    path, data = files.read_data_file(NAME, location, "test.jsonl", sources.get_it_from(PUBLISHED_AT))
    examples = sources.parse_file(data, path, "jsonl", parse_row, stats)
    return {"validation": examples, "test": examples, "exemplars": read_exemplars(location)}


def postprocess(text: str | bytes, example: object = None, is_target: bool = False) -> str:
    """SeqIO postprocess_fn: `final_number` in English, read up to any new "Q:"."""
    del example, is_target
    return final_number(text, stops=STOP_PREFIXES)


def _location() -> str:
    return os.path.join(sources.data_dir_or_raise(NAME, "the GSM8K test set", PUBLISHED_AT), "gsm8k")


def register() -> None:
    """Records the GSM8K test source and its suite (run by `tasks.register`)."""
    source = sources.LoadedSource(NAME, SPEC, SPLITS, locate=_location, read=read, exemplar_split="exemplars",
                                  fixed_exemplars=True, postprocess_fn=postprocess)
    registry.add_source(source, {NAME: "fs_noopt"})
    description = f"GSM8K test, {NUM_SHOTS}-shot chain of thought (Wei et al.'s exemplars)"
    registry.add_suite(Suite(NAME, (NAME,), description, max_decode_length=256, stops=lambda: STOP_PREFIXES))
