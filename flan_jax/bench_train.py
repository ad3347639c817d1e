"""`flan-jax bench train`: the real training step on synthetic packed batches.

Prints compile seconds, steady step time, tokens/s (all positions and
non-padding ones), model-FLOPs utilisation against the device's peak
(`flan_jax.flops`) and peak memory; optionally the same figures for
transformers' T5 training step on the same shapes and device. Needs only
jax, flax, optax and gin (no TensorFlow, SeqIO or t5): the model comes from
gin (`--gin_file=models/flan_t5_base.gin`), the optimizer is the trainer's
Adafactor and the mesh the gin-bound `Partitioner`.

Two modes build on these pieces: `flan_jax.bench_plan` (`--compile_only`:
what one device would hold, without running a step) and `flan_jax.bench_peft`
(`--peft_compare`: training adapters beside full finetuning).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax import flops, optim, partitioning, profile_summary
from flan_jax import step as step_lib
from flan_jax.model import T5Config, Transformer

FILL_RATES = {"inputs": 0.9, "targets": 0.6}  # fraction of non-padding positions per packed row


def synthetic_batch(
    batch_size: int, lengths: Mapping[str, int], vocab_size: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Packed rows like seqio's EncDecFeatureConverter(pack=True) makes: 1-4
    examples per row filling `FILL_RATES` of it, segment ids, positions, and
    decoder inputs shifted right within each example."""
    rng = np.random.default_rng(seed)
    li, lt = lengths["inputs"], lengths["targets"]
    streams = (("encoder", "inputs", li, "encoder_input_tokens"), ("decoder", "targets", lt, "decoder_target_tokens"))
    out = {}
    for prefix, _, length, field in streams:
        for name in (field, f"{prefix}_segment_ids", f"{prefix}_positions"):
            out[name] = np.zeros((batch_size, length), np.int32)
    for row in range(batch_size):
        count = int(rng.integers(1, 5))
        for prefix, key, length, field in streams:
            sizes = np.maximum(1, (rng.dirichlet(np.ones(count)) * FILL_RATES[key] * length).astype(int))
            start = 0
            for segment, size in enumerate(sizes, 1):
                end = min(start + size, length)
                out[field][row, start:end] = rng.integers(2, vocab_size, end - start)
                out[f"{prefix}_segment_ids"][row, start:end] = segment
                out[f"{prefix}_positions"][row, start:end] = np.arange(end - start)
                start = end
    targets = out["decoder_target_tokens"]
    shifted = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    out["decoder_input_tokens"] = np.where(out["decoder_positions"] == 0, 0, shifted)
    out["decoder_loss_weights"] = (targets > 0).astype(np.float32)
    return out


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
    peak = _xla_peak(compiled)
    return peak, "XLA estimate" if peak is not None else "n/a"


def _xla_peak(compiled: Any) -> int | None:
    """XLA's estimate of what the compiled step holds at once: arguments +
    outputs + temporaries, less the donated buffers outputs reuse."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def _time_steps(run: Callable[[], Any], sync: Callable[[Any], Any], steps: int) -> tuple[float, Any]:
    """Median seconds per step over `steps` steps, in 2-5 timed groups (async dispatch kept)."""
    groups = max(2, min(5, steps // 2))
    per_group = max(1, steps // groups)
    times, out = [], None
    for _ in range(groups):
        start = time.perf_counter()
        for _ in range(per_group):
            out = run()
        sync(out)
        times.append((time.perf_counter() - start) / per_group)
    return statistics.median(times), out


@dataclasses.dataclass
class _Step:
    """A compiled training step and the state it updates in place, one `run()` a step."""

    config: T5Config
    compiled: Any
    compile_seconds: float
    state: dict[str, Any]
    batch: dict[str, jax.Array]

    def run(self) -> dict:
        rng, index = jax.random.key(0), jnp.asarray(0, jnp.int32)
        self.state["params"], self.state["opt_state"], metrics = self.compiled(
            self.state["params"], self.state["opt_state"], self.batch, rng, index
        )
        return metrics


def _compile_step(
    config: T5Config, partitioner: partitioning.Partitioner, host_batch: Mapping[str, np.ndarray],
    lengths: Mapping[str, int], num_microbatches: int,
) -> _Step:
    """Initialises the model and compiles `step.make_train_step` exactly as training runs it."""
    tx = optim.adafactor()
    model, params, opt_state = step_lib.initialize(Transformer(config), tx, partitioner, lengths, seed=0)
    with partitioner.activate():
        batch = partitioner.shard_batch(dict(host_batch))
        train_step = step_lib.make_train_step(model, tx, partitioner, num_microbatches=num_microbatches)
        start = time.perf_counter()
        compiled = train_step.lower(params, opt_state, batch, jax.random.key(0), jnp.asarray(0, jnp.int32)).compile()
        compile_seconds = time.perf_counter() - start
    return _Step(config, compiled, compile_seconds, {"params": params, "opt_state": opt_state}, batch)


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
    step = _compile_step(config, partitioner, host_batch, lengths, num_microbatches)
    with partitioner.activate():
        jax.block_until_ready(step.run())  # first step: allocation, autotuning
        seconds, metrics = _time_steps(step.run, jax.block_until_ready, steps)
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
    seconds, loss = _time_steps(run, sync, steps)
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


def print_device() -> None:
    device = jax.devices()[0]
    print(f"device: {len(jax.devices())} x {device.device_kind} ({device.platform}); jax {jax.__version__}")


def print_batch(batch_size: int, lengths: Mapping[str, int], num_microbatches: int, steps: int | None) -> None:
    """The batch line every bench train mode starts with (`steps`: None when nothing is timed)."""
    print(f"batch {batch_size} x ({lengths['inputs']} inputs + {lengths['targets']} targets), packed; "
          f"microbatches {num_microbatches}" + ("" if steps is None else f"; median step of {steps}"))


def describe(config: T5Config) -> str:
    return (
        f"d_model {config.emb_dim}, {config.num_encoder_layers}+{config.num_decoder_layers} layers, "
        f"{config.num_heads} heads of {config.head_dim}, d_ff {config.mlp_dim}, vocab {config.vocab_size}, "
        f"{config.dtype}, dropout {config.dropout_rate}, scan_layers={config.scan_layers}, "
        f"remat={config.remat_policy}, fused_attention={config.fused_attention}"
    )


def named_depths(config: T5Config, layers: Sequence[int]) -> list[tuple[str, T5Config]]:
    """[(name, config)]: the config itself, or one per depth in `layers` (encoder = decoder)."""
    if not layers:
        return [("flan-jax", config)]
    return [
        (f"flan-jax, {n}+{n} layers", dataclasses.replace(config, num_encoder_layers=n, num_decoder_layers=n))
        for n in layers
    ]


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


def write_json(path: str | None, results: Sequence[Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
