"""The Flan Collection export's index: its shards, counted once and cached.

Mixing needs each task's example count, which no shard states, so the
first use of a submixture makes one counting pass (Parquet: only the two
name columns) and caches the result as `flan_jax_index.json` in its
directory, or under the cache directory when that is read-only or a URL
fsspec reads. The cache is keyed by the shards' names, sizes and
modification times (or versions). An http(s) export is first mirrored into
fsspec's cache (`mirror`). The shard readers (`open_shard`, `parquet_file`)
serve the counting pass and `collection.StreamSource` alike.
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
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from fsspec.implementations.cache_mapper import AbstractCacheMapper
from fsspec.implementations.cached import SimpleCacheFileSystem
import tensorflow as tf

from flan_jax.errors import UserError
from tasks import files

logger = logging.getLogger(__name__)

FIELDS = ("inputs", "targets", "task_source", "task_name", "template_type")
SUFFIXES = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
INDEX_FILE = "flan_jax_index.json"
INDEX_VERSION = 2
BLOCK_LINES = 4096  # Lines of a JSON Lines unit read through fsspec: rows held in memory per unit.
Triple = tuple[str, str]  # (task_name, template_type) within one submixture.


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


def row_field(row: Mapping[str, Any], name: str) -> Any:
    return row[name] if name in row else row.get("_" + name)


@contextlib.contextmanager
def open_shard(path: str) -> Iterator[io.BufferedIOBase]:
    with files.open_file(path) as raw:
        yield gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw


def parquet_file(path: str):  # -> pyarrow.parquet.ParquetFile
    import pyarrow.parquet as pq  # Only Parquet needs it.

    # Remote paths go through TensorFlow's or fsspec's file systems, as JSON Lines files do.
    return pq.ParquetFile(path if "://" not in path else files.open_file(path))


def parquet_column(names: Iterable[str], field: str) -> str:
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
            parquet = parquet_file(path)
            names = parquet.schema_arrow.names
            columns = [parquet_column(names, "task_name"), parquet_column(names, "template_type")]
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
    with open_shard(path) as f:
        for line_number, line in enumerate(f, 1):
            if line_number % BLOCK_LINES == 1:
                blocks.append((offset, line_number))
            offset += len(line)
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
                counts[(str(row_field(row, "task_name")), str(row_field(row, "template_type")))] += 1
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


def mirror(root: str, directory: str, progress: bool) -> str | None:
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
