"""Where real data comes from: the data directory, bad rows, statistics.

The data directory holds one folder per source family (flan_cot/, bbh/,
mmlu/; see tasks/flan_cot.py, tasks/bbh.py, tasks/mmlu.py). It is the gin
binding `data_dir.path` if set, else the environment variable
FLAN_JAX_DATA_DIR. Nothing is read when tasks are registered: a source reads
its files when a dataset is first built, so `tasks.register()` works without
any data, and a missing file raises `MissingDataError` (a `UserError`) then,
naming the file, where it was looked for and where to get it.

Files are read by `tasks.files` (local paths and gs:// by TensorFlow, any
other URL by fsspec).

A `LoadedSource` holds one source's examples in memory, split by split.
Rows that cannot be used (wrong column count, empty answer, bytes that are
not UTF-8, ...) are skipped: each is counted in the source's `SourceStats`,
and the file and line of the first few are kept and logged once the source
is read. A source none of whose rows can be used raises `NoExamplesError`
(a `UserError`): one line with the file, the rows read and skipped and the
first reasons, whichever command built the dataset.

`stats(name)` is also where the SeqIO pipeline counts what it does to
examples (see `seqio_tasks.render_preprocessor`), under the SeqIO task's name:

  rendered           examples rendered (tf.data's read-ahead included)
  dropped_no_fit     few-shot examples dropped: no exemplar fit (few_shot_fallback="drop")
  inputs_truncated   inputs longer than the sequence length, cut by SeqIO's trim
  targets_truncated  the same for targets

Counts add up over every pass over the data; `reset_stats` clears them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import gin

from flan_jax.errors import UserError
from tasks import templates
from tasks.files import MissingDataError  # Raised for the data directory too; importers use sources.MissingDataError.

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "FLAN_JAX_DATA_DIR"
MAX_REPORTED_PROBLEMS = 5  # Bad rows whose file and line are kept (and logged) per source.
VALIDATION_PERCENT = 2  # Share of a train-only file held out as its validation split.

Example = dict[str, Any]


# --- where the data is ---------------------------------------------------------------


@gin.configurable
def data_dir(path: str | None = None) -> str | None:
    """The data directory: gin's `data_dir.path`, else $FLAN_JAX_DATA_DIR, else None."""
    return path or os.environ.get(DATA_DIR_ENV) or None


def no_data_dir_error(source: str, needs: str, published_at: str) -> MissingDataError:
    """The error for a source that needs the data directory when none is set."""
    return MissingDataError(
        f"{source}: needs {needs} but no data directory is set. Get the files from {published_at}, "
        f"then set {DATA_DIR_ENV} (or the gin binding data_dir.path) to the directory that holds them."
    )


def data_dir_or_raise(source: str, needs: str, published_at: str) -> str:
    """`data_dir()`, or a MissingDataError that says what `source` needs and where to get it."""
    directory = data_dir()
    if directory is None:
        raise no_data_dir_error(source, needs, published_at)
    return directory


def get_it_from(published_at: str) -> str:
    """The advice a MissingDataError gives for a file of the data directory."""
    return (f"Get it from {published_at} and put it there, or point {DATA_DIR_ENV} (or the gin binding "
            f"data_dir.path) at the directory that holds it.")


class NoExamplesError(UserError):
    """A source read its data but none of its rows could be used."""


def no_examples_message(name: str, location: str, source_stats: SourceStats, reasons: int = 3) -> str:
    """One line: the source, where it read, rows read and skipped, and the first reasons with their lines."""
    first = [p.replace(location + ":", "line ", 1) for p in source_stats.problems[:reasons]]
    return (f"{name}: no usable example in {location}: {source_stats.kept + source_stats.skipped} rows read, "
            f"{source_stats.skipped} skipped" + (f" (first: {'; '.join(first)})" if first else ""))


# --- statistics ------------------------------------------------------------------------


