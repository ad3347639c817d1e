"""`flan-jax bench train --peft_compare`: training a model's adapters against full
finetuning of its base, in one process (step time, memory, optimizer state and
checkpoint bytes)."""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
from collections.abc import Mapping
from typing import Any

import jax

from flan_jax import partitioning, peft
from flan_jax.bench.common import (
    compile_step, count, describe, per_device_bytes, print_batch, print_device, synthetic_batch, time_steps,
    write_json, xla_peak,
)
from flan_jax.errors import UserError
from flan_jax.model import T5Config

PEFT_ROUNDS = 3


@dataclasses.dataclass
class PeftFigures:
    """One side of `compare_peft`: bytes, and seconds per step."""

    name: str
    compile_seconds: float
    step_seconds: float
    peak_memory_bytes: int | None
    trained_params: int
    opt_state_bytes: int
    checkpoint_bytes: int
    memory_source: str = "XLA estimate"


def checkpoint_bytes(config: T5Config, params: Any, opt_state: Any) -> int:
    """Bytes on disk of one step saved as the trainer saves it (`checkpoints.Checkpointer`:
    the trained parameters and their optimizer state), in a temporary directory."""
    from flan_jax import checkpoints  # orbax: only this mode needs it

    with tempfile.TemporaryDirectory() as directory:
        checkpointer = checkpoints.Checkpointer(directory, checkpoints.CheckpointConfig(best_metric=None))
        checkpointer.save(1, peft.trainable(config, params), opt_state, {})
        checkpointer.wait()
        checkpointer.close()
        return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(directory) for f in files)


def _adapters_name(config: T5Config) -> str:
    parts = []
    if config.lora is not None:
        parts.append(f"LoRA r{config.lora.rank} on {len(config.lora.targets)} kernel pattern(s)")
    if config.prompt_length:
        parts.append(f"prompt of {config.prompt_length}")
    return " + ".join(parts) + f", {config.frozen_dtype} base"


def compare_peft(
    config: T5Config, batch_size: int, lengths: Mapping[str, int], *, steps: int, num_microbatches: int = 1,
    rounds: int = PEFT_ROUNDS,
) -> list[PeftFigures]:
    """Full finetuning of `config`'s base against training its adapters, same batch and process.

    Both steps are compiled first, then timed in `rounds` alternating rounds of
    `steps` steps (median of the rounds' medians), so that a busy machine
    slows both alike. Memory is XLA's estimate for each compiled step (one
    process holds both, so the allocator's peak would mix them).
    """
    if not config.has_adapters:
        raise UserError("bench train --peft_compare: the model has no adapters; add --gin_file=peft/lora.gin")
    print(f"\nbase: {describe(config)}\nadapters: {_adapters_name(config)}; timed in {rounds} alternating "
          f"rounds of {steps} steps", flush=True)
    partitioner = partitioning.Partitioner()
    host_batch = synthetic_batch(batch_size, lengths, config.vocab_size)
    sides = [("full finetuning", peft.base_config(config)), (_adapters_name(config), config)]
    compiled = [compile_step(cfg, partitioner, host_batch, lengths, num_microbatches) for _, cfg in sides]
    times: list[list[float]] = [[] for _ in sides]
    with partitioner.activate():
        for step in compiled:
            jax.block_until_ready(step.run())  # first step: allocation
        for _ in range(rounds):
            for i, step in enumerate(compiled):
                times[i].append(time_steps(step.run, jax.block_until_ready, steps)[0])
    return [
        PeftFigures(
            name, step.compile_seconds, statistics.median(seconds), xla_peak(step.compiled),
            count(peft.trainable(step.config, step.state["params"])), per_device_bytes(step.state["opt_state"]),
            checkpoint_bytes(step.config, step.state["params"], step.state["opt_state"]),
        )
        for (name, _), step, seconds in zip(sides, compiled, times)
    ]


def peft_table(full: PeftFigures, adapters: PeftFigures) -> list[str]:
    """The two sides and their ratio, one figure a row."""
    mib = lambda n: f"{n / 2**20:,.1f} MiB" if n is not None else "n/a"  # noqa: E731
    rows = [
        ("compile", lambda f: f"{f.compile_seconds:,.1f} s", "compile_seconds"),
        ("step (median)", lambda f: f"{f.step_seconds * 1e3:,.0f} ms", "step_seconds"),
        (f"peak memory ({full.memory_source})", lambda f: mib(f.peak_memory_bytes), "peak_memory_bytes"),
        ("trained parameters", lambda f: f"{f.trained_params:,}", "trained_params"),
        ("optimizer state", lambda f: mib(f.opt_state_bytes), "opt_state_bytes"),
        ("checkpoint (one step)", lambda f: mib(f.checkpoint_bytes), "checkpoint_bytes"),
    ]
    lines = [f"  {'':30} {'full finetuning':>18} {'adapters':>18} {'adapters / full':>16}"]
    for label, show, field in rows:
        a, b = getattr(full, field), getattr(adapters, field)
        ratio = f"{b / a:.3g}x" if a and b is not None else "n/a"
        lines.append(f"  {label:30} {show(full):>18} {show(adapters):>18} {ratio:>16}")
    return lines


def bench_peft(
    config: T5Config, *, batch_size: int, lengths: Mapping[str, int], steps: int, num_microbatches: int = 1,
    json_out: str | None = None,
) -> list[PeftFigures]:
    """Prints `compare_peft`'s table for the gin-configured model (and writes it to `json_out`)."""
    print_device()
    print_batch(batch_size, lengths, num_microbatches, steps)
    figures = compare_peft(config, batch_size, lengths, steps=steps, num_microbatches=num_microbatches)
    print("\n".join(peft_table(*figures)), flush=True)
    write_json(json_out, figures)
    return figures
