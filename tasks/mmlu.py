"""MMLU (hendrycks/test): 57 held-out evaluation subjects, 5-shot direct and chain-of-thought.

Files, under `<data dir>/mmlu/` (see tasks/sources.py):
`{dev,val,test}/<subject>_{dev,val,test}.csv`, no header, rows
`question,A,B,C,D,answer_letter` (fields may be quoted and span lines).
Optional: `mmlu-cot.json`, FLAN's chain-of-thought prompts ({subject: 5-shot
prompt text}, published with the FLAN repository; see COT_PROMPTS_AT).

Direct: tasks `mmlu_{subject}`, splits "validation" (val/) and "test"
(test/); mixture `mmlu` (rate 1 per subject). The prompt is the standard one,
with the subject's five dev rows, in file order, as exemplars:

  The following are multiple choice questions (with answers) about {subject}.

  {question}
  A. {A}
  B. {B}
  C. {C}
  D. {D}
  Answer: {letter}

  ... four more exemplars ..., then the query, ending in "Answer:"

where {subject} is the file's subject with "_" as spaces. The target is the
letter, and the options "A".."D" are the example's `options`, so rank
classification scores the log-likelihood of each letter. The template
library renders it (fs_noopt, the header as prefix), so exemplars are
dropped from the end while the prompt is too long.

Chain of thought: tasks `mmlu_{subject}_cot`, the same splits, mixture
`mmlu_cot`. With `mmlu-cot.json` (the Flan-T5 paper's 5-shot CoT prompts) the
input is the subject's prompt as published, then the query in its layout:

  The following are multiple choice questions (with answers) about {subject}.

  Q: {question}
  (A) {A} (B) {B} (C) {C} (D) {D}
  A: Let's think step by step. {rationale} The answer is (X).

  ... the other exemplars ...

  Q: {question}
  (A) {A} (B) {B} (C) {C} (D) {D}
  A: Let's think step by step.

The prompt is parsed into its header and exemplars (`parse_cot_prompt`) and
rendered by the template library (fs_cot, the header as prefix, answer
phrase "The answer is"), which reproduces the file byte for byte and, when a
prompt is too long, drops whole exemplars from the end; the query is only
cut when it alone is too long. Both are counted (`over_length`,
`truncated`). Without the file the query follows the header alone (zero-shot
chain of thought, which Flan-T5 was also trained on), and a warning says so.
The target is "The answer is (X)."; predictions and targets are reduced to
the letter (`answer_letter`, which also reads "So the answer is (X).").

Rows that cannot be used (not six columns, an empty question, an answer that
is not A-D) are skipped and counted in `sources.stats("mmlu_<subject>")`.

Suites `mmlu_direct` and `mmlu_cot` (test split) are scored as
hendrycks/test's `evaluate_flan.py` (the script behind Flan-T5's MMLU
numbers) scores them: the score is the accuracy over all questions (so
professional_law, 11% of validation, weighs 11%), and so are the four
categories of the MMLU paper (CATEGORIES); the macro average over subjects is
listed beside. MMLU-Direct's default method is `choice`: the letter A-D whose
first token has the highest logit at the first decoding step, so the model
never "answers" anything else (`--method=generate` or `rank` on request).
MMLU-CoT is generated until EOS or a new "Q:", up to COT_DECODE_LENGTH
tokens, and the answer is the letter after the last "The answer is".
Row counts of the data in ../shared/data: 285 dev, 1,542 val, 14,079 test
(the 2020-09-08 release; the later official one is said to have 14,042
test rows).
"""

from __future__ import annotations

import json
import logging
import os
import re

from flan_jax.suites import Suite
from flan_jax.errors import UserError
from tasks import files, registry, sources
from tasks.templates import COT_TRIGGER, TaskSpec, Template

logger = logging.getLogger(__name__)

MIXTURE = "mmlu"
COT_MIXTURE = "mmlu_cot"
PUBLISHED_AT = "https://github.com/hendrycks/test (data.tar: dev/, val/, test/)"
COT_PROMPTS_FILE = "mmlu-cot.json"
COT_PROMPTS_AT = "https://github.com/jasonwei20/flan-2/blob/main/mmlu-cot.json (FLAN's MMLU CoT prompts)"
NUM_SHOTS = 5
COT_ANSWER_PHRASE = "The answer is"  # mmlu-cot.json's exemplars end "The answer is (X)."
# Tokens decoded for a CoT answer: the longest mmlu-cot.json exemplar target is 915 tokens of the default
# vocabulary (econometrics; tests/test_heldout.py checks that every exemplar fits).
COT_DECODE_LENGTH = 1024
LETTERS = ("A", "B", "C", "D")
SPLIT_DIRS = {"dev": "dev", "validation": "val", "test": "test"}
SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
    "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
    "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
    "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
    "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
    "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology", "world_religions",
)

