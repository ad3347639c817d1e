"""MGSM (google-research/url-nlp): 250 GSM8K test problems in 11 languages, 8-shot chain of thought.

Files, under `<data dir>/mgsm/` (see tasks/sources.py):
  mgsm_<lang>.tsv  250 rows "question<TAB>numeric answer", no header
  exemplars.py     the published native-language exemplars, as Python literals:
                   MGSM_EXEMPLARS = {lang: {"1": {"q": "Question: ...",
                   "a": "Step-by-Step Answer: ... The answer is 11."}, ..., "8": ...}}
exemplars.py is read with `ast.literal_eval` on its assignments, never
imported or executed (`read_literals`).

Tasks `mgsm_<lang>` for the 11 languages (splits "test" and, the same rows,
"validation"). The prompt is each language's eight exemplars as published,
then the query in their layout:

  {q_1}\\n{a_1}\\n\\n ... {q_8}\\n{a_8}\\n\\n{question prefix}{question}\\n{answer label}

where the question prefix ("Question: ", "問題：") and the answer label
("Step-by-Step Answer:") are the ones the language's exemplars start with,
and the exemplars' replies follow the label after a space (none in ja and zh).
It is rendered by the template library (fs_noopt), so an over-long prompt
drops exemplars from the end. The target is the number.

Answers are compared as numbers (`final_number`): the first number after the
last answer phrase of any language ("The answer is", "Die Antwort lautet",
"答えは", "উত্তর হল", ...; ANSWER_PHRASES), else the last number of the text;
digits of any script are read as ASCII digits. A prediction is read only up
to the first new question: a model that goes on past its answer invents the
next exemplar, which starts with some language's question prefix
(`stop_prefixes`: "Question:", "Frage:", "問題：", ...; decoding can stop
there too). Numbers are read as the prediction's language writes them
(NUMBER_FORMATS):

  language          thousands separator               decimal mark
  en ja sw th zh    ","   "1,500"                     "."   "2.5"
  bn te             ","   "1,500", lakhs "1,50,000"   "."   "2.5"
  de                "."   "70.000"                    ","   "2,5"
  es                "." or " "   "70.000", "50 000"   ","   "2,5"
  fr ru             " "   "1 500"                     ","   "2,5"

Where "," is the decimal mark, "." is one too unless it groups thousands,
which takes exactly three digits after it: "1.5" in de and "0.30" in es
are decimals, "1.500" is 1500 in de and 1.5 in fr. In the other languages
"2,5" is 2.

The table is what MGSM's own questions write (its exemplars have no number
over 1,000): "50.000" and "1,50" in de; "50 000", "1,50" and once "0.30" in
es; "50 000" and "1,50" in fr and ru; "50,000" and "1.50" elsewhere. It is
also each language's convention: Spain writes "70.000" as well, India (bn,
te) groups lakhs. Every language also takes a no-break space
("1\\u00a0500", "1\\u202f500") as a thousands separator: it is the SI style,
what typesetting puts in fr and ru numbers, and it never stands between
two separate numbers. Targets are the data files' numbers, which every
language's file writes in English ("2,125"), so they are read as English.

Suite `mgsm_cot`: the score is the macro average over the ten translated
languages (the benchmark proper); the average over all 11 and English (their
source) are reported beside it, as `averages` "all_languages" and "en".
tasks/gsm8k.py reads GSM8K's answers with `final_number` too (in English).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from flan_jax import evaluation
from flan_jax.suites import Suite
from flan_jax.errors import UserError
from tasks import files, registry, sources
from tasks.templates import TaskSpec, Template

PUBLISHED_AT = "https://github.com/google-research/url-nlp (mgsm/)"
EXEMPLARS_FILE = "exemplars.py"
LANGUAGES = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
TRANSLATED = tuple(lang for lang in LANGUAGES if lang != "en")
NUM_SHOTS = 8
SPLITS = ("validation", "test")
# Tokens decoded per answer: the longest published exemplar reply is 701 tokens of the default vocabulary
# (te; byte fallback spells Telugu and Thai out byte by byte). tests/test_evaluation.py checks.
DECODE_LENGTH = 768
# The phrase before the final number in each language's published exemplars.
ANSWER_PHRASES = {
    "bn": ("উত্তর হল",), "de": ("Die Antwort ist", "Die Antwort lautet"), "en": ("The answer is",),
    "es": ("La respuesta es",), "fr": ("La réponse est",), "ja": ("答えは",), "ru": ("Ответ —",),
    "sw": ("Jibu ni",), "te": ("సమాధానం",), "th": ("คำตอบคือ",), "zh": ("答案是",),
}
# Any language's phrase (a model may answer in another language); "answer is" also covers "So the answer is".
_ANSWER_PHRASE = re.compile("|".join(re.escape(p) for ps in ANSWER_PHRASES.values() for p in ps) + "|answer is",
                            re.IGNORECASE)
_NO_BREAK_SPACES = "\u00a0\u202f"
# {lang: (thousands separators, decimal marks)}; see the module docstring for why.
NUMBER_FORMATS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("bn", "en", "ja", "sw", "te", "th", "zh"), ("," + _NO_BREAK_SPACES, ".")),
    "de": ("." + _NO_BREAK_SPACES, ",."), "es": (". " + _NO_BREAK_SPACES, ",."),
    "fr": (" " + _NO_BREAK_SPACES, ",."), "ru": (" " + _NO_BREAK_SPACES, ",."),
}


def _number_pattern(thousands: str, decimals: str) -> re.Pattern[str]:
    """A number written with these marks; \\d is any script's digit."""
    # "1,50,000": lakh groups before the last three digits, where commas group.
    lakhs = r"(?:,\d\d)*" if "," in thousands else ""
    # A group is exactly three digits, so a mark before fewer or more ("1.5", "2,50") is the decimal one.
    groups = rf"(?:{lakhs}[{re.escape(thousands)}]\d{{3}}(?!\d))*"
    # "-" is a sign only where it cannot be a minus between numbers ("20-12").
    return re.compile(rf"(?P<sign>(?<![\w.])-)?(?P<int>\d+{groups})(?:[{re.escape(decimals)}](?P<frac>\d+))?")


