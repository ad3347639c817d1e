"""The Flan Collection's published export, streamed: shards of rendered text, indexed once, thinned to a recipe.

The FLAN repository (github.com/google-research/FLAN/tree/main/flan/v2,
"Download") points to one dataset per submixture, rows of already rendered
text. flan-jax reads that export from a directory (local or `gs://`, read by
TensorFlow; any URL fsspec reads, e.g. `hf://datasets/OWNER` whose five
dataset repositories are the submixtures; or an http(s) URL with directory
listings, kept in fsspec's cache under the cache directory on first use)
laid out as

    ROOT/flan2021_submix_original/  *.jsonl | *.jsonl.gz | *.parquet (at any depth)
    ROOT/t0_submix_original/
    ROOT/niv2_submix_original/
    ROOT/cot_submix_original/
    ROOT/dialog_submix_original/

with the fields `inputs`, `targets`, `task_source`, `task_name` and
`template_type` in every row (copies that prefix them with "_", as some
do, are read too). Submixtures that are absent are simply not there.

Index. Mixing needs each task's example count, which no shard states, so the
first use of a submixture makes one counting pass (Parquet: only the two
name columns) and caches the result as `flan_jax_index.json` in its
directory, or under the cache directory when that is read-only or a URL
fsspec reads. The cache is keyed by the shards' names, sizes and
modification times (or versions).

Reading (`StreamSource`). Nothing is loaded whole: units (a JSON Lines file
TensorFlow reads line by line, a block of BLOCK_LINES lines of one fsspec
reads, whose offsets the counting pass keeps, or one Parquet row group) are
shuffled per epoch, a few are read at a time (`tf.data` interleave), and
rows are parsed in batches. Memory is a few units and the shuffle buffers,
whatever the size of the collection. (A block of a .jsonl.gz file through
fsspec is found by decompressing from the file's start.) Loader
hosts split the units between them when there are at least as many units as
hosts, else every host reads everything and keeps every n-th row: either way
each row is seen by exactly one host. Every step is a `tf.data` op or a pure
function of its input, so iteration is deterministic for a seed and the
training iterator's saved position restores exactly.

Mixing. `recipe_acceptance` turns a submixture's counts into the probability
of keeping a row of each (task, template type) so that the kept stream has
the recipe's shares: template types weighted equally (as the FLAN
repository's `*_submix` mixtures are) or as given, and within a type each
task in proportion to min(examples, cap). Thinning one stream costs one
parse per row; a mixture of thousands of per-task datasets would instead
read every shard once per task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import re
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
from fsspec.implementations.cache_mapper import AbstractCacheMapper
from fsspec.implementations.cached import SimpleCacheFileSystem
import tensorflow as tf

from flan_jax.errors import UserError
from tasks import files, sources

logger = logging.getLogger(__name__)

# Recipe collection (tasks/mixing.py FLAN_2022) -> (directory of the export, prefix of its task names).
SUBMIXTURES: dict[str, tuple[str, str]] = {
    "flan": ("flan2021_submix_original", "flan2021"),
    "t0": ("t0_submix_original", "t0"),
    "niv2": ("niv2_submix_original", "niv2"),
    "cot": ("cot_submix_original", "cot"),
    "dialog": ("dialog_submix_original", "dialog"),
}
FIELDS = ("inputs", "targets", "task_source", "task_name", "template_type")
SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
INDEX_FILE = "flan_jax_index.json"
INDEX_VERSION = 2
COLLECTION_DIR_ENV = "FLAN_JAX_COLLECTION_DIR"
PARSE_BATCH = 256  # Rows parsed per Python call: amortises the call, bounds memory.
CYCLE_LENGTH = 4  # Units read at a time; with Parquet, row groups held in memory.
BLOCK_LINES = 4096  # Lines of a JSON Lines unit read through fsspec: rows held in memory per unit.

Triple = tuple[str, str]  # (task_name, template_type) within one submixture.


def collection_dir() -> str | None:
    """$FLAN_JAX_COLLECTION_DIR, else `flan_collection/` of the data directory if it exists, else None."""
    if path := os.environ.get(COLLECTION_DIR_ENV):
        return path
    data = sources.data_dir()
    if data and files.isdir(os.path.join(data, "flan_collection")):
        return os.path.join(data, "flan_collection")
    return None


def task_name(prefix: str, task: str, template_type: str) -> str:
    """The SeqIO task of one (task, template type), e.g. 'flan2021_glue_cola_2_0_0_zs_opt'."""
    return "_".join(re.sub(r"[^0-9A-Za-z]+", "_", part).strip("_") for part in (prefix, task, template_type))


# --- the index --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shard:
    """One file of a submixture: its path, format, rows, and (Parquet) rows per row group.

    `blocks` (JSON Lines): the (byte offset, line number) where every
    BLOCK_LINES-th line starts, then the end's; fsspec reads a block at a time.
    """

    path: str
    format: str
    rows: int
    row_groups: tuple[int, ...] = ()
    blocks: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class SubmixIndex:
    """What the counting pass learns of one submixture directory."""

    directory: str
    shards: tuple[Shard, ...]
    counts: dict[Triple, int]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def units(self) -> list[tuple[str, int]]:
        """(path, part) read as one piece: a whole JSON Lines file TensorFlow reads (part -1), a block of
        one that fsspec reads, or one Parquet row group."""
        out = []
        for shard in self.shards:
            if shard.format == "parquet":
                out += [(shard.path, g) for g in range(len(shard.row_groups))]
            elif files.is_native(shard.path):
                out.append((shard.path, -1))
            else:
                out += [(shard.path, b) for b in range(len(shard.blocks) - 1)]
        return out


def _format(path: str) -> str | None:
    return next((fmt for suffix, fmt in SUFFIXES.items() if path.endswith(suffix)), None)


def list_shards(directory: str) -> list[str]:
    """The shards under `directory` (any depth), sorted; a UserError if there are none."""
    if not files.isdir(directory):
        raise UserError(f"Flan Collection: {directory} is not a directory")
    try:
        found = [path for path in files.find_files(directory) if _format(path)]
    except OSError as e:  # A URL's store or server failing.
        raise UserError(f"Flan Collection: cannot list {directory}: {e}") from None
    if not found:
        raise UserError(f"Flan Collection: no .jsonl, .jsonl.gz or .parquet files under {directory}")
    return sorted(found)


def _signature(paths: Sequence[str]) -> list[list[Any]]:
    return [[path, *files.file_version(path)] for path in paths]


def _field(row: Mapping[str, Any], name: str) -> Any:
    return row[name] if name in row else row.get("_" + name)


@contextlib.contextmanager
def _open(path: str) -> Iterator[io.BufferedIOBase]:
    with files.open_file(path) as raw:
        yield gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw


def _parquet_file(path: str):  # -> pyarrow.parquet.ParquetFile
    import pyarrow.parquet as pq  # Only Parquet needs it.

    # Remote paths go through TensorFlow's or fsspec's file systems, as JSON Lines files do.
    return pq.ParquetFile(path if "://" not in path else files.open_file(path))


def _parquet_column(names: Iterable[str], field: str) -> str:
    names = list(names)
    for candidate in (field, "_" + field):
        if candidate in names:
            return candidate
    raise UserError(f"Flan Collection: no column {field!r} (nor {'_' + field!r}); the file has {names}")


def _count_shard(path: str) -> tuple[Shard, Counter]:
    """One shard's rows and (task, template type) counts."""
    counts: Counter = Counter()
    if _format(path) == "parquet":
        try:
            parquet = _parquet_file(path)
            names = parquet.schema_arrow.names
            columns = [_parquet_column(names, "task_name"), _parquet_column(names, "template_type")]
            meta = parquet.metadata
            groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            for i in range(meta.num_row_groups):
                table = parquet.read_row_group(i, columns=columns)
                counts.update(zip(*(table.column(c).to_pylist() for c in columns)))
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        except Exception as e:  # pyarrow raises many types for a bad file.
            raise UserError(f"Flan Collection: {path} is not a readable Parquet file: {e}") from None
        return Shard(path, "parquet", sum(groups), groups), counts
    rows = offset = line_number = 0
    blocks = []
    with _open(path) as f:
        for line_number, line in enumerate(f, 1):
            if line_number % BLOCK_LINES == 1:
                blocks.append((offset, line_number))
            offset += len(line)
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
                counts[(str(_field(row, "task_name")), str(_field(row, "template_type")))] += 1
            except (ValueError, AttributeError, TypeError):
                counts[("", "")] += 1  # Counted as a row; skipped with its line number when read.
    blocks.append((offset, line_number + 1))
    return Shard(path, "jsonl", rows, blocks=tuple(blocks)), counts


