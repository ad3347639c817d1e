"""`flan-jax bench collection`: stream a Flan Collection export once; rows/s, MB/s and resident memory.

The export is the user's (`--dir`) or a made-up one of `--generate_gb` GB in
the published schema, written once to the directory given: the recipe's
submixtures in its proportions, 200 tasks each of Zipf-like sizes, inputs
of 150 made-up words on average and targets of 20, log-normally spread
(`collection.synthetic_rows`). The figures:
the counting pass (first use only), then every row of every submixture read
and parsed through `collection.StreamSource` as training reads them, with
the process's resident memory sampled as it goes and its peak (VmHWM, reset
first so the generator's and the import's peaks do not count).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np

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
    from tasks import collection, mixing

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

    from tasks import collection

    rss_start = _rss_mb()
    if generate_gb and not tf.io.gfile.exists(directory):
        row_bytes = 60 + (words + target_words) * 5.33  # JSON and the fields, then made-up words (measured).
        counts = synthetic_counts(int(generate_gb * 1e9 / row_bytes), tasks_per_submixture)
        begin = time.perf_counter()
        collection.write_synthetic_export(directory, counts, {c: file_format for c in counts},
                                          num_shards=num_shards, row_group_size=2000, words=words,
                                          target_words=target_words)
        print(f"generated {generate_gb} GB ({file_format}) in {time.perf_counter() - begin:.0f} s under {directory}")
    size = sum(tf.io.gfile.stat(p).length for c in collection.SUBMIXTURES
               if tf.io.gfile.isdir(d := os.path.join(directory, collection.SUBMIXTURES[c][0]))
               for p in collection.list_shards(d))
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
