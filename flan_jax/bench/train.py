"""`flan-jax bench train`: the real training step on synthetic packed batches.

Prints compile seconds, steady step time, tokens/s (all positions and
non-padding ones), model-FLOPs utilisation against the device's peak
(`flan_jax.flops`) and peak memory; optionally the same figures for
transformers' T5 training step on the same shapes and device. Needs only
jax, flax, optax and gin (no TensorFlow, SeqIO or t5): the model comes from
gin (`--gin_file=models/flan_t5_base.gin`), the optimizer is the trainer's
Adafactor and the mesh the gin-bound `Partitioner`.

Two modes build on the same pieces (`flan_jax.bench.common`): `flan_jax.bench.plan`
(`--compile_only`: what one device would hold, without running a step) and
`flan_jax.bench.peft` (`--peft_compare`: training adapters beside full finetuning).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flan_jax import flops, partitioning, profile_summary
from flan_jax.bench.common import (
    compile_step, describe, named_depths, print_batch, print_device, synthetic_batch, time_steps, write_json, xla_peak,
)
from flan_jax.model import T5Config


@dataclasses.dataclass
class Result:
    """One benchmarked configuration; seconds and FLOP/s unless named otherwise."""

    name: str
    compile_seconds: float
    step_seconds: float
    tokens_per_sec: float
    real_tokens_per_sec: float
    model_flops_per_sec: float
    mfu: float
    peak_memory_bytes: int | None
    loss: float
    memory_source: str = "device allocator"

    def lines(self) -> list[str]:
        memory = f"{self.peak_memory_bytes / 2**30:.1f} GiB" if self.peak_memory_bytes else "n/a"
        return [
            f"  compile          {self.compile_seconds:8.1f} s",
            f"  step             {self.step_seconds * 1e3:8.1f} ms   ({1 / self.step_seconds:.2f} steps/s)",
            f"  tokens/s         {self.tokens_per_sec:12,.0f} all positions   {self.real_tokens_per_sec:12,.0f} non-padding",
            f"  model FLOP/s     {self.model_flops_per_sec / 1e12:10.2f} T      MFU {self.mfu:6.1%}",
            f"  peak memory      {memory} ({self.memory_source})",
            f"  loss (last step) {self.loss:.4f}",
        ]


def _peak_memory(device: jax.Device, compiled: Any) -> tuple[int | None, str]:
    """(bytes, source): the allocator's peak where the device reports one (GPU,
    TPU), else XLA's estimate for the compiled step (arguments + outputs +
    temporaries, less donated buffers)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device allocator"
    peak = xla_peak(compiled)
    return peak, "XLA estimate" if peak is not None else "n/a"


def bench_flan_jax(
    config: T5Config,
    batch_size: int,
    lengths: Mapping[str, int],
    *,
    steps: int,
    peak: float,
    num_microbatches: int = 1,
    name: str = "flan-jax",
    profile_dir: str | None = None,
) -> Result:
    """Compiles and times `step.make_train_step` exactly as training runs it;
    with `profile_dir`, also traces 3 steps and prints where the time goes."""
    partitioner = partitioning.Partitioner()
    host_batch = synthetic_batch(batch_size, lengths, config.vocab_size)
    real_tokens = int((host_batch["encoder_input_tokens"] > 0).sum() + (host_batch["decoder_target_tokens"] > 0).sum())
    step = compile_step(config, partitioner, host_batch, lengths, num_microbatches)
    with partitioner.activate():
        jax.block_until_ready(step.run())  # first step: allocation, autotuning
        seconds, metrics = time_steps(step.run, jax.block_until_ready, steps)
        if profile_dir:
            print("\n".join(profile_summary.profile_step(step.run, step.compiled.as_text(), profile_dir)), flush=True)
    all_tokens = batch_size * (lengths["inputs"] + lengths["targets"])
    model_flops = flops.train_flops_per_step(config, batch_size, lengths["inputs"], lengths["targets"]) / seconds
    memory, memory_source = _peak_memory(jax.devices()[0], step.compiled)
    return Result(
        name, step.compile_seconds, seconds, all_tokens / seconds, real_tokens / seconds, model_flops,
        model_flops / peak, memory, float(metrics["loss"]), memory_source,
    )


