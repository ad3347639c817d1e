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

Index (tasks/collection_index.py). Mixing needs each task's example count,
which no shard states, so the first use of a submixture makes one counting
pass and caches the result (`index_submixture`).

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

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from flan_jax.errors import UserError
from tasks import files, sources
from tasks.collection_index import (
    SubmixIndex,
    Triple,
    index_submixture,
    mirror,
    open_shard,
    parquet_column,
    parquet_file,
    row_field,
)

# Recipe collection (tasks/mixing.py FLAN_2022) -> (directory of the export, prefix of its task names).
SUBMIXTURES: dict[str, tuple[str, str]] = {
    "flan": ("flan2021_submix_original", "flan2021"),
    "t0": ("t0_submix_original", "t0"),
    "niv2": ("niv2_submix_original", "niv2"),
    "cot": ("cot_submix_original", "cot"),
    "dialog": ("dialog_submix_original", "dialog"),
}
COLLECTION_DIR_ENV = "FLAN_JAX_COLLECTION_DIR"
PARSE_BATCH = 256  # Rows parsed per Python call: amortises the call, bounds memory.
CYCLE_LENGTH = 4  # Units read at a time; with Parquet, row groups held in memory.


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
            local = mirror(root, directory, progress)
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


INVERTED_SUFFIX = "_ii"  # FLAN's input-inversion tasks (CoT-II, Dialog-II): e.g. cot_gsm8k_ii, wiki_dialog_ii.


def recipe_shares(counts: Mapping[Triple, int], cap: int | None,
                  template_weights: Mapping[str, float] | None = None,
                  inverted_rate: float | None = None) -> dict[Triple, float]:
    """Each (task, template type)'s share of its submixture under the recipe; sums to 1.

    Template types get `template_weights` (default: equal); within a type,
    tasks are example-proportional with each count capped at `cap`. With
    `inverted_rate`, a type's input-inversion tasks (INVERTED_SUFFIX) are a
    group at that rate against 1 for the others, each group example-proportional
    within (FLAN's flan/v2/mixtures.py mixes CoT with CoT-II, Dialog with
    Dialog-II, at 1 : 0.3 per template type).
    """
    types = sorted({template for _, template in counts})
    weights = {t: float(template_weights.get(t, 0.0)) if template_weights is not None else 1.0 for t in types}
    weights = {t: w for t, w in weights.items() if w > 0}
    if not weights:
        raise UserError(f"template weights {dict(template_weights or {})} leave none of the template types {types}")
    total_weight = sum(weights.values())
    capped = {k: min(n, cap) if cap is not None else n for k, n in counts.items() if k[1] in weights and n > 0}

    def group(kind: Triple) -> tuple[str, bool]:
        return kind[1], inverted_rate is not None and kind[0].endswith(INVERTED_SUFFIX)

    per_group = Counter()
    for k, n in capped.items():
        per_group[group(k)] += n
    group_rate = {g: inverted_rate if g[1] else 1.0 for g in per_group}
    per_type = Counter()
    for (template, _), rate in group_rate.items():
        per_type[template] += rate
    return {k: weights[k[1]] / total_weight * group_rate[group(k)] / per_type[k[1]] * n / per_group[group(k)]
            for k, n in capped.items()}


def recipe_acceptance(counts: Mapping[Triple, int], cap: int | None,
                      template_weights: Mapping[str, float] | None = None,
                      inverted_rate: float | None = None) -> dict[Triple, float]:
    """The probability of keeping a row of each (task, template type) so the kept rows have `recipe_shares`.

    A row of k is read with frequency counts[k] / total; keeping it with
    probability proportional to share[k] / frequency[k] gives the shares.
    Scaled so the most under-represented kind is always kept.
    """
    total = sum(counts.values())
    shares = recipe_shares(counts, cap, template_weights, inverted_rate)
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
            values = {k: row_field(row, k) for k in ("inputs", "targets", "task_name", "template_type")}
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
        with open_shard(name) as f:
            f.seek(start)  # gzip: decompresses up to the block.
            lines = f.read(end - start).split(b"\n")
        return [np.arange(first_line - 1, first_line - 1 + len(lines), dtype=np.int64), np.array(lines, dtype=object)]

    def _read_row_group(self, path: bytes, group: np.int64) -> list[np.ndarray]:
        name = path.decode()
        parquet = parquet_file(name)
        names = parquet.schema_arrow.names
        columns = {k: parquet_column(names, k) for k in ("inputs", "targets", "task_name", "template_type")}
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