# The four categories of the MMLU paper, by subject (hendrycks/test's categories).
_STEM = (
    "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
    "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
)
_HUMANITIES = (
    "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
    "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
    "prehistory", "professional_law", "world_religions",
)
_SOCIAL_SCIENCES = (
    "econometrics", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_microeconomics", "high_school_psychology", "human_sexuality", "professional_psychology",
    "public_relations", "security_studies", "sociology", "us_foreign_policy",
)
CATEGORIES = {
    subject: ("STEM" if subject in _STEM else "humanities" if subject in _HUMANITIES
              else "social sciences" if subject in _SOCIAL_SCIENCES else "other")
    for subject in SUBJECTS
}
_ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-D])\)?")
_LEADING_LETTER = re.compile(r"\s*\(?([A-D])\)?(?=[\s.:)]|$)")


def spec(subject: str) -> TaskSpec:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return TaskSpec(f"mmlu_{subject}", [Template("{question}\nAnswer:")], num_shots=NUM_SHOTS,
                    prefix=header, shot_joiner=" ")


def answer_letter(text: str | bytes, example: object = None, is_target: bool = False) -> str:
    """SeqIO postprocess_fn: the answer letter of a prediction or target.

    The last "answer is (X)" if there is one (chain of thought, "So the answer
    is (B)."), else a letter at the start ("B", "(B)", "B. 42"), else the text.
    """
    del example, is_target
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    found = _ANSWER_IS.findall(text)
    if found:
        return found[-1]
    leading = _LEADING_LETTER.match(text)
    return leading.group(1) if leading else text.strip()


def parse_row(row: sources.Row) -> sources.Example:
    """question,A,B,C,D,letter -> {question (with the lettered choices), answer (the letter), options}."""
    if len(row) != 6:
        raise sources.MalformedRow(f"expected 6 columns, found {len(row)}")
    question, *choices, answer = row
    answer = answer.strip()
    if answer not in LETTERS:
        raise sources.MalformedRow(f"answer {answer!r} is not one of {'/'.join(LETTERS)}")
    if not question.strip():
        raise sources.MalformedRow("empty question")
    lines = [question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)]
    return {"question": "\n".join(lines), "answer": answer, "rationale": "", "options": list(LETTERS),
            "stem": question, "choices": choices}


def as_cot(example: sources.Example) -> sources.Example:
    """The CoT layout of a parsed row: "(A) .. (B) .." after the question; the answer "(X)"."""
    choices = " ".join(f"({letter}) {choice}" for letter, choice in zip(LETTERS, example["choices"]))
    return {"question": f"{example['stem']}\n{choices}", "answer": f"({example['answer']})", "rationale": ""}