@dataclasses.dataclass
class SourceStats:
    """What happened to one source's rows, or one task's examples (see the module docstring)."""

    name: str
    kept: int = 0  # Rows read into examples.
    skipped: int = 0  # Rows that could not be used.
    problems: list[str] = dataclasses.field(default_factory=list)  # "file:line: why" of the first few skipped.
    counts: Counter = dataclasses.field(default_factory=Counter)  # Pipeline counts, by event name.
    log_later: bool = False  # Whether `skip` leaves logging to `log_skipped` (a source read whole).
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def skip(self, where: str, reason: str) -> None:
        """Counts a skipped row (`where`: "file:line"); keeps and logs the first few."""
        with self._lock:
            self.skipped += 1
            if len(self.problems) < MAX_REPORTED_PROBLEMS:
                problem = f"{where}: {reason}"
                self.problems.append(problem)
                if not self.log_later:
                    logger.warning("%s: skipped row %s", self.name, problem)

    def log_skipped(self) -> None:
        """Logs the first few skipped rows, then (at INFO) how many were skipped in all."""
        for problem in self.problems:
            logger.warning("%s: skipped row %s", self.name, problem)
        if self.skipped > len(self.problems):
            logger.info("%s: skipped %d of %d rows (the first %d logged above)", self.name, self.skipped,
                        self.skipped + self.kept, len(self.problems))

    def count_kept(self, n: int) -> None:
        with self._lock:
            self.kept += n

    def count(self, event: str, n: int = 1) -> None:
        with self._lock:
            self.counts[event] += n

    def reset(self) -> None:
        with self._lock:
            self.kept = self.skipped = 0
            self.problems.clear()
            self.counts.clear()


_STATS: dict[str, SourceStats] = {}
_STATS_LOCK = threading.Lock()


def stats(name: str) -> SourceStats:
    """The statistics of a source or SeqIO task, created empty on first use."""
    with _STATS_LOCK:
        return _STATS.setdefault(name, SourceStats(name))


def all_stats() -> dict[str, SourceStats]:
    """Every source's and task's statistics so far, by name."""
    with _STATS_LOCK:
        return dict(_STATS)


def reset_stats(name: str | None = None) -> None:
    """Clears one name's statistics, or all of them."""
    for entry in [stats(name)] if name else all_stats().values():
        entry.reset()


# --- rows ------------------------------------------------------------------------------


class MalformedRow(ValueError):
    """Raised by a row parser: the row is skipped and counted, with this message as the reason."""


Row = list[str] | dict[str, Any]  # Columns of a TSV/CSV row, or a JSON object.
RowParser = Callable[[Row], Example]