_NUMBERS = {lang: _number_pattern(*marks) for lang, marks in NUMBER_FORMATS.items()}
_LABEL = re.compile(r"[^:：\n]*[:：]")  # "Question:", "Question :", "問題：".


def final_number(text: str | bytes, example: object = None, is_target: bool = False, *, lang: str = "en",
                 stops: Sequence[str] = ()) -> str:
    """SeqIO postprocess_fn: the answer as a plain number ("$1,234.50." -> "1234.5", "答えは１１です" -> "11").

    The first number after the last answer phrase, else the last number in the
    text, written as `lang` writes numbers (NUMBER_FORMATS); only the text
    before the first of `stops` (question prefixes) is read. Text without a
    number is returned stripped.
    """
    del example, is_target
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    text = evaluation.cut_at_stop(text, evaluation.stop_pattern(stops))[0]
    number_re = _NUMBERS[lang]
    phrases = list(_ANSWER_PHRASE.finditer(text))
    after = number_re.search(text, phrases[-1].end()) if phrases else None
    found = after or next(reversed(list(number_re.finditer(text))), None)
    if found is None:
        return text.strip()
    whole, frac = _ascii_digits(found["int"]).lstrip("0") or "0", _ascii_digits(found["frac"] or "").rstrip("0")
    number = whole + ("." + frac if frac else "")
    return "-" + number if found["sign"] and number != "0" else number


def _ascii_digits(text: str) -> str:
    """The digits of `text`, of any script, as ASCII ("1.500" -> "1500", "১১" -> "11")."""
    return "".join(str(unicodedata.decimal(c)) for c in text if c.isdecimal())


# --- the exemplars file ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Exemplars:
    """One language's published exemplars, split into their fixed labels and their text."""

    question_prefix: str  # "Question: "
    answer_label: str  # "Step-by-Step Answer:"
    joiner: str  # between the label and the reply: " ", or "" (ja, zh)
    shots: tuple[tuple[str, str], ...]  # (question, reply) without the labels


