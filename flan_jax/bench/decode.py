"""`flan-jax bench decode`: cached greedy decoding against transformers' generate, same weights."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

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