def _cache_path(directory: str) -> str:
    digest = hashlib.sha256(directory.encode()).hexdigest()[:16]
    return os.path.join(files.cache_dir(), "collection_index", f"{digest}.json")


def _index_files(directory: str) -> list[str]:
    """Where the index is cached: beside the shards, then the cache directory (only there for URLs
    fsspec reads: their stores, the Hub's say, are not written to)."""
    return ([os.path.join(directory, INDEX_FILE)] if files.is_native(directory) else []) + [_cache_path(directory)]


def _read_cached(path: str, signature: list) -> SubmixIndex | None:
    try:
        with tf.io.gfile.GFile(path) as f:
            saved = json.load(f)
    except (tf.errors.OpError, OSError, ValueError):
        return None
    if saved.get("version") != INDEX_VERSION or saved.get("signature") != signature:
        return None
    shards = tuple(Shard(s["path"], s["format"], s["rows"], tuple(s["row_groups"]), tuple(map(tuple, s["blocks"])))
                   for s in saved["shards"])
    counts = {(task, template): n for task, template, n in saved["counts"]}
    return SubmixIndex(saved["directory"], shards, counts)


def index_submixture(directory: str, *, progress: bool = True) -> SubmixIndex:
    """The index of one submixture directory: read from its cache, else counted once and cached."""
    paths = list_shards(directory)
    signature = _signature(paths)
    for cached in _index_files(directory):
        if (index := _read_cached(cached, signature)) is not None:
            return index
    from tqdm import tqdm

    logger.info("Flan Collection: counting the examples of %s (%d shards, once)", directory, len(paths))
    shards, counts = [], Counter()
    for path in tqdm(paths, desc=f"indexing {os.path.basename(directory.rstrip('/'))}", unit="shard",
                     disable=not progress):
        shard, shard_counts = _count_shard(path)
        shards.append(shard)
        counts.update(shard_counts)
    counts.pop(("", ""), None)
    index = SubmixIndex(directory, tuple(shards), dict(counts))
    record = {
        "version": INDEX_VERSION, "directory": directory, "signature": signature,
        "shards": [dataclasses.asdict(s) for s in shards],
        "counts": sorted([task, template, n] for (task, template), n in counts.items()),
    }
    for target in _index_files(directory):
        try:
            tf.io.gfile.makedirs(os.path.dirname(target))
            with tf.io.gfile.GFile(target + ".tmp", "w") as f:
                json.dump(record, f)
            tf.io.gfile.rename(target + ".tmp", target, overwrite=True)
            break
        except (tf.errors.OpError, OSError):
            continue  # Read-only data: the cache directory instead.
    return index


