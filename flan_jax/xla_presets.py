"""Named sets of XLA flags for GPUs, selectable without editing code.

XLA reads `XLA_FLAGS` once, when JAX starts its first backend, so a preset
must be applied before that: `FLAN_JAX_XLA_PRESET=lhs+no_triton_gemm` with
`apply_from_env()` early in a program, or in a shell

    XLA_FLAGS="$XLA_FLAGS $(python -m flan_jax.xla_presets lhs+no_triton_gemm)" flan-jax train ...

Names combine with '+'. The flags are GPU flags; other backends accept and
ignore them. This module imports no JAX, so launchers can use it freely.
"""

from __future__ import annotations

import os
import sys

from flan_jax.errors import UserError

PRESETS: dict[str, tuple[str, ...]] = {
    # Overlap independent work (copies, collectives, compute) by scheduling on estimated latencies.
    "lhs": ("--xla_gpu_enable_latency_hiding_scheduler=true",),
    # Launch kernels one by one instead of replaying CUDA graphs (also what a profile needs to see each kernel).
    "no_command_buffer": ("--xla_gpu_enable_command_buffer=",),
    # cuBLAS for every matmul rather than Triton-generated GEMM fusions.
    "no_triton_gemm": ("--xla_gpu_enable_triton_gemm=false",),
    # Double-buffer while loops (the scanned layers): the next iteration's weight slices load during this one.
    "while_double_buffer": ("--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_DOUBLE_BUFFER",),
    # No HLO rematerialisation pass (it recomputes values to fit memory, costing time when memory is ample).
    "no_remat_pass": ("--xla_disable_hlo_passes=rematerialization",),
}
ENV_VAR = "FLAN_JAX_XLA_PRESET"


def flags(names: str) -> list[str]:
    """The flags of '+'-joined preset names ('' or 'none': no flags)."""
    out: list[str] = []
    for name in filter(None, names.strip().split("+")):
        if name == "none":
            continue
        if name not in PRESETS:
            raise UserError(f"XLA preset {name!r}: not one of {', '.join(sorted(PRESETS))} (join several with '+')")
        out.extend(PRESETS[name])
    return out


def with_flags(environ: dict[str, str], names: str) -> dict[str, str]:
    """A copy of `environ` whose XLA_FLAGS end with the presets' flags (for a child process)."""
    env = dict(environ)
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), *flags(names)]))
    return env


def apply_from_env() -> str:
    """Applies `FLAN_JAX_XLA_PRESET` to this process's XLA_FLAGS; returns the names
    applied. Must run before JAX starts a backend (a UserError says so if not)."""
    names = os.environ.get(ENV_VAR, "")
    if not flags(names):
        return ""
    if "jax" in sys.modules:
        from jax._src import xla_bridge  # private, but the one place that knows

        if xla_bridge.backends_are_initialized():
            raise UserError(f"{ENV_VAR}={names}: JAX has already started, so XLA would ignore the flags")
    os.environ.update(with_flags(dict(os.environ), names))
    return names


if __name__ == "__main__":
    try:
        print(" ".join(flags(sys.argv[1] if len(sys.argv) > 1 else os.environ.get(ENV_VAR, ""))))
    except UserError as e:
        sys.exit(str(e))