def iter_rows(data: bytes, path: str, file_format: str, source_stats: SourceStats) -> Iterator[tuple[int, Row]]:
    """Yields (line number, row) for each row of a jsonl, tsv or csv file.

    Blank lines are not rows. Rows that cannot be decoded (bytes that are not
    UTF-8, JSON that does not parse) are skipped and counted in `source_stats`.
    TSV cells are split on tabs only (no quoting, as in the Flan CoT files).
    """
    if file_format == "csv":
        # surrogateescape lets the csv module parse the whole file (fields may
        # span lines); a row that got an undecodable byte is then skipped alone.
        reader = csv.reader(io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline=""))
        first_line = 1
        for row in reader:
            line, first_line = first_line, reader.line_num + 1
            if not row:
                continue
            if any(_has_undecodable(cell) for cell in row):
                source_stats.skip(f"{path}:{line}", "not valid UTF-8")
                continue
            yield line, row
        return
    if file_format not in ("jsonl", "tsv"):
        raise ValueError(f"unknown file format {file_format!r}; use jsonl, tsv or csv")
    for line, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            source_stats.skip(f"{path}:{line}", f"not valid UTF-8 ({e.reason} at byte {e.start})")
            continue
        if file_format == "tsv":
            yield line, text.split("\t")
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            source_stats.skip(f"{path}:{line}", f"not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            source_stats.skip(f"{path}:{line}", f"expected a JSON object, got {type(row).__name__}")
            continue
        yield line, row


def _has_undecodable(text: str) -> bool:
    """Whether `text` holds a byte that surrogateescape kept from undecodable input."""
    try:  # decoded UTF-8 holds no surrogates, and a surrogate does not encode (in C, unlike a scan)
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def parse_rows(rows: Iterable[tuple[str, Row]], parse: RowParser, source_stats: SourceStats) -> list[Example]:
    """Parses (where, row) pairs with `parse`; rows it rejects (MalformedRow) are skipped and counted."""
    examples = []
    for where, row in rows:
        try:
            examples.append(parse(row))
        except MalformedRow as e:
            source_stats.skip(where, str(e))
    source_stats.count_kept(len(examples))
    return examples


def parse_file(data: bytes, path: str, file_format: str, parse: RowParser, source_stats: SourceStats, *,
               header: bool = False) -> list[Example]:
    """Parses every row of a file (see `iter_rows`, `parse_rows`).

    With `header`, the first row of a TSV/CSV file names the columns, and
    `parse` gets each row as a dict by those names.
    """
    rows = iter_rows(data, path, file_format, source_stats)
    if header and file_format != "jsonl":
        names = next(rows, (0, []))[1]
        rows = ((line, dict(zip(names, row))) for line, row in rows)
    return parse_rows(((f"{path}:{line}", row) for line, row in rows), parse, source_stats)


def require_fields(example: Example, names: Sequence[str] = ("question", "answer")) -> Example:
    """Checks that the fields are non-empty strings; raises MalformedRow otherwise."""
    for name in names:
        value = example.get(name)
        if not isinstance(value, str) or not value.strip():
            raise MalformedRow(f"empty {name}")
    return example


def hold_out(examples: Sequence[Example], percent: int = VALIDATION_PERCENT) -> dict[str, list[Example]]:
    """Splits a train-only file into train and validation by a hash of each question and its options.

    Hashing (rather than taking the last rows) keeps the split stable when
    rows are added or reordered, and puts repeated questions on one side.
    """
    splits: dict[str, list[Example]] = {"train": [], "validation": []}
    for example in examples:
        key = json.dumps([example["question"], list(example.get("options") or ())])
        bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
        splits["validation" if bucket < percent else "train"].append(example)
    return splits


# --- sources ---------------------------------------------------------------------------


class LoadedSource:
    """A source whose examples are read into memory when a dataset is first built.

    Args:
      name: unique; also the name of its `stats`.
      spec: how its examples are rendered.
      splits: the splits its SeqIO tasks offer.
      locate: returns where the data is (a directory or URL); called each
        time a dataset is built, so a changed data directory is picked up.
      read: (location, stats) -> {split: examples}; may return more splits
        than `splits`, e.g. a few-shot pool.
      exemplar_split: where few-shot exemplars come from.
      fixed_exemplars: False draws `spec.num_shots` exemplars at random per
        query (`templates.pick_exemplars`); True takes the first ones in file
        order, as evaluation benchmarks do. Either way, exemplars that ask
        the query's question (`templates.same_question`) are left out.
      postprocess_fn: the SeqIO postprocess_fn of its tasks (what evaluation
        compares); default `registry.postprocess`, the answer after "So the
        answer is".
      metric_fns: SeqIO metric functions, (targets, predictions) -> {name:
        value}; default exact-match accuracy.
    """

    def __init__(
        self,
        name: str,
        spec: templates.TaskSpec,
        splits: Sequence[str],
        locate: Callable[[], str],
        read: Callable[[str, SourceStats], Mapping[str, list[Example]]],
        *,
        exemplar_split: str = "train",
        fixed_exemplars: bool = False,
        postprocess_fn: Callable[..., Any] | None = None,
        metric_fns: Sequence[Callable[..., Mapping[str, Any]]] | None = None,
    ) -> None:
        self.name = name
        self.postprocess_fn = postprocess_fn
        self.metric_fns = metric_fns
        self.spec = spec
        self.splits = tuple(splits)
        self.exemplar_split = exemplar_split
        self.fixed_exemplars = fixed_exemplars
        self._locate = locate
        self._read = read
        self._loaded: tuple[str, Mapping[str, list[Example]]] | None = None
        self._lock = threading.Lock()

    def load(self) -> Mapping[str, list[Example]]:
        """Reads the data, unless already read from the same location; returns {split: examples}."""
        location = self._locate()
        with self._lock:
            if self._loaded is None or self._loaded[0] != location:
                source_stats = stats(self.name)
                source_stats.reset()
                source_stats.log_later = True  # A source with no usable row says so in one line instead.
                try:
                    loaded = self._read(location, source_stats)
                finally:
                    source_stats.log_later = False
                if not any(loaded.get(split) for split in self.splits):
                    raise NoExamplesError(no_examples_message(self.name, location, source_stats))
                source_stats.log_skipped()
                self._loaded = (location, loaded)
            return self._loaded[1]

    def _data(self) -> Mapping[str, list[Example]]:
        # Per-example lookups reuse what the last `load` read, without asking gin again.
        loaded = self._loaded
        return loaded[1] if loaded is not None else self.load()

    def split_size(self, split: str) -> int:
        if split not in self.splits:
            raise ValueError(f"source {self.name!r} has no split {split!r}; it has {self.splits}")
        return len(self.load()[split])

    def example(self, split: str, index: int) -> Example:
        return self._data()[split][index]

    def exemplars(self, split: str, index: int, example: Mapping[str, Any], seed: int) -> list[Example]:
        """Few-shot exemplars for example `index` of `split`; never the example itself."""
        pool = self._data()[self.exemplar_split]
        count = self.spec.num_shots
        if self.fixed_exemplars:
            return [e for e in pool if not templates.same_question(e, example)][:count]
        return templates.pick_exemplars(
            self.spec.name, split, index, seed, example,
            train_example=pool.__getitem__, num_train=len(pool), count=count,
        )