def bench_hf(config: T5Config, batch_size: int, lengths: Mapping[str, int], *, steps: int, peak: float) -> Result:
    """transformers' T5 training step (its Adafactor; bf16 autocast on GPU) on the same shapes.

    HF T5 cannot pack, so its rows are single examples filling the same
    [batch, length] tensors: the same positions and model FLOPs per step.
    """
    import torch
    import transformers
    from transformers.optimization import Adafactor

    from flan_jax.formats import hf

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf.config_to_hf(config))).to(device).train()
    # Held in a dict so that they can be released before flan-jax runs.
    held = {
        "model": model,
        "optimizer": Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=True, warmup_init=False),
    }
    del model
    generator = np.random.default_rng(0)
    inputs = torch.from_numpy(generator.integers(2, config.vocab_size, (batch_size, lengths["inputs"]))).to(device)
    labels = torch.from_numpy(generator.integers(2, config.vocab_size, (batch_size, lengths["targets"]))).to(device)
    use_bf16 = cuda and config.dtype == "bfloat16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)

    def run() -> torch.Tensor:
        with autocast:
            loss = held["model"](input_ids=inputs, attention_mask=torch.ones_like(inputs), labels=labels).loss
        loss.backward()
        held["optimizer"].step()
        held["optimizer"].zero_grad(set_to_none=True)
        return loss

    def sync(loss: torch.Tensor) -> None:
        if cuda:
            torch.cuda.synchronize()
        loss.item()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    sync(run())  # first step: allocation, kernel selection
    first = time.perf_counter() - start
    seconds, loss = time_steps(run, sync, steps)
    loss = float(loss.item())
    memory = torch.cuda.max_memory_allocated() if cuda else None
    held.clear()
    if cuda:
        torch.cuda.empty_cache()
    all_tokens = batch_size * (lengths["inputs"] + lengths["targets"])
    model_flops = flops.train_flops_per_step(config, batch_size, lengths["inputs"], lengths["targets"]) / seconds
    name = f"transformers {transformers.__version__} (torch {torch.__version__}, {'bf16 autocast' if use_bf16 else 'float32'}, {torch.get_num_threads()} CPU threads)"
    return Result(
        name, first, seconds, all_tokens / seconds, all_tokens / seconds, model_flops, model_flops / peak,
        memory, loss, "torch allocator" if cuda else "n/a",
    )


def bench_train(
    config: T5Config | None = None,
    *,
    batch_size: int = 32,
    lengths: Mapping[str, int] = {"inputs": 1024, "targets": 256},
    steps: int = 10,
    num_microbatches: int = 1,
    layers: Sequence[int] = (),
    compare_hf: bool = False,
    json_out: str | None = None,
    profile_dir: str | None = None,
) -> list[Result]:
    """Benchmarks the gin-configured model (or each depth in `layers`) and prints the figures."""
    config = config or T5Config()
    print_device()
    peak, peak_source = flops.system_peak_flops(config.dtype)
    print(f"peak for MFU: {peak / 1e12:.1f} TFLOP/s ({peak_source})")
    print_batch(batch_size, lengths, num_microbatches, steps)
    configs = named_depths(config, layers)
    hf_result = None
    if compare_hf:
        # First, and then handed back to the device: torch's caching allocator
        # and JAX's would otherwise each hold memory the other needs.
        hf_result = bench_hf(configs[-1][1], batch_size, lengths, steps=steps, peak=peak)
    results = []
    for name, cfg in configs:
        print(f"\n{name}: {describe(cfg)}", flush=True)
        result = bench_flan_jax(
            cfg, batch_size, lengths, steps=steps, peak=peak, num_microbatches=num_microbatches, name=name,
            profile_dir=profile_dir and os.path.join(profile_dir, f"{cfg.num_encoder_layers}_layers"),
        )
        print("\n".join(result.lines()), flush=True)
        results.append(result)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"\ncompile time {configs[-1][0]} / {configs[0][0]}: {last.compile_seconds / first.compile_seconds:.2f}x")
    if hf_result is not None:
        print(f"\n{hf_result.name}, same shapes and device:")
        print(f"  first step       {hf_result.compile_seconds:8.1f} s")
        print("\n".join(line for line in hf_result.lines() if "compile" not in line))
        print(f"\nflan-jax / transformers tokens/s: {results[-1].tokens_per_sec / hf_result.tokens_per_sec:.2f}x")
        results.append(hf_result)
    write_json(json_out, results)
    return results


