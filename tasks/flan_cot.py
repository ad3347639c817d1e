"""The Flan chain-of-thought training sets (FLAN repo, flan/v2/cot_data/), as SeqIO tasks.

Files: `<location>/<dataset>_train.tsv`, one example per line,
`question<TAB>answer<TAB>rationale`, line breaks inside a field written as
the two characters `\\n`. The location is the gin binding
`flan_cot_location.location` (a directory, gs://..., or an http(s) URL whose
files are downloaded once into the cache), else `<data dir>/flan_cot` (see
tasks/sources.py).

Tasks `flan_cot_{dataset}_{variant}` for the datasets below and each variant
of their spec (tasks/templates.py). Splits: "train" and "validation", the
latter held out from the file by a hash of the question (2% of the rows;
`sources.hold_out`). Mixture `flan_cot`: every task's train split, each
dataset weighted by its number of train rows, split evenly over its variants.

Options. A multiple-choice question carries its options after a line
`Options:`. They are parsed into the example's `options` list and removed
from the question, so *_noopt variants show the bare question and *_opt
variants list the options the template library's way. Answers are made one
of the options, verbatim, so exact match compares like with like:

  aqua, qasc   options are lettered, "(C) 1120": the letters are removed from
               the options, and the answer "(C)" becomes the option's text,
               "1120". A letter means nothing without the options; the text
               answers every variant.
  sensemaking  the answer "Sentence A" becomes the option it names,
               'Sentence A: "He poured orange juice on his cereal."'. The
               question asks which sentence makes no sense, so it has only
               the variants that list the options (options_required).
  creak        yes/no; the rows without an Options block get ["yes", "no"].
  ecqa         the answer is an option's text already; repeated options are
               listed once.
  gsm8k, strategyqa  not multiple choice (number, yes/no).

Rows that cannot be used (not three columns, an empty field, an answer that
is none of the options, bytes that are not UTF-8) are skipped and counted in
`sources.stats("flan_cot_<dataset>")`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Sequence

import gin

from tasks import files, registry, sources
from tasks.templates import TaskSpec, Template

MIXTURE = "flan_cot"
PUBLISHED_AT = "https://github.com/google-research/FLAN/tree/main/flan/v2/cot_data"
OPTIONS_MARKER = "\nOptions:\n"
_LETTERED = re.compile(r"\(([A-Z])\)\s*(.*)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One CoT file and how to read it."""

    name: str
    templates: tuple[Template, ...]
    multiple_choice: bool = False
    options_required: bool = False
    default_options: tuple[str, ...] = ()  # For rows of a multiple-choice file without an Options block.

    @property
    def file_name(self) -> str:
        return f"{self.name}_train.tsv"

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec(
            f"flan_cot_{self.name}", self.templates,
            multiple_choice=self.multiple_choice, options_required=self.options_required,
        )


DATASETS = (
    Dataset("aqua", (
        Template("{question}"),
        Template("Solve this math problem.\n{question}"),
        Template("Question: {question}"),
    ), multiple_choice=True),
    Dataset("creak", (
        Template("{question}"),
        Template("Use common sense to answer.\n{question}"),
    ), multiple_choice=True, default_options=("yes", "no")),
    Dataset("ecqa", (
        Template("{question}"),
        Template("Answer this commonsense question.\n{question}"),
        Template("Q: {question}"),
    ), multiple_choice=True),
    Dataset("gsm8k", (
        Template("{question}"),
        Template("Solve this word problem.\n{question}"),
        Template("Q: {question}"),
    )),
    Dataset("qasc", (
        Template("{question}"),
        Template("Answer this science question.\n{question}"),
    ), multiple_choice=True),
    Dataset("sensemaking", (
        Template("{question}"),
        Template("Use common sense.\n{question}"),
    ), multiple_choice=True, options_required=True),
    Dataset("strategyqa", (
        Template("{question}"),
        Template("Answer yes or no.\n{question}"),
        Template("Q: {question}"),
    )),
)


@gin.configurable
def flan_cot_location(location: str | None = None) -> str | None:
    """Where the TSV files are: the gin-bound `location` (directory or URL), else <data dir>/flan_cot."""
    directory = sources.data_dir()
    return location or (os.path.join(directory, "flan_cot") if directory else None)


