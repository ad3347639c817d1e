"""What the `flan-jax bench train` modes share: synthetic packed batches, the
compiled training step and its timing, XLA's memory estimate, and the lines
every mode prints (device, batch, model) and its JSON output."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax import optim, partitioning
from flan_jax import step as step_lib
from flan_jax.model import T5Config, Transformer
from flan_jax.model.config import with_segment_bound

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


def xla_peak(compiled: Any) -> int | None:
    """XLA's estimate of what the compiled step holds at once: arguments +
    outputs + temporaries, less the donated buffers outputs reuse."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def time_steps(run: Callable[[], Any], sync: Callable[[Any], Any], steps: int) -> tuple[float, Any]:
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
class CompiledStep:
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


def compile_step(
    config: T5Config, partitioner: partitioning.Partitioner, host_batch: Mapping[str, np.ndarray],
    lengths: Mapping[str, int], num_microbatches: int,
) -> CompiledStep:
    """Initialises the model and compiles `step.make_train_step` exactly as training runs it."""
    tx = optim.adafactor()
    module = Transformer(with_segment_bound(config, lengths))  # the cuDNN route's slots as training sets them
    model, params, opt_state = step_lib.initialize(module, tx, partitioner, lengths, seed=0)
    with partitioner.activate():
        batch = partitioner.shard_batch(dict(host_batch))
        train_step = step_lib.make_train_step(model, tx, partitioner, num_microbatches=num_microbatches)
        start = time.perf_counter()
        compiled = train_step.lower(params, opt_state, batch, jax.random.key(0), jnp.asarray(0, jnp.int32)).compile()
        compile_seconds = time.perf_counter() - start
    return CompiledStep(config, compiled, compile_seconds, {"params": params, "opt_state": opt_state}, batch)


def per_device_bytes(tree: Any) -> int:
    """Bytes of one device's shard (the largest) of every array in a tree of
    arrays or sharded ShapeDtypeStructs."""
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )


def count(tree: Any) -> int:
    """Elements in all arrays (or shapes) of a tree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


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


def write_json(path: str | None, results: Sequence[Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=2)
