"""`flan-jax bench kernels`: the Pallas attention kernels as a GPU would build
them, from any host: each kernel's Triton IR (lowered for CUDA without a GPU),
compiled by Triton to PTX for sm_90a (H100), with per kernel the PTX
instructions (whole kernel and its main loop), barriers (bar.sync) and what
ptxas reports (registers, spill bytes).

Lowering needs only JAX; compiling needs the `triton` package (`pip install
triton`: PTX and ptxas come with it, no GPU or CUDA install needed). Batch
and heads only change the grid and the strides, so base and large give the
same kernels, to a few instructions.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxlib.mlir import ir  # the MLIR that jaxlib's Triton dialect registers with
from jaxlib.triton import dialect as triton_dialect

from flan_jax.errors import UserError
from flan_jax.model.pallas_attention import t5_attention

TRITON_CALL = "__gpu$xla.gpu.triton"
INSTALL_HINT = "bench kernels: triton is not installed; `pip install triton` (no GPU needed) to compile the kernels to PTX"


@dataclasses.dataclass(frozen=True)
class Model:
    """Batch and heads as `launch/bench_gpu.sh` runs the model; T5's head size."""

    batch: int
    heads: int
    head_dim: int = 64


MODELS = {"base": Model(batch=32, heads=12), "large": Model(batch=16, heads=16)}


@dataclasses.dataclass(frozen=True)
class Attention:
    """One attention call of the model: query and key lengths, bias, causality."""

    query: str  # "inputs" or "targets": whose length
    key: str
    bias: bool
    causal: bool


