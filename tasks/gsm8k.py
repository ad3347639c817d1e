"""GSM8K test set (openai/grade-school-math): held-out few-shot chain-of-thought evaluation.

File: `<data dir>/gsm8k/test.jsonl`, one `{"question", "answer"}` per line;
the answer is a worked solution with calculator annotations `<<48/2=24>>` and
a last line `#### 72`. The example's answer is the number after "####"
(commas removed), its rationale the solution with the annotations removed.

Task `gsm8k_cot` (split "test"; also registered as "validation" so training
can evaluate on it), suite `gsm8k_cot` (outside `flan_heldout`'s average:
run it beside it as an extra). The prompt is the standard 8-shot chain of
thought of Wei et al. (2022), in their layout:

  Q: {question}
  A: {reasoning} The answer is {answer}.

with the eight exemplars read from MGSM's `exemplars.py` (their English set,
`<data dir>/mgsm/exemplars.py`; see tasks/mgsm.py), labels "Question:" and
"Step-by-Step Answer:" replaced by "Q:" and "A:", then the query ending in
"A:". Exemplars are dropped from the end while the prompt is too long. The
target is the number; predictions and targets are reduced to one normalized
number (`final_number`, shared with MGSM), compared by exact match.
"""

from __future__ import annotations

import os
import re

from flan_jax.suites import Suite
from flan_jax.errors import UserError
from tasks import files, mgsm, registry, sources
from tasks.mgsm import final_number  # GSM8K's postprocess_fn; one number extraction for GSM8K and MGSM.
from tasks.templates import TaskSpec, Template

NAME = "gsm8k_cot"
PUBLISHED_AT = "https://github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)"
NUM_SHOTS = 8
SPLITS = ("validation", "test")
SPEC = TaskSpec(NAME, [Template("Q: {question}\nA:")], num_shots=NUM_SHOTS, shot_joiner=" ")
_ANNOTATION = re.compile(r"<<[^>]*>>")


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


def read(location: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
    path, data = files.read_data_file(NAME, location, "test.jsonl", sources.get_it_from(PUBLISHED_AT))
    examples = sources.parse_file(data, path, "jsonl", parse_row, stats)
    english = mgsm.read_exemplars(NAME, mgsm.location()).get("en")
    if english is None:
        raise UserError(f"{NAME}: {os.path.join(mgsm.location(), mgsm.EXEMPLARS_FILE)} has no English exemplars")
    exemplars = [{"question": q, "answer": reply, "rationale": ""} for q, reply in english.shots]
    return {"validation": examples, "test": examples, "exemplars": exemplars}


def _location() -> str:
    return os.path.join(sources.data_dir_or_raise(NAME, "the GSM8K test set", PUBLISHED_AT), "gsm8k")


def register() -> None:
    """Records the GSM8K test source and its suite (run by `tasks.register`)."""
    source = sources.LoadedSource(NAME, SPEC, SPLITS, locate=_location, read=read, exemplar_split="exemplars",
                                  fixed_exemplars=True, postprocess_fn=final_number)
    registry.add_source(source, {NAME: "fs_noopt"})
    description = f"GSM8K test, {NUM_SHOTS}-shot chain of thought (Wei et al.'s exemplars)"
    registry.add_suite(Suite(NAME, (NAME,), description, max_decode_length=256))

