"""Every Pallas attention kernel lowers for a CUDA GPU from this CPU host:
forward, dK/dV, dQ and the bias gradient of the encoder's self-attention
(bidirectional bias), the decoder's (causal bias) and cross-attention (no
bias), at the GPU benchmark's shapes (launch/bench_gpu.sh), as the Triton
modules XLA would compile. Lowering only, on abstract inputs: nothing is
compiled, allocated or run. `flan-jax bench kernels` compiles them to PTX."""

import pytest

from flan_jax.bench.kernels import ATTENTIONS, MODELS, lower_kernels
from flan_jax.commands import bench as bench_command

LENGTHS = {"inputs": 1024, "targets": 256}
KERNELS = ["_forward_kernel", "_key_grad_kernel", "_query_grad_kernel"]

# Base at every attention; large (16 heads, batch 16: another grid and other
# strides, the same kernel code) at the encoder's, the one with every kernel.
CASES = [("base", "encoder"), ("base", "decoder"), ("base", "cross"), ("large", "encoder")]


@pytest.mark.parametrize(("model", "attention"), CASES)
def test_every_kernel_lowers_to_a_triton_module(model, attention):
    kernels = lower_kernels(MODELS[model], ATTENTIONS[attention], LENGTHS)
    want = KERNELS + ["_bias_grad_kernel"] * ATTENTIONS[attention].bias
    assert sorted(k.name for k in kernels) == sorted(want)
    for kernel in kernels:
        text = kernel.text()  # parses: a well-formed Triton module
        assert f"tt.func public @{kernel.name}(" in text and "tt.dot" in text, text[:2000]
        assert kernel.num_warps == 4 and kernel.num_stages == 2


def test_bench_kernels_flag_names_the_benchmarked_models():
    assert bench_command.KERNEL_MODELS == tuple(MODELS)  # named twice so that --help imports no JAX
