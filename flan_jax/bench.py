"""Benchmarks that print figures (never timed tests): `flan-jax bench decode|data`."""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flan_jax import decoding
from flan_jax.model import T5Config, Transformer

# The configuration the decode benchmark is specified on.
DECODE_CONFIG = T5Config(
    vocab_size=32128, emb_dim=256, num_heads=4, head_dim=64, num_encoder_layers=4, num_decoder_layers=4,
    mlp_dim=1024, dropout_rate=0.0,
)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: compilation, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_decode(
    config: T5Config = DECODE_CONFIG,
    *,
    batch_size: int = 8,
    input_length: int = 64,
    new_tokens: int = 64,
    repeats: int = 5,
    compare_hf: bool = True,
) -> dict[str, float]:
    """Tokens/s of flan-jax's cached greedy decoding and of transformers' generate, same weights.

    EOS is disabled on both sides so each row produces exactly `new_tokens`.
    """
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, config.vocab_size, (batch_size, input_length)).astype(np.int32)
    module = Transformer(config)
    dummy = jnp.asarray(inputs[:, :8])
    params = nn.unbox(module.init(jax.random.key(0), dummy, dummy, dummy, enable_dropout=False)["params"])
    greedy = jax.jit(functools.partial(decoding.greedy_decode, module, max_decode_length=new_tokens, eos_id=-1))
    ours = _median_seconds(lambda: greedy(params, jnp.asarray(inputs)).block_until_ready(), repeats)
    tokens = batch_size * new_tokens
    results = {"flan_jax_tokens_per_sec": tokens / ours, "flan_jax_seconds": ours}
    print(f"config: {dataclasses.asdict(config)}")
    print(f"batch {batch_size}, {input_length} input tokens, {new_tokens} new tokens, median of {repeats}, device {jax.devices()[0].platform}")
    print(f"flan-jax greedy (kv cache, jit): {tokens / ours:10,.0f} tokens/s  ({ours * 1e3:.1f} ms)")
    if compare_hf:
        import torch
        import transformers

        from flan_jax.formats import hf

        hf_model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf.config_to_hf(config))).eval()
        state = {k: torch.from_numpy(v) for k, v in hf.hf_state_dict_from_params(jax.device_get(params), config).items()}
        hf_model.load_state_dict(state, strict=False)
        hf_inputs = torch.from_numpy(inputs.astype(np.int64))

        def run_hf():
            with torch.no_grad():
                out = hf_model.generate(
                    input_ids=hf_inputs, attention_mask=torch.ones_like(hf_inputs), do_sample=False, num_beams=1,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                )
            assert out.shape[1] == new_tokens + 1  # + decoder start token

        theirs = _median_seconds(run_hf, repeats)
        results.update(hf_tokens_per_sec=tokens / theirs, hf_seconds=theirs, speedup=theirs / ours)
        print(f"transformers generate (torch {torch.__version__}, {torch.get_num_threads()} threads): "
              f"{tokens / theirs:10,.0f} tokens/s  ({theirs * 1e3:.1f} ms)")
        print(f"speed-up: {theirs / ours:.2f}x")
    return results


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