# --- http(s) roots: kept in fsspec's cache --------------------------------------------


class _RelativeNames(AbstractCacheMapper):
    """Names a cached file by its path under `url`, so the cache has the server's layout."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def __call__(self, path: str) -> str:
        return urllib.parse.unquote(path[len(self.url):])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _RelativeNames) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


def _mirror(root: str, directory: str, progress: bool) -> str | None:
    """A local copy of the submixture `directory` of the export at URL `root`; None if it has none.

    The files are listed from the server's index pages and fetched once into
    fsspec's whole-file cache, under the cache directory (streamed to disk:
    memory stays flat). A cached file whose size is not the server's (an
    interrupted download) is fetched again.
    """
    url = f"{root.rstrip('/')}/{directory}/"
    fs, _ = files.filesystem(url)
    try:
        listed = [f for f in fs.find(url, maxdepth=3) if _format(f)] if fs.isdir(url) else []
    except OSError as e:  # requests' errors too.
        raise UserError(f"Flan Collection: cannot list {url}: {e}") from None
    if not listed:
        return None
    from tqdm import tqdm

    local = os.path.join(files.cache_dir(), "collection_mirror", hashlib.sha256(root.encode()).hexdigest()[:16],
                         directory)
    cache = SimpleCacheFileSystem(fs=fs, cache_storage=local, cache_mapper=_RelativeNames(url))
    for file_url in tqdm(listed, desc=f"mirroring {directory}", unit="file", disable=not progress):
        path = os.path.join(local, cache._mapper(file_url))
        try:
            if os.path.exists(path) and os.path.getsize(path) != fs.size(file_url):
                os.remove(path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            cache.open(file_url, "rb").close()
        except OSError as e:  # requests' errors too.
            raise UserError(f"Flan Collection: cannot download {file_url}: {e}") from None
    return local


def find_submixtures(root: str, *, progress: bool = True) -> dict[str, SubmixIndex]:
    """{recipe collection: index} of the submixtures present under `root`.

    `root` is a directory TensorFlow reads (local, gs://), a URL fsspec
    streams from (s3://, hf://datasets/OWNER with one dataset repository per
    submixture, memory://, ...) or an http(s) URL whose directories have
    index pages listing their files (as web servers' directory listings do);
    such an export is kept in fsspec's cache under the cache directory on
    first use and read from there.
    """
    if files.is_native(root) and not files.isdir(root):
        raise UserError(f"Flan Collection: {root} is not a directory (set {COLLECTION_DIR_ENV} to the export)")
    present = {}
    for collection, (directory, _) in SUBMIXTURES.items():
        if files.is_http(root):
            local = _mirror(root, directory, progress)
        else:
            local = os.path.join(root, directory) if "://" not in root else f"{root.rstrip('/')}/{directory}"
            local = local if files.isdir(local) else None
        if local is not None:
            present[collection] = index_submixture(local, progress=progress)
    if not present:
        raise UserError(f"Flan Collection: {root} {'lists' if files.is_http(root) else 'has'} none of the "
                        f"submixture directories {', '.join(d for d, _ in SUBMIXTURES.values())}")
    return present


# --- mixing -----------------------------------------------------------------------------


def recipe_shares(counts: Mapping[Triple, int], cap: int | None,
                  template_weights: Mapping[str, float] | None = None) -> dict[Triple, float]:
    """Each (task, template type)'s share of its submixture under the recipe; sums to 1.

    Template types get `template_weights` (default: equal); within a type,
    tasks are example-proportional with each count capped at `cap`.
    """
    types = sorted({template for _, template in counts})
    weights = {t: float(template_weights.get(t, 0.0)) if template_weights is not None else 1.0 for t in types}
    weights = {t: w for t, w in weights.items() if w > 0}
    if not weights:
        raise UserError(f"template weights {dict(template_weights or {})} leave none of the template types {types}")
    total_weight = sum(weights.values())
    capped = {k: min(n, cap) if cap is not None else n for k, n in counts.items() if k[1] in weights}
    per_type = Counter()
    for (_, template), n in capped.items():
        per_type[template] += n
    return {k: weights[k[1]] / total_weight * n / per_type[k[1]] for k, n in capped.items() if n > 0}


def recipe_acceptance(counts: Mapping[Triple, int], cap: int | None,
                      template_weights: Mapping[str, float] | None = None) -> dict[Triple, float]:
    """The probability of keeping a row of each (task, template type) so the kept rows have `recipe_shares`.

    A row of k is read with frequency counts[k] / total; keeping it with
    probability proportional to share[k] / frequency[k] gives the shares.
    Scaled so the most under-represented kind is always kept.
    """
    total = sum(counts.values())
    shares = recipe_shares(counts, cap, template_weights)
    ratios = {k: share / (counts[k] / total) for k, share in shares.items()}
    top = max(ratios.values())
    return {k: r / top for k, r in ratios.items()}


# --- reading ----------------------------------------------------------------------------

_ROW_SPEC = ("inputs", "targets", "task_name", "template_type")  # Then "p", the probability of keeping the row.
_TYPES = [tf.string] * len(_ROW_SPEC) + [tf.float64]
# Graph code with no Python control flow on tensors: AutoGraph has nothing to
# convert, and would re-read this file's source (wrong if it changed since).
_plain_tf = tf.autograph.experimental.do_not_convert


class StreamSource(seqio.DataSource):
    """A SeqIO source streaming one submixture, keeping rows of each (task, template type) with a probability.

    Yields {"inputs", "targets", "task_name", "template_type"} (strings);
    rows of kinds absent from `keep` are dropped. One split, "train".
    """

    def __init__(self, index: SubmixIndex, keep: Mapping[Triple, float], *, name: str) -> None:
        self.index = index
        self.keep = {k: float(p) for k, p in keep.items() if p > 0}
        self.name = name
        self.thinned = any(p < 1.0 for p in self.keep.values())
        self.expected_examples = int(round(sum(index.counts.get(k, 0) * p for k, p in self.keep.items())))
        # No count for a thinned stream: seqio caches sources it knows to be
        # small in memory, which would repeat one epoch's draw forever.
        super().__init__(splits=("train",), caching_permitted=False,
                         num_input_examples=None if self.thinned else {"train": self.expected_examples})

    def shares(self) -> dict[Triple, float]:
        """Each kept (task, template type)'s expected share of the rows yielded; sums to 1."""
        kept = {k: self.index.counts.get(k, 0) * p for k, p in self.keep.items()}
        total = sum(kept.values())
        return {k: n / total for k, n in kept.items() if n > 0}

    def template_shares(self) -> dict[str, float]:
        """`shares` summed by template type, in name order."""
        out: Counter = Counter()
        for (_, template), share in self.shares().items():
            out[template] += share
        return dict(sorted(out.items()))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True  # Sharded here: by unit when there are enough, else by row.

    @property
    def output_features(self) -> Mapping[str, seqio.Feature]:
        return {}

    def list_shards(self, split: str) -> list[str]:
        return [s.path for s in self.index.shards]

    # Pure functions of their arguments (tf.numpy_function, stateful=False), so
    # a saved iterator restores without them holding any state.

    def _select(self, rows: list[dict[str, Any] | None], where: list[str]) -> list[np.ndarray]:
        stats = sources.stats(self.name)
        out: dict[str, list[bytes]] = {k: [] for k in (*_ROW_SPEC, "p")}
        for row, place in zip(rows, where):
            if row is None:
                stats.skip(place, "not a JSON object")
                continue
            values = {k: _field(row, k) for k in ("inputs", "targets", "task_name", "template_type")}
            if not all(isinstance(v, str) for v in values.values()):
                missing = [k for k, v in values.items() if not isinstance(v, str)]
                stats.skip(place, f"no text field(s) {', '.join(missing)}")
                continue
            p = self.keep.get((values["task_name"], values["template_type"]), 0.0)
            if p > 0:
                for k, v in values.items():
                    out[k].append(v.encode())
                out["p"].append(p)
        return [np.array(out[k], dtype=np.bytes_).reshape(-1) for k in _ROW_SPEC] + [np.array(out["p"], np.float64)]

    def _parse_jsonl(self, path: bytes, line_numbers: np.ndarray, lines: np.ndarray) -> list[np.ndarray]:
        rows: list[dict[str, Any] | None] = []
        where = []
        for number, line in zip(line_numbers, lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            rows.append(row if isinstance(row, dict) else None)
            where.append(f"{path.decode()}:{int(number) + 1}")
        return self._select(rows, where)

    def _read_block(self, path: bytes, part: np.int64) -> list[np.ndarray]:
        """The 0-based line numbers and the lines of one block of a JSON Lines file fsspec reads."""
        name = path.decode()
        shard = next(s for s in self.index.shards if s.path == name)
        (start, first_line), (end, _) = shard.blocks[int(part)], shard.blocks[int(part) + 1]
        with _open(name) as f:
            f.seek(start)  # gzip: decompresses up to the block.
            lines = f.read(end - start).split(b"\n")
        return [np.arange(first_line - 1, first_line - 1 + len(lines), dtype=np.int64), np.array(lines, dtype=object)]

    def _read_row_group(self, path: bytes, group: np.int64) -> list[np.ndarray]:
        name = path.decode()
        parquet = _parquet_file(name)
        names = parquet.schema_arrow.names
        columns = {k: _parquet_column(names, k) for k in ("inputs", "targets", "task_name", "template_type")}
        table = parquet.read_row_group(int(group), columns=list(columns.values()))
        values = {k: table.column(c).to_pylist() for k, c in columns.items()}
        rows = [dict(zip(values, row)) for row in zip(*values.values())]
        return self._select(rows, [f"{name}: row group {int(group)}"] * len(rows))

    @staticmethod
    def _rows(parts: Sequence[tf.Tensor]) -> dict[str, tf.Tensor]:
        *columns, p = parts
        for value in parts:
            value.set_shape([None])
        return {**dict(zip(_ROW_SPEC, columns)), "p": p}

    # Units yield batches of rows (a parse batch, a row group): per-row tf.data
    # ops cost several microseconds each, so rows stay batched until the end.

    def _parsed(self, path: tf.Tensor, lines: tf.data.Dataset) -> tf.data.Dataset:
        """(line number, line) pairs parsed into rows, PARSE_BATCH lines at a time."""

        @_plain_tf
        def parse(numbers: tf.Tensor, text: tf.Tensor) -> dict[str, tf.Tensor]:
            return self._rows(tf.numpy_function(self._parse_jsonl, [path, numbers, text], _TYPES, stateful=False))

        return lines.batch(PARSE_BATCH).map(parse)

    @_plain_tf
    def _jsonl_unit(self, path: tf.Tensor, part: tf.Tensor) -> tf.data.Dataset:
        del part
        compression = tf.where(tf.strings.regex_full_match(path, r".*\.gz"), "GZIP", "")
        return self._parsed(path, tf.data.TextLineDataset(path, compression_type=compression).enumerate())

    @_plain_tf
    def _block_unit(self, path: tf.Tensor, part: tf.Tensor) -> tf.data.Dataset:
        numbers, lines = tf.numpy_function(self._read_block, [path, part], [tf.int64, tf.string], stateful=False)
        numbers.set_shape([None])
        lines.set_shape([None])
        return self._parsed(path, tf.data.Dataset.from_tensor_slices((numbers, lines)))

    @_plain_tf
    def _parquet_unit(self, path: tf.Tensor, part: tf.Tensor) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensors(
            self._rows(tf.numpy_function(self._read_row_group, [path, part], _TYPES, stateful=False)))

    @staticmethod
    @_plain_tf
    def _thin(batch: dict[str, tf.Tensor], draw: tf.Tensor) -> dict[str, tf.Tensor]:
        """Keeps each row with its probability `p`; the uniforms are a pure function of the batch's `draw`."""
        uniform = tf.random.stateless_uniform(tf.shape(batch["p"]), seed=tf.stack([draw, draw // 7919]),
                                              dtype=tf.float64)
        keep = uniform < batch["p"]
        return {k: tf.boolean_mask(v, keep) for k, v in batch.items()}

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, *, sequence_length: Any = None,
                    use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs  # seqio repeats the task's dataset itself.
        if split != "train":
            raise UserError(f"{self.name}: the Flan Collection export has only a 'train' split, not {split!r}")
        seed = 0 if seed is None else seed
        units = self.index.units()
        num_shards, shard_index = (shard_info.num_shards, shard_info.index) if shard_info else (1, 0)
        by_unit = num_shards > 1 and len(units) >= num_shards
        if by_unit:
            units = units[shard_index::num_shards]
        # TensorFlow reads its own file systems' JSON Lines files line by line, fsspec others' in blocks.
        readers = {s.path: "parquet" if s.format == "parquet" else "lines" if files.is_native(s.path) else "blocks"
                   for s in self.index.shards}
        streams, sizes = [], []
        for reader, read in (("lines", self._jsonl_unit), ("blocks", self._block_unit),
                             ("parquet", self._parquet_unit)):
            mine = [u for u in units if readers[u[0]] == reader]
            if not mine:
                continue
            ds = tf.data.Dataset.from_tensor_slices(([p for p, _ in mine], np.array([g for _, g in mine], np.int64)))
            if shuffle:
                ds = ds.shuffle(len(mine), seed=seed, reshuffle_each_iteration=True)
            streams.append(ds.interleave(read, cycle_length=CYCLE_LENGTH, num_parallel_calls=tf.data.AUTOTUNE,
                                         deterministic=True))
            sizes.append(len(mine))
        batches = streams[0] if len(streams) == 1 else tf.data.Dataset.sample_from_datasets(
            streams, weights=[s / sum(sizes) for s in sizes], seed=seed, stop_on_empty_dataset=False)
        if self.thinned:
            draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
            batches = tf.data.Dataset.zip(batches, draws).map(self._thin)
        rows = batches.unbatch()
        if num_shards > 1 and not by_unit:
            rows = rows.shard(num_shards, shard_index)
        return rows.map(_plain_tf(lambda row: {k: v for k, v in row.items() if k != "p"}))