def read_literals(data: bytes, path: str) -> dict[str, Any]:
    """The top-level `NAME = literal` assignments of a Python file, without running it."""
    try:
        tree = ast.parse(data.decode("utf-8"), path)
        return {target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                for target in node.targets if isinstance(target, ast.Name)}
    except (SyntaxError, ValueError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a file of Python literals ({type(e).__name__}: {e})") from None


def parse_exemplars(table: Any, path: str) -> dict[str, Exemplars]:
    """MGSM_EXEMPLARS ({lang: {"1": {"q", "a"}, ...}}) -> {lang: Exemplars}; UserError naming the file if malformed."""
    try:
        return {lang: _language_exemplars([(shots[k]["q"], shots[k]["a"]) for k in sorted(shots, key=int)])
                for lang, shots in table.items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: MGSM_EXEMPLARS is not {{lang: {{'1': {{'q': ..., 'a': ...}}, ...}}}} "
                        f"with labelled questions and answers ({type(e).__name__}: {e})") from None


def _language_exemplars(pairs: list[tuple[str, str]]) -> Exemplars:
    """Checks that one language's exemplars share their labels; raises ValueError otherwise."""
    if not pairs:
        raise ValueError("a language without exemplars")
    labels = set()
    for question, reply in pairs:
        q_label, a_label = _LABEL.match(question), _LABEL.match(reply)
        if not q_label or not a_label:
            raise ValueError(f"exemplar {question[:30]!r} has no 'Label:' before its question or answer")
        q_prefix = question[: q_label.end() + question[q_label.end():].startswith(" ")]
        joiner = " " if reply[a_label.end():].startswith(" ") else ""
        labels.add((q_prefix, a_label.group(0), joiner))
    if len(labels) != 1:
        raise ValueError(f"exemplars labelled differently: {sorted(labels)}")
    q_prefix, a_label, joiner = labels.pop()
    shots = tuple((q[len(q_prefix):], a[len(a_label) + len(joiner):]) for q, a in pairs)
    return Exemplars(q_prefix, a_label, joiner, shots)


_EXEMPLARS_CACHE: dict[str, dict[str, Exemplars]] = {}


def read_exemplars(source: str, location: str) -> dict[str, Exemplars]:
    """{lang: Exemplars} of `location/exemplars.py` (read once per location)."""
    if location not in _EXEMPLARS_CACHE:
        path, data = files.read_data_file(source, location, EXEMPLARS_FILE, sources.get_it_from(PUBLISHED_AT))
        literals = read_literals(data, path)
        if "MGSM_EXEMPLARS" not in literals:
            raise UserError(f"{path}: no MGSM_EXEMPLARS assignment")
        _EXEMPLARS_CACHE[location] = parse_exemplars(literals["MGSM_EXEMPLARS"], path)
    return _EXEMPLARS_CACHE[location]


def stop_prefixes(location: str) -> tuple[str, ...]:
    """Every language's question prefix in `location`'s exemplars, stripped ("Question:", "Frage:", "問題：", ...).

    A model that writes one has begun a new problem of its own: decoding can
    stop there, and a prediction is read only up to it (`final_number`).
    """
    return tuple(dict.fromkeys(ex.question_prefix.strip() for ex in read_exemplars("mgsm_cot", location).values()))


# --- tasks -----------------------------------------------------------------------------


def spec(lang: str, exemplars: Exemplars | None = None) -> TaskSpec:
    """The query's layout is its exemplars': question, newline, answer label (then the reply)."""
    label = exemplars.answer_label if exemplars else "Step-by-Step Answer:"
    return TaskSpec(f"mgsm_{lang}", [Template("{question}\n" + label.replace("{", "{{").replace("}", "}}"))],
                    num_shots=NUM_SHOTS, shot_joiner=exemplars.joiner if exemplars else " ")


def parse_row(row: sources.Row) -> sources.Example:
    """question<TAB>number -> {question, answer}."""
    if len(row) != 2:
        raise sources.MalformedRow(f"expected 2 tab-separated columns, found {len(row)}")
    example = {"question": row[0].strip(), "answer": row[1].strip(), "rationale": ""}
    return sources.require_fields(example)


class MgsmSource(sources.LoadedSource):
    """One MGSM language. Its layout comes from the exemplars file, so its spec is set when that is read."""

    def __init__(self, lang: str) -> None:
        super().__init__(f"mgsm_{lang}", spec(lang), SPLITS, locate=location, read=self._read_files,
                         exemplar_split="exemplars", fixed_exemplars=True, postprocess_fn=self.postprocess)
        self.lang = lang

    def _read_files(self, location: str, stats: sources.SourceStats) -> dict[str, list[sources.Example]]:
        path = os.path.join(location, EXEMPLARS_FILE)
        exemplars = read_exemplars(self.name, location).get(self.lang)
        if exemplars is None:
            raise UserError(f"{self.name}: {path} has no exemplars for {self.lang!r}")
        self.spec = spec(self.lang, exemplars)
        path, data = files.read_data_file(self.name, location, f"mgsm_{self.lang}.tsv",
                                            sources.get_it_from(PUBLISHED_AT))
        examples = [{**ex, "question": exemplars.question_prefix + ex["question"]}
                    for ex in sources.parse_file(data, path, "tsv", parse_row, stats)]
        shots = [{"question": exemplars.question_prefix + q, "answer": a, "rationale": ""} for q, a in exemplars.shots]
        return {"validation": examples, "test": examples, "exemplars": shots}

    def postprocess(self, text: str | bytes, example: Any = None, is_target: bool = False) -> str:
        """SeqIO postprocess_fn: a prediction's number as its language writes it, read up to any new question;
        a target's as the data files write it (in English)."""
        if is_target:
            return final_number(text)
        return final_number(text, lang=self.lang, stops=stop_prefixes(location()))


def location() -> str:
    """Where the MGSM files are."""
    return os.path.join(sources.data_dir_or_raise("mgsm", "the MGSM files", PUBLISHED_AT), "mgsm")


def register() -> None:
    names = []
    for lang in LANGUAGES:
        names += registry.add_source(MgsmSource(lang), {f"mgsm_{lang}": "fs_noopt"})
    registry.add_suite(Suite(
        "mgsm_cot", tuple(names), f"MGSM, {len(LANGUAGES)} languages, {NUM_SHOTS}-shot chain of thought with native "
        f"exemplars; the score averages the {len(TRANSLATED)} translated languages",
        max_decode_length=DECODE_LENGTH, scored=tuple(f"mgsm_{lang}" for lang in TRANSLATED),
        stops=lambda: stop_prefixes(location()),
        averages={"all_languages": tuple(names), "en": ("mgsm_en",)}, list_tasks=True,
    ))

