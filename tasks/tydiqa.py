"""TyDiQA GoldP (google-research-datasets/tydiqa): held-out extractive QA in 9 languages, 1-shot, direct.

Files: tydiqa-goldp-v1.1-dev.json (needed) and tydiqa-goldp-v1.1-train.json
(for the exemplars), from DOWNLOAD_AT, in the SQuAD 1.1 schema
{"data": [{"paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}, ...]}]}]}]}, the language in each id's
prefix ("finnish-...", LANGUAGES). They are read from $FLAN_JAX_TYDIQA_DIR (a
directory or an http(s) URL, whose files are downloaded once) if set, else
from `<data dir>/tydiqa/`.

Tasks `tydiqa_<lang>` (splits "validation" and, the same rows, "test": GoldP
has no public test set), 1-shot, rendered by the template library
(fs_noopt):

  {exemplar context}\\n\\nQ: {exemplar question}\\nA: {its first answer}\\n\\n{context}\\n\\nQ: {question}\\nA:

The exemplar is the first train example of the same language. Without the
train file, the first dev example of each language is the exemplar and is not
scored; the report's notes say which. Predictions are greedy; scores are
SQuAD exact match ("em", the suite's score) and F1 against every gold answer,
by t5's metric (`t5.evaluation.metrics.squad`). The target is the first gold
answer; `TydiqaSource.postprocess` turns a target into all of its example's
gold answers.

Suite `tydiqa_direct`: the score averages the paper's 8 languages
(PAPER_LANGUAGES); English is evaluated and reported beside it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import t5.evaluation.metrics

from flan_jax.suites import Suite
from flan_jax.errors import UserError
from tasks import files, registry, sources
from tasks.templates import TaskSpec, Template

logger = logging.getLogger(__name__)

DIR_ENV = "FLAN_JAX_TYDIQA_DIR"
DOWNLOAD_AT = "https://storage.googleapis.com/tydiqa/v1.1/"
FILES = {"train": "tydiqa-goldp-v1.1-train.json", "dev": "tydiqa-goldp-v1.1-dev.json"}
LANGUAGES = {"arabic": "ar", "bengali": "bn", "english": "en", "finnish": "fi", "indonesian": "id",
             "korean": "ko", "russian": "ru", "swahili": "sw", "telugu": "te"}
PAPER_LANGUAGES = ("ar", "bn", "fi", "id", "ko", "ru", "sw", "te")
SPLITS = ("validation", "test")
ADVICE = (f"Download {FILES['dev']} and {FILES['train']} from {DOWNLOAD_AT} into <data dir>/tydiqa/, "
          f"or set {DIR_ENV} to the directory or URL that holds them.")
_TEMPLATE = Template("{question}\nA:")
_SEPARATOR = re.compile("\n\n")


def spec(lang: str) -> TaskSpec:
    return TaskSpec(f"tydiqa_{lang}", [_TEMPLATE], num_shots=1, shot_joiner=" ")


def parse_goldp(data: bytes, path: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
    """A GoldP file -> {lang: examples}; an unusable question is skipped and counted, an unusable file is fatal."""
    try:
        articles = json.loads(data)["data"]
        rows = [(f"{path}:data[{i}].paragraphs[{j}].qas[{k}]", (paragraph["context"], qa))
                for i, article in enumerate(articles) for j, paragraph in enumerate(article["paragraphs"])
                for k, qa in enumerate(paragraph["qas"])]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"tydiqa: {path} is not a TyDiQA GoldP file (SQuAD 1.1 JSON: "
                        f"data[].paragraphs[].qas[]): {type(e).__name__}: {e}") from None
    by_language: dict[str, list[sources.Example]] = {}
    for example in sources.parse_rows(rows, parse_qa, stats):
        by_language.setdefault(example["language"], []).append(example)
    return by_language


def parse_qa(row: Any) -> sources.Example:
    """(context, qa) -> {question: "context\\n\\nQ: question", answer: the first gold, golds, language}."""
    context, qa = row
    if not isinstance(qa, dict) or not isinstance(context, str):
        raise sources.MalformedRow("not a SQuAD question object")
    language = LANGUAGES.get(str(qa.get("id", "")).partition("-")[0])
    if language is None:
        raise sources.MalformedRow(f"id {qa.get('id')!r} does not start with a known language ({', '.join(LANGUAGES)})")
    golds = [a["text"].strip() for a in qa.get("answers") or () if isinstance(a, dict) and str(a.get("text", "")).strip()]
    if not golds:
        raise sources.MalformedRow("no answer")
    example = {"question": f"{context.strip()}\n\nQ: {str(qa.get('question', '')).strip()}", "answer": golds[0],
               "rationale": "", "golds": golds, "language": language}
    return sources.require_fields(example)


def location() -> str:
    """$FLAN_JAX_TYDIQA_DIR, else <data dir>/tydiqa."""
    if os.environ.get(DIR_ENV):
        return os.environ[DIR_ENV]
    directory = sources.data_dir()
    if directory is None:
        raise sources.MissingDataError(f"tydiqa: no data directory and no {DIR_ENV} set. {ADVICE}")
    return os.path.join(directory, "tydiqa")


_FILES_CACHE: dict[str, tuple[dict[str, list[sources.Example]], dict[str, list[sources.Example]] | None]] = {}
_EXEMPLARS_NOTE = {"train": f"the first {FILES['train']} example of each language",
                   "dev": f"no {FILES['train']}: the first {FILES['dev']} example of each language is its exemplar "
                          f"and is not scored"}
_last_read = {"exemplars_from": ""}  # Where the last read took the exemplars from, for the report's notes.


def read_files(where: str) -> tuple[dict[str, list[sources.Example]], dict[str, list[sources.Example]] | None]:
    """({lang: dev examples}, {lang: train examples} or None without a train file), read once per location."""
    if where not in _FILES_CACHE:
        stats = sources.stats("tydiqa")
        stats.reset()
        path, data = files.read_data_file("tydiqa", where, FILES["dev"], ADVICE)
        dev = parse_goldp(data, path, stats)
        try:
            path, data = files.read_data_file("tydiqa", where, FILES["train"], ADVICE)
        except sources.MissingDataError:
            logger.warning("tydiqa: no %s in %s, so the first dev example of each language is its exemplar "
                           "(not scored). %s", FILES["train"], where, ADVICE)
            train = None
        else:
            train = parse_goldp(data, path, stats)
        _FILES_CACHE[where] = (dev, train)
    return _FILES_CACHE[where]


def notes() -> dict[str, str]:
    """What the report says about the exemplars of the last evaluation."""
    source = _last_read["exemplars_from"]
    return {"exemplars": _EXEMPLARS_NOTE[source]} if source else {}


class TydiqaSource(sources.LoadedSource):
    """One language of TyDiQA GoldP."""

    def __init__(self, lang: str) -> None:
        super().__init__(f"tydiqa_{lang}", spec(lang), SPLITS, locate=location, read=self._read_files,
                         exemplar_split="exemplars", fixed_exemplars=True, postprocess_fn=self.postprocess,
                         metric_fns=[t5.evaluation.metrics.squad])
        self.lang = lang
        self._golds: dict[str, list[str]] = {}

    def _read_files(self, where: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
        dev, train = read_files(where)
        examples = dev.get(self.lang, [])
        if train is not None:
            exemplars = train.get(self.lang, [])[:1]
        else:
            exemplars, examples = examples[:1], examples[1:]
        _last_read["exemplars_from"] = "train" if train is not None else "dev"
        stats.count_kept(len(examples))
        self._golds = {_TEMPLATE.input.format(**ex): ex["golds"] for ex in examples}
        return {"validation": examples, "test": examples, "exemplars": exemplars}

    def postprocess(self, text: str | bytes, example: Any = None, is_target: bool = False) -> str | list[str]:
        """SeqIO postprocess_fn: a prediction stripped; a target as every gold answer of its example."""
        text = (text.decode("utf-8") if isinstance(text, bytes) else text).strip()
        if not is_target:
            return text
        inputs = example["inputs_pretokenized"] if example is not None else b""
        inputs = inputs.decode("utf-8") if isinstance(inputs, bytes) else inputs
        # The query is the end of the prompt, after the exemplar (if it was kept) and a blank line.
        for start in [0] + [m.end() for m in _SEPARATOR.finditer(inputs)]:
            if inputs[start:] in self._golds:
                return self._golds[inputs[start:]]
        return [text]


def register() -> None:
    names = []
    for lang in sorted(LANGUAGES.values()):
        names += registry.add_source(TydiqaSource(lang), {f"tydiqa_{lang}": "fs_noopt"})
    registry.add_suite(Suite(
        "tydiqa_direct", tuple(names), "TyDiQA GoldP, 9 languages, 1-shot, greedy, SQuAD exact match; the score "
        f"averages the paper's {len(PAPER_LANGUAGES)} (English excluded)",
        split="validation", max_decode_length=64, metric="em",
        scored=tuple(f"tydiqa_{lang}" for lang in PAPER_LANGUAGES),
        averages={"all_languages": tuple(names), "en": ("tydiqa_en",)}, notes=notes, list_tasks=True,
        stops=lambda: ("Q:",),  # A model that goes on past its answer starts the next exemplar's "Q:".
    ))