def _locate() -> str:
    location = flan_cot_location()
    if location is None:  # Raised here, outside the configurable, so gin adds nothing to the message.
        raise sources.no_data_dir_error("flan_cot", "the Flan CoT TSV files", PUBLISHED_AT)
    return location


def split_options(question: str) -> tuple[str, list[str]]:
    """Splits "question\\nOptions:\\n- a\\n- b" into the question and ["a", "b"] (bullets removed)."""
    question, marker, block = question.partition(OPTIONS_MARKER)
    if not marker:
        return question.strip(), []
    options = [line.strip() for line in block.split("\n")]
    options = [line[2:].strip() if line.startswith("- ") else line for line in options if line]
    return question.strip(), options


def resolve_answer(answer: str, options: Sequence[str]) -> tuple[str, list[str]]:
    """Makes the answer one of the options, verbatim (see the module docstring); returns (answer, options).

    Raises MalformedRow if the answer names none of them.
    """
    options = list(dict.fromkeys(options))  # Repeated options are listed once.
    lettered = [_LETTERED.fullmatch(option) for option in options]
    if options and all(lettered):
        by_letter = {m.group(1): m.group(2).strip() for m in lettered}
        options = list(dict.fromkeys(by_letter.values()))
        letter = _LETTERED.fullmatch(answer) or re.fullmatch(r"([A-Z])", answer)
        if letter and letter.group(1) in by_letter:
            return by_letter[letter.group(1)], options
    if answer in options:
        return answer, options
    named = [option for option in options if option.startswith(answer + ":")]
    if len(named) == 1:
        return named[0], options
    raise sources.MalformedRow(f"answer {answer!r} is none of the options {options}")


def parse_row(row: sources.Row, dataset: Dataset) -> sources.Example:
    """One TSV row -> {question, answer, rationale[, options]}; raises MalformedRow."""
    if len(row) != 3:
        raise sources.MalformedRow(f"expected 3 tab-separated columns, found {len(row)}")
    question, answer, rationale = (cell.replace("\\n", "\n").strip() for cell in row)
    example = sources.require_fields({"question": question, "answer": answer, "rationale": rationale},
                                     ("question", "answer", "rationale"))
    if not dataset.multiple_choice:
        return example
    question, options = split_options(question)
    if not options:
        options = list(dataset.default_options)
    if not options:
        raise sources.MalformedRow("no Options block")
    answer, options = resolve_answer(answer, options)
    return sources.require_fields({**example, "question": question, "answer": answer, "options": options})


def read(dataset: Dataset, location: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
    """Reads one dataset's file from `location`; returns its train and validation splits."""
    path, data = files.read_data_file(dataset.spec.name, location, dataset.file_name,
                                        sources.get_it_from(PUBLISHED_AT))
    examples = sources.parse_file(data, path, "tsv", lambda row: parse_row(row, dataset), stats)
    return sources.hold_out(examples)


def source(dataset: Dataset) -> sources.LoadedSource:
    return sources.LoadedSource(
        f"flan_cot_{dataset.name}", dataset.spec, ("train", "validation"),
        locate=_locate,
        read=lambda location, stats: read(dataset, location, stats),
    )


def task_name(dataset: str, variant: str) -> str:
    return f"flan_cot_{dataset}_{variant}"


def _rate(source: sources.LoadedSource, num_variants: int, task: object) -> float:
    """A task's mixture rate: its file's train rows, shared by the dataset's variants."""
    del task
    return source.split_size("train") / num_variants


def register() -> None:
    """Records the Flan CoT sources, every variant, and the mixture `flan_cot` (run by `tasks.register`)."""
    mixture = []
    for dataset in DATASETS:
        src = source(dataset)
        variants = dataset.spec.variants
        names = registry.add_source(src, {task_name(dataset.name, v): v for v in variants})
        # A function, not a number: the row count is known only once the file is read.
        mixture += [(name, functools.partial(_rate, src, len(variants))) for name in names]
    registry.add_mixture(MIXTURE, mixture)

