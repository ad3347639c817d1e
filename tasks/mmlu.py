"""MMLU (hendrycks/test): 57 held-out evaluation subjects, 5-shot, answer by letter.

Files, under `<data dir>/mmlu/` (see tasks/sources.py):
`{dev,val,test}/<subject>_{dev,val,test}.csv`, no header, rows
`question,A,B,C,D,answer_letter` (fields may be quoted and span lines).

Tasks `mmlu_{subject}`, splits "validation" (val/) and "test" (test/);
mixture `mmlu` (rate 1 per subject). The prompt is the standard one, with the
subject's five dev rows, in file order, as exemplars:

  The following are multiple choice questions (with answers) about {subject}.

  {question}
  A. {A}
  B. {B}
  C. {C}
  D. {D}
  Answer: {letter}

  ... four more exemplars ..., then the query, ending in "Answer:"

where {subject} is the file's subject with "_" as spaces. The target is the
letter. The template library renders it (fs_noopt, the header as prefix),
so exemplars are dropped from the end while the prompt is too long. Rows
that cannot be used (not six columns, an empty question, an answer that is
not A-D) are skipped and counted in `sources.stats("mmlu_<subject>")`.

Row counts of the data in ../shared/data: 285 dev, 1,542 val, 14,079 test
(the 2020-09-08 release; the later official one is said to have 14,042
test rows).
"""

from __future__ import annotations

import os

from tasks import registry, sources
from tasks.templates import TaskSpec, Template

MIXTURE = "mmlu"
PUBLISHED_AT = "https://github.com/hendrycks/test (data.tar: dev/, val/, test/)"
NUM_SHOTS = 5
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


def spec(subject: str) -> TaskSpec:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return TaskSpec(f"mmlu_{subject}", [Template("{question}\nAnswer:")], num_shots=NUM_SHOTS,
                    prefix=header, shot_joiner=" ")


def parse_row(row: sources.Row) -> sources.Example:
    """question,A,B,C,D,letter -> {question (with the lettered choices), answer (the letter)}."""
    if len(row) != 6:
        raise sources.MalformedRow(f"expected 6 columns, found {len(row)}")
    question, *choices, answer = row
    answer = answer.strip()
    if answer not in LETTERS:
        raise sources.MalformedRow(f"answer {answer!r} is not one of {'/'.join(LETTERS)}")
    if not question.strip():
        raise sources.MalformedRow("empty question")
    lines = [question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)]
    return {"question": "\n".join(lines), "answer": answer, "rationale": ""}


def read(subject: str, location: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
    """Reads a subject's dev (few-shot pool), val and test files."""
    splits = {}
    for split, directory in SPLIT_DIRS.items():
        path, data = sources.read_data_file(f"mmlu_{subject}", location, f"{directory}/{subject}_{directory}.csv",
                                            sources.get_it_from(PUBLISHED_AT))
        splits[split] = sources.parse_file(data, path, "csv", parse_row, stats)
    return splits


def source(subject: str) -> sources.LoadedSource:
    return sources.LoadedSource(
        f"mmlu_{subject}", spec(subject), ("validation", "test"),
        locate=_location,
        read=lambda location, stats: read(subject, location, stats),
        exemplar_split="dev", fixed_exemplars=True,
    )


def _location() -> str:
    return os.path.join(sources.data_dir_or_raise("mmlu", "the MMLU csv files", PUBLISHED_AT), "mmlu")


def _register() -> None:
    names = []
    for subject in SUBJECTS:
        names += registry.add_source(source(subject), {f"mmlu_{subject}": "fs_noopt"})
    registry.add_mixture(MIXTURE, [(name, 1.0) for name in names])


_register()
