"""Held out means held out: long n-gram overlap between training and evaluation text.

The test is GPT-3's decontamination (Brown et al. 2020, appendix C): two
texts overlap when, after normalisation (lower case, words only, punctuation
and spacing dropped), they share a run of `n` = 13 words. An evaluation text
shorter than `n` words overlaps a training text that contains all of it as a
run of words.

`OverlapIndex` holds the evaluation side only: the n-grams of every
evaluation example, as hashes, mapped to the examples that contain them.
Evaluation texts under 8 words are not checked (they would match by chance)
and are counted as such. An n-gram that more than `max_shared` (10)
evaluation examples share is a task's boilerplate (BBH's "The following
paragraphs each describe a set of seven objects arranged in a fixed order"),
not an example's content: it is ignored, as GPT-3 ignored 13-grams found in
more than 10 training documents. Training text is then streamed past it (`matches`), one example at a
time, so memory is set by the evaluation side, whatever the training side's
size (a whole Flan Collection export). `OverlapReport` counts, per (training
task, evaluation task) pair, which evaluation examples were hit and how many
training examples hit them.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Iterable

NGRAM = 13
MIN_WORDS = 8  # Shorter evaluation texts ("Sort: b a") would match everywhere by chance: not checked.
MAX_SHARED = 10  # An n-gram of more evaluation examples than this is boilerplate: ignored.
_WORD = re.compile(r"\w+")
_UNKNOWN = -1  # A word no evaluation text has: no n-gram through it can match.

EvalKey = tuple[str, int]  # (evaluation task, example index)


def words(text: str) -> list[str]:
    """The normalised words of a text: lower case, runs of letters and digits (any script)."""
    return _WORD.findall(text.lower())


class OverlapIndex:
    """The n-grams of evaluation examples, to look training text up against.

    Words are numbered by the evaluation side's vocabulary and n-grams are
    stored as hashes of those numbers, so a training text costs one dict
    look-up per word and one hash per window, and the index's size depends
    on the evaluation side alone.
    """

    def __init__(self, n: int = NGRAM, min_words: int = MIN_WORDS, max_shared: int = MAX_SHARED) -> None:
        if not 0 < min_words <= n:
            raise ValueError(f"need 0 < min_words <= n, not min_words={min_words}, n={n}")
        if max_shared < 1:
            raise ValueError(f"need max_shared >= 1, not {max_shared}")
        self.n, self.min_words, self.max_shared = n, min_words, max_shared
        self._vocabulary: dict[str, int] = {}
        self._grams: dict[int, set[EvalKey]] = collections.defaultdict(set)
        self._sizes: set[int] = set()  # Window sizes to look at: n, and the lengths of shorter texts.
        self.texts: dict[EvalKey, str] = {}
        self.too_short: collections.Counter = collections.Counter()  # evaluation task -> texts not indexed

    def _ids(self, tokens: list[str], grow: bool) -> tuple[int, ...]:
        if grow:
            return tuple(self._vocabulary.setdefault(w, len(self._vocabulary)) for w in tokens)
        return tuple(self._vocabulary.get(w, _UNKNOWN) for w in tokens)

    def add(self, task: str, index: int, text: str) -> None:
        """Indexes one evaluation example's text (one under `min_words` words is counted in `too_short`)."""
        ids = self._ids(words(text), grow=True)
        if len(ids) < self.min_words:
            self.too_short[task] += 1
            return
        key = (task, index)
        self.texts[key] = text
        size = min(len(ids), self.n)
        self._sizes.add(size)
        for start in range(len(ids) - size + 1):
            self._grams[hash(ids[start:start + size])].add(key)

    def __len__(self) -> int:
        return len(self.texts)

    def matches(self, text: str) -> set[EvalKey]:
        """The evaluation examples that share an n-gram with `text` (or lie whole inside it, if shorter)."""
        ids = self._ids(words(text), grow=False)
        found: set[EvalKey] = set()
        for run in _known_runs(ids):
            for size in self._sizes:
                for start in range(len(run) - size + 1):
                    hit = self._grams.get(hash(run[start:start + size]))
                    if hit and len(hit) <= self.max_shared:
                        found |= hit
        return found

    def boilerplate(self) -> int:
        """How many n-grams are ignored: shared by more than `max_shared` evaluation examples."""
        return sum(1 for keys in self._grams.values() if len(keys) > self.max_shared)


def _known_runs(ids: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
    """The stretches of `ids` between unknown words."""
    start = 0
    for i, word in enumerate(ids):
        if word == _UNKNOWN:
            if i > start:
                yield ids[start:i]
            start = i + 1
    if len(ids) > start:
        yield ids[start:]


@dataclasses.dataclass
class PairOverlap:
    """What one training task shares with one evaluation task."""

    eval_examples: set[int] = dataclasses.field(default_factory=set)  # indices of evaluation examples hit
    training_examples: int = 0  # training examples that hit any of them


@dataclasses.dataclass
class OverlapReport:
    """Overlap per (training task, evaluation task), and the training examples read."""

    eval_sizes: dict[str, int]
    pairs: dict[tuple[str, str], PairOverlap] = dataclasses.field(default_factory=dict)
    training_read: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, training_task: str, hits: set[EvalKey]) -> None:
        """Records one training example of `training_task` and the evaluation examples it hit."""
        self.training_read[training_task] += 1
        for eval_task in {task for task, _ in hits}:
            pair = self.pairs.setdefault((training_task, eval_task), PairOverlap())
            pair.training_examples += 1
            pair.eval_examples |= {i for task, i in hits if task == eval_task}

    def as_dict(self) -> dict:
        """JSON-ready: one row per overlapping pair, most eval examples first."""
        rows = [
            {"training_task": train, "eval_task": ev, "eval_examples": len(p.eval_examples),
             "eval_size": self.eval_sizes.get(ev, 0),
             "eval_share": len(p.eval_examples) / max(1, self.eval_sizes.get(ev, 0)),
             "training_examples": p.training_examples, "eval_indices": sorted(p.eval_examples)}
            for (train, ev), p in self.pairs.items()
        ]
        rows.sort(key=lambda r: (-r["eval_examples"], r["training_task"], r["eval_task"]))
        return {"pairs": rows, "training_read": dict(self.training_read), "eval_sizes": self.eval_sizes}


def scan(index: OverlapIndex, training: Iterable[tuple[str, str]], report: OverlapReport) -> OverlapReport:
    """Streams (training task, text) pairs past `index` into `report`."""
    for task, text in training:
        report.add(task, index.matches(text))
    return report
