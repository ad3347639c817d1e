"""GSM8K test set (openai/grade-school-math): held-out few-shot chain-of-thought evaluation.

File: `<data dir>/gsm8k/test.jsonl`, one `{"question", "answer"}` per line;
the answer is a worked solution with calculator annotations `<<48/2=24>>` and
a last line `#### 72`. The example's answer is the number after "####"
(commas removed), its rationale the solution with the annotations removed.

Task `gsm8k_cot` (split "test"; also registered as "validation" so training
can evaluate on it), suite `gsm8k_cot`. The prompt is 8-shot chain of thought
in the BBH layout:

  Q: {question}
  A: Let's think step by step. {rationale} So the answer is {answer}.

with the first NUM_SHOTS train rows of the Flan CoT file `gsm8k_train.tsv`
(tasks/flan_cot.py) as the fixed exemplars, then the query ending in
"A: Let's think step by step.". Exemplars are dropped from the end while the
prompt is too long. Predictions and targets are reduced to one normalized
number (`final_number`), compared by exact match.
"""

from __future__ import annotations

import os
import re

from flan_jax import evaluation
from tasks import flan_cot, registry, sources
from tasks.templates import TaskSpec, Template

NAME = "gsm8k_cot"
PUBLISHED_AT = "https://github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)"
NUM_SHOTS = 8
SPLITS = ("validation", "test")
SPEC = TaskSpec(NAME, [Template("Q: {question}\nA:")], num_shots=NUM_SHOTS, shot_joiner=" ", cot_separator=" ")
_ANNOTATION = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)


def final_number(text: str | bytes, example: object = None, is_target: bool = False) -> str:
    """SeqIO postprocess_fn: the answer as a plain number ("$1,234.50." -> "1234.5").

    The first number after the last "answer is", else the last number in the
    text; commas, currency, units and trailing periods go, as do trailing
    zeros after a decimal point. Text without a number is returned stripped.
    """
    del example, is_target
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    phrases = list(_ANSWER_IS.finditer(text))
    after = _NUMBER.findall(text[phrases[-1].end():]) if phrases else []
    numbers = after[:1] or _NUMBER.findall(text)[-1:]
    if not numbers:
        return text.strip()
    number = numbers[0].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return "0" if number in ("-0", "") else number


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
    path, data = sources.read_data_file(NAME, location, "test.jsonl", sources.get_it_from(PUBLISHED_AT))
    examples = sources.parse_file(data, path, "jsonl", parse_row, stats)
    # The exemplars: the first train rows of the Flan CoT file, as flan_cot reads them.
    pool = registry.get_source(f"{flan_cot.MIXTURE}_gsm8k").load()["train"][:NUM_SHOTS]
    return {"validation": examples, "test": examples, "exemplars": [dict(ex) for ex in pool]}


def _location() -> str:
    return os.path.join(sources.data_dir_or_raise(NAME, "the GSM8K test set", PUBLISHED_AT), "gsm8k")


def register() -> None:
    """Records the GSM8K test source and its suite (run by `tasks.register`)."""
    source = sources.LoadedSource(NAME, SPEC, SPLITS, locate=_location, read=read, exemplar_split="exemplars",
                                  fixed_exemplars=True, postprocess_fn=final_number)
    registry.add_source(source, {NAME: "fs_cot"})
    registry.add_suite(evaluation.Suite(NAME, (NAME,), f"GSM8K test, {NUM_SHOTS}-shot chain of thought",
                                        max_decode_length=256))

