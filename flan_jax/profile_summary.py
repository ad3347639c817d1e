"""Where a compiled step spends its time: a JAX profiler trace, summed by model part.

`jax.profiler.trace` records every XLA op the device ran (CPU thunks, GPU
kernels) with its HLO instruction name; the compiled HLO maps each name to
the JAX operation it came from (`metadata={op_name=...}`), which carries the
Flax module path (`encoder/layers/mlp/wi_0`) and whether it ran in the
backward pass (`transpose(...)`). Grouping by those gives a profile that
reads in model terms without TensorBoard.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from collections.abc import Callable

import jax

_HLO_METADATA = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name=\"([^\"]*)\"", re.M)
# Module names that identify a part of the model, most specific first.
_PARTS = (
    "encoder_decoder_attention", "self_attention", "attention", "mlp", "relpos_bias", "logits_dense",
    "token_embedder", "pre_attention_layer_norm", "pre_self_attention_layer_norm",
    "pre_cross_attention_layer_norm", "pre_mlp_layer_norm", "encoder_norm", "decoder_norm",
)


def _part(op_name: str, hlo_name: str) -> str:
    """'encoder attention (backward)', 'optimizer', 'loss', ... for one HLO op."""
    backward = "transpose(" in op_name
    stack = "encoder" if "/encoder/" in op_name else "decoder" if "/decoder/" in op_name else ""
    part = next((p for p in _PARTS if f"/{p}/" in op_name or op_name.endswith(f"/{p}")), "")
    if part.endswith("_norm"):
        part = "layer norms"
    if not stack and not part:
        for scope in ("optimizer", "loss"):  # named scopes in flan_jax.step
            if f"/{scope}/" in op_name or f"({scope})" in op_name:  # 'jvp(loss)/...' too
                return f"{scope} ({'backward' if backward else 'forward'})" if scope == "loss" else scope
        if any(k in hlo_name for k in ("all-gather", "all-reduce", "reduce-scatter", "collective")):
            return "collectives"
        return "other (" + (op_name.split("/")[-1] or hlo_name.split(".")[0]) + ")"
    label = " ".join(x for x in (stack, part or "other") if x)
    return f"{label} ({'backward' if backward else 'forward'})"


def _op_events(path: str) -> list[tuple[str, float]]:
    """(HLO op name, seconds) of every op event on the devices in one trace file."""
    from jax.profiler import ProfileData

    events = []
    planes = list(ProfileData.from_file(path).planes)
    devices = [plane for plane in planes if plane.name.startswith("/device:")]
    for plane in devices or planes:  # on accelerators, device planes only (not host-side launches)
        lines = list(plane.lines)
        xla_ops = [line for line in lines if line.name == "XLA Ops"]  # GPU/TPU: one event per HLO op
        for line in xla_ops or lines:
            for event in line.events:
                stats = dict(event.stats)
                if xla_ops or "hlo_op" in stats:
                    events.append((str(stats.get("hlo_op", event.name)), event.duration_ns * 1e-9))
    return events


def profile_step(run: Callable[[], object], hlo_text: str, directory: str, steps: int = 3, top: int = 18) -> list[str]:
    """Traces `steps` calls of `run` into `directory` and returns summary lines:
    time per model part, then the most expensive single ops."""
    with jax.profiler.trace(directory):
        for _ in range(steps):
            out = run()
        jax.block_until_ready(out)
    files = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return [f"  (no trace written under {directory})"]
    op_names = dict(_HLO_METADATA.findall(hlo_text))
    by_part: collections.Counter[str] = collections.Counter()
    by_op: collections.Counter[str] = collections.Counter()
    for hlo_name, seconds in _op_events(files[-1]):
        op_name = op_names.get(hlo_name, "")
        by_part[_part(op_name, hlo_name)] += seconds
        by_op[f"{hlo_name}  [{op_name.removeprefix('jit(train_step)/')[-90:]}]"] += seconds
    total = sum(by_part.values())
    if not total:
        return [f"  (the trace {files[-1]} holds no XLA op events)"]
    lines = [f"  device time per step {total / steps * 1e3:.1f} ms over {steps} steps (trace: {files[-1]})", "  by model part:"]
    lines += [f"    {seconds / total:6.1%} {seconds / steps * 1e3:8.2f} ms  {part}" for part, seconds in by_part.most_common()]
    lines.append(f"  top {top} ops:")
    lines += [f"    {seconds / total:6.1%} {seconds / steps * 1e3:8.2f} ms  {op}" for op, seconds in by_op.most_common(top)]
    return lines