def read(subject: str, location: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
    """Reads a subject's dev (few-shot pool), val and test files."""
    splits = {}
    for split, directory in SPLIT_DIRS.items():
        path, data = files.read_data_file(f"mmlu_{subject}", location, f"{directory}/{subject}_{directory}.csv",
                                            sources.get_it_from(PUBLISHED_AT))
        splits[split] = sources.parse_file(data, path, "csv", parse_row, stats)
    return splits


def source(subject: str) -> sources.LoadedSource:
    return sources.LoadedSource(
        f"mmlu_{subject}", spec(subject), ("validation", "test"),
        locate=_location,
        read=lambda location, stats: read(subject, location, stats),
        exemplar_split="dev", fixed_exemplars=True, postprocess_fn=answer_letter,
    )


_COT_ANSWER = re.compile(r" The answer is (\([A-Z]\))\.$")


def parse_cot_prompt(text: str, path: str = "<prompt>") -> tuple[str, list[sources.Example]]:
    """Splits one subject's mmlu-cot.json prompt into (header, exemplars).

    Each exemplar has question (with its "(A) .. (D) .." line), rationale and
    answer ("(X)"), so that rendering it as fs_cot gives the text back exactly.
    """
    header, *blocks = text.strip().split("\n\nQ: ")
    exemplars = []
    for block in blocks:
        question, marker, reply = block.partition(f"\nA: {COT_TRIGGER} ")
        answer = _COT_ANSWER.search(reply)
        if not marker or not answer:
            raise sources.MalformedRow(f"{path}: exemplar {question[:40]!r} is not laid out as "
                                       f"'Q: ...\\nA: {COT_TRIGGER} ... The answer is (X).'")
        exemplars.append({"question": question, "rationale": reply[:answer.start()], "answer": answer.group(1)})
    if not exemplars:
        raise sources.MalformedRow(f"{path}: no 'Q: ... A: ...' exemplar after the header")
    return header, exemplars


def cot_spec(subject: str, header: str | None = None) -> TaskSpec:
    """fs_cot after the published prompt's header (or, without one, the standard header)."""
    header = header or f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
    return TaskSpec(f"mmlu_{subject}_cot", [Template("Q: {question}\nA:")], num_shots=NUM_SHOTS, prefix=header + "\n\n",
                    shot_joiner=" ", cot_separator=" ", answer_phrase=COT_ANSWER_PHRASE)


class CotSource(sources.LoadedSource):
    """One subject in FLAN's chain-of-thought layout; its exemplars come from mmlu-cot.json when present."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"mmlu_{subject}_cot", cot_spec(subject), ("validation", "test"), locate=_location,
                         read=self._read_files, exemplar_split="prompt", fixed_exemplars=True,
                         postprocess_fn=answer_letter)
        self.subject = subject

    def _read_files(self, location: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
        path, prompt = _cot_prompts(location)
        exemplars: list[sources.Example] = []
        if prompt is not None and self.subject in prompt:
            try:
                header, exemplars = parse_cot_prompt(prompt[self.subject], f"{path}[{self.subject!r}]")
            except sources.MalformedRow as e:
                # Without its prompt the subject cannot be evaluated as published: stop.
                raise UserError(f"{self.name}: unusable prompt: {e}") from None
            self.spec = cot_spec(self.subject, header)
        splits = read(self.subject, location, stats)
        return {**{split: [as_cot(ex) for ex in examples] for split, examples in splits.items()}, "prompt": exemplars}


_PROMPTS_CACHE: dict[str, tuple[str, dict[str, str] | None]] = {}


def _cot_prompts(location: str) -> tuple[str, dict[str, str] | None]:
    """(path, {subject: prompt}) of `location/mmlu-cot.json`; None (with a warning) when it is not there."""
    if location not in _PROMPTS_CACHE:
        try:
            path, data = files.read_data_file("mmlu_cot", location, COT_PROMPTS_FILE, "")
        except sources.MissingDataError:
            logger.warning("mmlu_cot: no %s in %s, so chain of thought is zero-shot. For FLAN's 5-shot CoT "
                           "prompts get it from %s.", COT_PROMPTS_FILE, location, COT_PROMPTS_AT)
            _PROMPTS_CACHE[location] = (os.path.join(location, COT_PROMPTS_FILE), None)
        else:
            try:
                prompts = json.loads(data)
                if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
                    raise ValueError("expected a JSON object of {subject: prompt text}")
            except ValueError as e:
                raise UserError(f"mmlu_cot: {path} is not FLAN's mmlu-cot.json: {e}") from None
            _PROMPTS_CACHE[location] = (path, prompts)
    return _PROMPTS_CACHE[location]


def chance(inputs: str, target: str) -> float:
    """Four options: a random letter is right a quarter of the time."""
    del inputs, target
    return 1.0 / len(LETTERS)


def _location() -> str:
    return os.path.join(sources.data_dir_or_raise("mmlu", "the MMLU csv files", PUBLISHED_AT), "mmlu")


def register() -> None:
    """Records the MMLU sources, their mixtures and the suites mmlu_direct and mmlu_cot (run by `tasks.register`)."""
    direct, cot = [], []
    for subject in SUBJECTS:
        direct += registry.add_source(source(subject), {f"mmlu_{subject}": "fs_noopt"})
        cot += registry.add_source(CotSource(subject), {f"mmlu_{subject}_cot": "fs_cot"})
    registry.add_mixture(MIXTURE, [(name, 1.0) for name in direct])
    registry.add_mixture(COT_MIXTURE, [(name, 1.0) for name in cot])
    for name, tasks, decode_length, method, description in (
        ("mmlu_direct", direct, 8, "choice", "MMLU, 57 subjects, 5-shot, answer letter"),
        ("mmlu_cot", cot, COT_DECODE_LENGTH, "generate",
         f"MMLU, 57 subjects, chain of thought (5-shot with {COT_PROMPTS_FILE}, else 0-shot)"),
    ):
        registry.add_suite(Suite(
            name, tuple(tasks), description, max_decode_length=decode_length, method=method, average="examples",
            categories={task: CATEGORIES[subject] for task, subject in zip(tasks, SUBJECTS)}, chance=chance,
            stops=_stops if method == "generate" else tuple,
        ))


def _stops() -> tuple[str, ...]:
    """A chain-of-thought answer is done when the model starts a new "Q:" (its exemplars' layout)."""
    return ("Q:",)

