"""`flan-jax bench collection`: stream a Flan Collection export once; rows/s, MB/s and resident memory.

The export is the user's (`--dir`) or a made-up one of `--generate_gb` GB in
the published schema, written once to the directory given: the recipe's
submixtures in its proportions, 200 tasks each of Zipf-like sizes, inputs
of 150 made-up words on average and targets of 20, log-normally spread
(`synthetic_rows`, below; the tests use it too). The figures:
the counting pass (first use only), then every row of every submixture read
and parsed through `collection.StreamSource` as training reads them, with
the process's resident memory sampled as it goes and its peak (VmHWM, reset
first so the generator's and the import's peaks do not count).
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping

import numpy as np

from tasks import collection, collection_index, mixing
from tasks.collection_index import FIELDS

MB = 1 << 20


def _rss_mb(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc (Linux): VmRSS now, or VmHWM, its peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Resets VmHWM to the current RSS (Linux 4.0+).
    except OSError:
        pass


def synthetic_counts(total_rows: int, tasks_per_submixture: int, seed: int = 0) -> dict[str, dict[tuple[str, str], int]]:
    """{collection: {(task, template): rows}}: rows split by the recipe's rates, task sizes Zipf-like."""
    rng = np.random.default_rng(seed)
    templates = ("zs_opt", "zs_noopt", "fs_opt", "fs_noopt")
    out = {}
    for c in collection.SUBMIXTURES:
        rows = int(total_rows * mixing.FLAN_2022[c].rate)
        sizes = 1.0 / np.arange(1, tasks_per_submixture + 1)
        rng.shuffle(sizes)
        per_task = np.maximum(1, (rows * sizes / sizes.sum()).astype(int))
        out[c] = {(f"{c}_task{t:04d}", templates[(t + k) % 4]): int(n // 2)
                  for t, n in enumerate(per_task) for k in range(2)}
    return out


def bench_collection(
    directory: str,
    *,
    generate_gb: float = 0.0,
    file_format: str = "jsonl",
    tasks_per_submixture: int = 200,
    words: int = 150,
    target_words: int = 20,
    num_shards: int = 8,
) -> Mapping[str, float]:
    """Streams every row of the export under `directory` once (made first if `generate_gb`); prints figures."""
    import tensorflow as tf

    rss_start = _rss_mb()
    if generate_gb and not tf.io.gfile.exists(directory):
        row_bytes = 60 + (words + target_words) * 5.33  # JSON and the fields, then made-up words (measured).
        counts = synthetic_counts(int(generate_gb * 1e9 / row_bytes), tasks_per_submixture)
        begin = time.perf_counter()
        write_synthetic_export(directory, counts, {c: file_format for c in counts},
                               num_shards=num_shards, row_group_size=2000, words=words, target_words=target_words)
        print(f"generated {generate_gb} GB ({file_format}) in {time.perf_counter() - begin:.0f} s under {directory}")
    size = sum(tf.io.gfile.stat(p).length for c in collection.SUBMIXTURES
               if tf.io.gfile.isdir(d := os.path.join(directory, collection.SUBMIXTURES[c][0]))
               for p in collection_index.list_shards(d))
    _reset_peak_rss()
    begin = time.perf_counter()
    indexes = collection.find_submixtures(directory)
    index_seconds = time.perf_counter() - begin
    index_peak = _rss_mb("VmHWM")
    _reset_peak_rss()
    rows = 0
    samples = []
    begin = time.perf_counter()
    for c, index in indexes.items():
        source = collection.StreamSource(index, {k: 1.0 for k in index.counts}, name=f"bench_{c}")
        # Counted in batches: iterating row by row in Python would time the loop, not the reader.
        ds = source.get_dataset("train", shuffle=True, seed=0).batch(1024).map(lambda ex: tf.size(ex["inputs"]))
        for n in ds.as_numpy_iterator():
            rows += int(n)
            if len(samples) < rows // 20_000:
                samples.append(_rss_mb())
    seconds = time.perf_counter() - begin
    peak = _rss_mb("VmHWM")
    result = {
        "export_mb": size / MB, "rows": rows, "index_seconds": index_seconds, "read_seconds": seconds,
        "rows_per_sec": rows / seconds, "mb_per_sec": size / MB / seconds,
        "rss_start_mb": rss_start, "index_peak_rss_mb": index_peak, "read_peak_rss_mb": peak,
        "read_rss_p50_mb": float(np.median(samples)) if samples else _rss_mb(),
    }
    print(f"export: {directory}, {size / MB:,.0f} MB in {sum(len(i.shards) for i in indexes.values())} shards, "
          f"{rows:,} rows, {os.cpu_count()} CPUs")
    print(f"index (counting pass or cache): {index_seconds:.1f} s, peak resident memory {index_peak:,.0f} MB")
    print(f"read + parse every row: {seconds:.1f} s, {rows / seconds:,.0f} rows/s, {size / MB / seconds:,.1f} MB/s")
    print(f"resident memory: {rss_start:,.0f} MB after start-up; while reading: median "
          f"{result['read_rss_p50_mb']:,.0f} MB, peak {peak:,.0f} MB")
    return result


# --- a made-up export (this benchmark's, and the tests') ---------------------------------

EXPORT_FORMATS = ("jsonl", "jsonl.gz", "parquet")


def write_shards(directory: str, rows: Iterable[Mapping[str, str]], file_format: str, *, num_shards: int = 1,
                 row_group_size: int = 1000) -> list[str]:
    """Writes rows round-robin into `num_shards` files in the export's schema ('jsonl', 'jsonl.gz' or 'parquet').

    Streams: holds at most `row_group_size` rows per shard.
    """
    import tensorflow as tf

    if file_format not in EXPORT_FORMATS:
        raise ValueError(f"file_format={file_format!r}: expected one of {EXPORT_FORMATS}")
    tf.io.gfile.makedirs(directory)
    paths = [os.path.join(directory, f"train-{i:05d}-of-{num_shards:05d}.{file_format}") for i in range(num_shards)]
    if file_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(k, pa.string()) for k in FIELDS])
        writers = [pq.ParquetWriter(path, schema) for path in paths]
        pending: list[list[Mapping[str, str]]] = [[] for _ in paths]

        def flush(i: int) -> None:
            if pending[i]:
                writers[i].write_table(pa.table({k: [r[k] for r in pending[i]] for k in FIELDS}, schema=schema))
                pending[i].clear()

        for n, row in enumerate(rows):
            pending[n % num_shards].append(row)
            if len(pending[n % num_shards]) == row_group_size:
                flush(n % num_shards)
        for i, writer in enumerate(writers):
            flush(i)
            writer.close()
        return paths
    files = [tf.io.gfile.GFile(path, "wb") for path in paths]
    streams = [gzip.GzipFile(fileobj=f, mode="wb") if file_format.endswith(".gz") else f for f in files]
    for n, row in enumerate(rows):
        streams[n % num_shards].write((json.dumps({k: row[k] for k in FIELDS}) + "\n").encode())
    for stream, f in zip(streams, files):
        stream.close()
        f.close()
    return paths


