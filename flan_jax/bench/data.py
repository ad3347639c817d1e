"""`flan-jax bench data`: the input pipeline's examples/s, tokens/s and fill rates."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator, Mapping

import numpy as np

DATA_LENGTHS = {"inputs": 1024, "targets": 256}


def _time_batches(batches: Iterator[dict[str, np.ndarray]], count: int) -> tuple[float, int, int, list[dict[str, float]]]:
    """(seconds, examples, real tokens, fill rates per batch) of the next `count` batches."""
    from flan_jax import data

    examples = tokens = 0
    fills = []
    begin = time.perf_counter()
    for _ in range(count):
        batch = next(batches)
        examples += int(batch["encoder_segment_ids"].max(axis=1).sum())  # Segments are numbered 1..k per row.
        tokens += data.num_real_tokens(batch)
        fills.append(data.fill_rates(batch))
    return time.perf_counter() - begin, examples, tokens, fills


def bench_data(
    mixture: str | None = None,
    task_feature_lengths: Mapping[str, int] = DATA_LENGTHS,
    *,
    batch_size: int = 32,
    repeats: int = 5,
    batches_per_repeat: int = 50,
    seed: int = 0,
    packer: str | None = None,
) -> dict[str, float]:
    """Examples/s and tokens/s of the whole input pipeline (render, tokenize, pack, batch), and fill rates.

    `mixture` defaults to `flan_cot` when it is registered, else `builtin_train`;
    `packer` ("best_fit" or "seqio") to the one configured for training.
    The figures are medians over `repeats` timings of `batches_per_repeat`
    batches each, after the first batch and one untimed repeat (warm-up:
    building the pipeline, filling shuffle buffers and the packer).
    Examples are counted as packed segments; tokens are non-padding input
    plus target tokens.
    The tasks must be registered first (`flan-jax bench data` does it).
    """
    import seqio

    from flan_jax import data

    if mixture is None:
        mixture = "flan_cot" if "flan_cot" in seqio.MixtureRegistry.names() else "builtin_train"
    packer = data.configured_packing()[0] if packer is None else data.check_packer(packer, "packer")
    start = time.perf_counter()
    batches = data.get_train_dataset(mixture, task_feature_lengths, batch_size, seed=seed,
                                     packer=packer).as_numpy_iterator()
    try:
        next(batches)
        first_batch = time.perf_counter() - start
        runs = [_time_batches(batches, batches_per_repeat) for _ in range(repeats + 1)][1:]  # First: warm-up.
    finally:
        del batches  # A tf.data iterator alive at exit can hang TensorFlow's shutdown.
    examples_per_sec = statistics.median(n / t for t, n, _, _ in runs)
    tokens_per_sec = statistics.median(k / t for t, _, k, _ in runs)
    fills = [f for _, _, _, fs in runs for f in fs]
    fill = {key: float(np.mean([f[key] for f in fills])) for key in fills[0]}
    examples_per_row = sum(n for _, n, _, _ in runs) / (len(runs) * batches_per_repeat * batch_size)
    print(f"data: {mixture}, lengths {dict(task_feature_lengths)}, packer {packer}, batch {batch_size}, "
          f"median of {repeats} x {batches_per_repeat} batches, {os.cpu_count()} CPUs")
    print(f"first batch after {first_batch:.1f} s (pipeline start-up)")
    print(f"{examples_per_sec:10,.0f} examples/s  {tokens_per_sec:12,.0f} tokens/s  "
          f"({examples_per_row:.2f} examples per packed row)")
    print(f"fill rate: inputs {fill['fill_rate/inputs']:.1%}, targets {fill['fill_rate/targets']:.1%}")
    return {
        "examples_per_sec": examples_per_sec,
        "tokens_per_sec": tokens_per_sec,
        "examples_per_row": examples_per_row,
        "first_batch_seconds": first_batch,
        **fill,
    }