# The model's three attention calls, and the self-attentions without a bias
# (the bias's cost is the difference).
ATTENTIONS = {
    "encoder": Attention("inputs", "inputs", bias=True, causal=False),
    "decoder": Attention("targets", "targets", bias=True, causal=True),
    "cross": Attention("targets", "inputs", bias=False, causal=False),
    "encoder_nobias": Attention("inputs", "inputs", bias=False, causal=False),
    "decoder_nobias": Attention("targets", "targets", bias=False, causal=True),
}


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One pallas_call as XLA gets it: its name, Triton module (MLIR bytecode) and launch settings."""

    name: str
    module: bytes
    num_warps: int
    num_stages: int

    def text(self) -> str:
        """The Triton module as MLIR text (what Triton's compiler reads as a .ttir file)."""
        context = ir.Context()
        triton_dialect.register_dialect(context)
        context.load_all_available_dialects()
        with context:
            return str(ir.Module.parse(self.module))


def lower_kernels(
    model: Model, attention: Attention, lengths: dict[str, int], dtype: str = "bfloat16"
) -> list[TritonKernel]:
    """The Triton kernels of the attention call's forward and backward pass,
    lowered for CUDA on abstract inputs (nothing is allocated or compiled)."""
    lq, lk = lengths[attention.query], lengths[attention.key]
    query = jax.ShapeDtypeStruct((model.batch, lq, model.heads, model.head_dim), jnp.dtype(dtype))
    key = jax.ShapeDtypeStruct((model.batch, lk, model.heads, model.head_dim), jnp.dtype(dtype))
    segments = jax.ShapeDtypeStruct((model.batch, lq), jnp.int32), jax.ShapeDtypeStruct((model.batch, lk), jnp.int32)
    table = jax.ShapeDtypeStruct((model.heads, 32), jnp.float32) if attention.bias else None

    def loss(q, k, v, q_seg, k_seg, table):
        out = t5_attention(q, k, v, q_seg, k_seg, table, causal=attention.causal, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.grad(loss, argnums=(0, 1, 2, 5) if attention.bias else (0, 1, 2))
    lowered = jax.jit(grad).trace(query, key, key, *segments, table).lower(lowering_platforms=("cuda",))
    return triton_calls(lowered.compiler_ir("stablehlo").operation)


def triton_calls(op) -> list[TritonKernel]:
    """Every Triton custom call in a StableHLO module, in program order."""
    found = []
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                inner = inner.operation
                if inner.name == "stablehlo.custom_call" and _target(inner) == TRITON_CALL:
                    found.append(_kernel(ir.DictAttr(inner.attributes["mhlo.backend_config"])))
                found.extend(triton_calls(inner))
    return found


def _target(op) -> str:
    return ir.StringAttr(op.attributes["call_target_name"]).value


def _kernel(config: ir.DictAttr) -> TritonKernel:
    def number(key: str) -> int:
        return ir.IntegerAttr(config[key]).value

    return TritonKernel(
        ir.StringAttr(config["name"]).value, ir.StringAttr(config["ir"]).value_bytes,
        number("num_warps"), number("num_stages"),
    )


# --------------------------------------------------------------- PTX figures


@dataclasses.dataclass(frozen=True)
class PtxFigures:
    instructions: int
    loop_instructions: int  # the longest loop body (between a label and its backward branch)
    barriers: int  # bar.sync / barrier.sync in the whole kernel
    loop_barriers: int
    registers: int
    spill_stores: int  # bytes, as ptxas reports them
    spill_loads: int


_LABEL = re.compile(r"^(\$\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$\w+);")
_BARRIER = re.compile(r"\b(?:bar|barrier)\.sync\b")


def _instructions(ptx: str) -> list[str]:
    """The PTX lines that are instructions or labels (no directives, comments, braces)."""
    lines = (line.split("//")[0].strip() for line in ptx.splitlines())
    return [line for line in lines if _LABEL.match(line) or (line.endswith(";") and not line.startswith("."))]


def _longest_loop(lines: list[str]) -> list[str]:
    """The instructions from a label to the furthest backward branch to it."""
    labels = {m.group(1): n for n, line in enumerate(lines) if (m := _LABEL.match(line))}
    spans = [(labels[m.group(1)], n) for n, line in enumerate(lines)
             if (m := _BRANCH.search(line)) and labels.get(m.group(1), n + 1) < n]
    if not spans:
        return []
    start, end = max(spans, key=lambda span: span[1] - span[0])
    return lines[start: end + 1]


def ptx_figures(ptx: str, ptxas_report: str) -> PtxFigures:
    """Counts from the PTX text and from `ptxas -v` output."""
    lines = _instructions(ptx)
    loop = _longest_loop(lines)

    def count(body: list[str]) -> int:
        return sum(1 for line in body if not _LABEL.match(line))

    def reported(pattern: str) -> int:
        match = re.search(pattern, ptxas_report)
        return int(match.group(1)) if match else -1

    return PtxFigures(
        instructions=count(lines), loop_instructions=count(loop),
        barriers=sum(bool(_BARRIER.search(line)) for line in lines),
        loop_barriers=sum(bool(_BARRIER.search(line)) for line in loop),
        registers=reported(r"Used (\d+) registers"),
        spill_stores=reported(r"(\d+) bytes spill stores"), spill_loads=reported(r"(\d+) bytes spill loads"),
    )


# Triton's compiler runs in a child process: its nanobind objects outlive the
# command's exit (`process.exit_without_collecting`), and nanobind then
# reports them as leaks on stderr.
_COMPILE = """
import json, os, sys
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
folder, capability = sys.argv[1], int(sys.argv[2])
with open(os.path.join(folder, "jobs.json")) as f:
    jobs = json.load(f)
for job in jobs:
    target = GPUTarget("cuda", capability, 32)
    compiled = triton.compile(os.path.join(folder, job["source"]), target=target, options=job["options"])
    with open(os.path.join(folder, job["ptx"]), "w") as f:
        f.write(compiled.asm["ptx"])
print(get_ptxas(capability).path)
"""


def compile_to_ptx(kernels: list[TritonKernel], capability: int = 90) -> list[tuple[str, str]]:
    """(PTX, `ptxas -v` report) of each kernel for sm_{capability}(a), by the installed Triton."""
    with tempfile.TemporaryDirectory() as folder:
        jobs = []
        for n, kernel in enumerate(kernels):
            with open(os.path.join(folder, f"{n}.ttir"), "w") as f:
                f.write(kernel.text())
            options = {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages}
            jobs.append({"source": f"{n}.ttir", "ptx": f"{n}.ptx", "options": options})
        with open(os.path.join(folder, "jobs.json"), "w") as f:
            json.dump(jobs, f)
        child = subprocess.run([sys.executable, "-c", _COMPILE, folder, str(capability)],
                               capture_output=True, text=True, check=True)
        ptxas = child.stdout.strip().splitlines()[-1]
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        results = []
        for job in jobs:
            ptx_file = os.path.join(folder, job["ptx"])
            report = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", ptx_file, "-o", ptx_file + ".cubin"],
                                    capture_output=True, text=True, check=True)
            with open(ptx_file) as f:
                results.append((f.read(), report.stdout + report.stderr))
    return results


def triton_version() -> str | None:
    """The installed Triton's version (not imported here: see _COMPILE); None without it."""
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


# (with bias, without): the pairs whose loops the bias's cost is read from.
BIAS_PAIRS = (("encoder", "encoder_nobias"), ("decoder", "decoder_nobias"))


def bench_kernels(
    models: list[str], lengths: dict[str, int], write: Callable[[str], None] = print
) -> dict[tuple[str, str, str], PtxFigures]:
    """Prints a row per (model, attention, kernel), then each kernel's loop
    with the bias against without; returns the figures."""
    version = triton_version()
    if version is None:
        raise UserError(INSTALL_HINT)
    write(f"Triton {version}, sm_90a, lengths {lengths['inputs']}/{lengths['targets']}")
    write(f"{'model':6} {'attention':15} {'kernel':20} {'PTX':>6} {'loop':>6} {'bar':>4} {'loop bar':>8} "
          f"{'regs':>5} {'spill st/ld B':>14}")
    names = [(model, attention, kernel) for model in models for attention, call in ATTENTIONS.items()
             for kernel in lower_kernels(MODELS[model], call, lengths)]
    figures = {}
    for (model, attention, kernel), compiled in zip(names, compile_to_ptx([k for *_, k in names])):
        f = figures[model, attention, kernel.name] = ptx_figures(*compiled)
        write(f"{model:6} {attention:15} {kernel.name:20} {f.instructions:6} {f.loop_instructions:6} "
              f"{f.barriers:4} {f.loop_barriers:8} {f.registers:5} {f.spill_stores:>7}/{f.spill_loads:<6}")
    for model in models:
        for biased, plain in BIAS_PAIRS:
            names = [name for (m, a, name) in figures if m == model and a == plain]
            ratios = [f"{name.strip('_').removesuffix('_kernel')} "
                      f"{figures[model, biased, name].loop_instructions / figures[model, plain, name].loop_instructions:.2f}x"
                      for name in names]
            write(f"{model} {biased} loop PTX with bias / without: {', '.join(ratios)}")
    return figures


def main() -> None:
    """`python -m flan_jax.bench.kernels`: base at 1024/256 (or `flan-jax bench kernels`, with flags)."""
    try:
        bench_kernels(["base"], {"inputs": 1024, "targets": 256})
    except UserError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()