def synthetic_rows(collection: str, counts: Mapping[tuple[str, str], int], *, words: int = 20, target_words: int = 0,
                   seed: int = 0) -> Iterator[dict[str, str]]:
    """Rows in the export's schema with the given (task, template type) counts, tasks interleaved at random.

    Each row's `inputs` is unique and starts "<collection> <task> <template> #<i>:", then made-up
    words: `words` of them, or with `target_words` a log-normal number of mean `words` (inputs) and
    `target_words` (targets), skewed as real prompts and answers are.
    """
    rng = np.random.default_rng(seed)
    kinds = list(counts)
    order = np.repeat(np.arange(len(kinds)), [counts[k] for k in kinds])
    rng.shuffle(order)
    vocabulary = np.array([f"w{i}" for i in range(1000)])
    seen = Counter()

    def text(mean: int) -> str:
        n = max(1, int(rng.lognormal(np.log(mean) - 0.32, 0.8))) if target_words else mean  # mean e^(mu+s^2/2)
        return " ".join(vocabulary[rng.integers(0, 1000, n)])

    for kind_index in order:
        task, template = kinds[kind_index]
        i = seen[kind_index]
        seen[kind_index] += 1
        yield {
            "inputs": f"{collection} {task} {template} #{i}: " + text(words),
            "targets": f"answer {i % 7}" + (" " + text(target_words) if target_words else ""),
            "task_source": collection, "task_name": task, "template_type": template,
        }


def write_synthetic_export(root: str, counts: Mapping[str, Mapping[tuple[str, str], int]],
                           formats: Mapping[str, str], *, num_shards: int = 2, row_group_size: int = 1000,
                           words: int = 20, target_words: int = 0) -> None:
    """A made-up export under `root`: {collection: {(task, template type): rows}}, each in its format."""
    for c, per_kind in counts.items():
        rows = synthetic_rows(c, per_kind, words=words, target_words=target_words)
        write_shards(os.path.join(root, collection.SUBMIXTURES[c][0]), rows, formats[c], num_shards=num_shards,
                     row_group_size=row_group_size)
