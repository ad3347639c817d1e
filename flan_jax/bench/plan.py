"""`flan-jax bench train --compile_only`: the training step compiled on
parameter shapes alone (nothing is allocated), and what one device would hold.

A plan for a model or mesh this machine cannot run (with fake CPU devices,
`--devices=N`). With adapters (`gin/peft/lora.gin`) it splits the parameters
into the frozen base and the trained adapters.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from flan_jax import optim, partitioning, peft
from flan_jax import step as step_lib
from flan_jax.bench.common import (
    count, describe, named_depths, per_device_bytes, print_batch, print_device, synthetic_batch, write_json, xla_peak,
)
from flan_jax.model import T5Config, Transformer
from flan_jax.model.config import with_segment_bound


# XLA:CPU has no bfloat16 matmul: it converts each bf16 kernel to float32 for
# its product, and loop-invariant code motion then hoists those converts out of
# the scanned layers, holding a float32 copy of every stacked kernel (41 GiB for
# XXL with a bf16 frozen base) that no GPU or TPU compile makes. A CPU plan
# compiles without that pass so that its estimate stands for an accelerator's.
CPU_PLAN_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


@dataclasses.dataclass
class CompiledPlan:
    """What one device holds for the compiled step (bytes), and XLA's memory estimate for it.

    `params_bytes` is `frozen_params_bytes` + `trained_params_bytes` (all
    trained without adapters); the counts are of the whole model's parameters.
    """

    name: str
    compile_seconds: float
    devices: int
    params_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    xla_temp_bytes: int | None
    xla_peak_bytes: int | None
    backend: str
    frozen_params_bytes: int = 0
    trained_params_bytes: int = 0
    frozen_params: int = 0
    trained_params: int = 0

    def lines(self) -> list[str]:
        gib = lambda n: f"{n / 2**30:.2f} GiB" if n is not None else "n/a"  # noqa: E731
        lines = [
            f"  compile          {self.compile_seconds:8.1f} s   "
            f"({self.devices} device{'s' if self.devices > 1 else ''}; nothing allocated)",
            f"  per device       parameters {gib(self.params_bytes)}, optimizer state {gib(self.opt_state_bytes)}, "
            f"batch {gib(self.batch_bytes)}",
        ]
        if self.frozen_params:
            lines.append(
                f"  parameters       frozen base {gib(self.frozen_params_bytes)} ({self.frozen_params / 1e9:.2f}B), "
                f"trained adapters {gib(self.trained_params_bytes)} ({self.trained_params / 1e6:.2f}M); "
                "optimizer state for the adapters only"
            )
        if self.backend == "cpu":
            note = ("compiled for CPU without loop-invariant code motion (see CPU_PLAN_OPTIONS); CPU attention "
                    "also keeps its [batch, heads, q, k] scores, which fused GPU attention does not; the per-device "
                    "figures above are exact")
        else:
            note = f"compiled for {self.backend}"
        estimate = f"temporaries {gib(self.xla_temp_bytes)}, peak {gib(self.xla_peak_bytes)}"
        lines.append(f"  XLA estimate     {estimate} ({note})")
        return lines


def plan_flan_jax(
    config: T5Config, batch_size: int, lengths: Mapping[str, int], *, num_microbatches: int = 1, name: str = "flan-jax"
) -> CompiledPlan:
    """Compiles the training step for the gin-bound mesh on abstract parameters and reports its memory."""
    partitioner = partitioning.Partitioner()
    tx = optim.adafactor()
    module = Transformer(with_segment_bound(config, lengths))  # the cuDNN route's slots as training sets them
    model, params, opt_state = step_lib.abstract_state(module, tx, partitioner, lengths)
    backend = jax.devices()[0].platform
    with partitioner.activate():
        sharding = partitioner.batch_sharding()
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                 for k, v in synthetic_batch(batch_size, lengths, config.vocab_size).items()}
        train_step = step_lib.make_train_step(model, tx, partitioner, num_microbatches=num_microbatches)
        start = time.perf_counter()
        lowered = train_step.lower(params, opt_state, batch, jax.random.key(0), jnp.asarray(0, jnp.int32))
        compiled = lowered.compile(CPU_PLAN_OPTIONS if backend == "cpu" else None)
        compile_seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    trained, frozen = peft.split(config, params)
    return CompiledPlan(
        name, compile_seconds, len(jax.devices()), per_device_bytes(params), per_device_bytes(opt_state),
        per_device_bytes(batch), None if analysis is None else int(analysis.temp_size_in_bytes), xla_peak(compiled),
        backend, per_device_bytes(frozen), per_device_bytes(trained), count(frozen), count(trained),
    )


def bench_plan(
    config: T5Config,
    *,
    batch_size: int,
    lengths: Mapping[str, int],
    num_microbatches: int = 1,
    layers: Sequence[int] = (),
    json_out: str | None = None,
) -> list[CompiledPlan]:
    """Compiles the gin-configured model (or each depth in `layers`) and prints what one device holds."""
    print_device()
    print_batch(batch_size, lengths, num_microbatches, None)
    plans = []
    for name, cfg in named_depths(config, layers):
        print(f"\n{name}: {describe(cfg)}", flush=True)
        plan = plan_flan_jax(cfg, batch_size, lengths, num_microbatches=num_microbatches, name=name)
        print("\n".join(plan.lines()), flush=True)
        plans.append(plan)
    write_json(json_out, plans)
    return plans
