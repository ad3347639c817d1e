"""Model FLOPs of a T5 training step and the peak they are measured against (MFU).

Model FLOPs count the matrix products the architecture needs for one step,
2 * m * n * k each, forward once and backward twice (3x forward), over every
position of the packed rows (padding included, as it is computed), and not
the recomputation that rematerialisation adds: the MFU convention of the PaLM
paper and MaxText. Norms, softmax and elementwise work are left out.
"""

from __future__ import annotations

import time

import jax

from flan_jax.model import T5Config

# Published dense bf16 peaks per chip, TFLOP/s, matched against
# `device.device_kind` (first match wins, so specific names come first).
PUBLISHED_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
)


def forward_flops_per_example(config: T5Config, input_length: int, target_length: int) -> float:
    """Matmul FLOPs of one forward pass over one (input, target) row."""
    e, m, v = config.emb_dim, config.mlp_dim, config.vocab_size
    hd = config.num_heads * config.head_dim
    li, lt = input_length, target_length
    num_wi = len(config.mlp_activations)

    def mlp(length: int) -> float:
        return 2 * length * e * m * (num_wi + 1)

    def attention(q_len: int, kv_len: int) -> float:
        projections = 2 * q_len * e * hd * 2 + 2 * kv_len * e * hd * 2  # q, out; k, v
        scores_and_mix = 2 * q_len * kv_len * hd * 2  # q k^T and weights @ v
        return projections + scores_and_mix

    encoder_layer = attention(li, li) + mlp(li)
    decoder_layer = attention(lt, lt) + attention(lt, li) + mlp(lt)
    logits = 2 * lt * e * v
    return config.num_encoder_layers * encoder_layer + config.num_decoder_layers * decoder_layer + logits


def train_flops_per_step(config: T5Config, batch_size: int, input_length: int, target_length: int) -> float:
    """Model FLOPs of one training step (forward + backward) on a global batch."""
    return 3.0 * batch_size * forward_flops_per_example(config, input_length, target_length)


def published_peak_flops(device: jax.Device) -> float | None:
    """The published dense bf16 peak (FLOP/s) of one chip, or None if unknown."""
    kind = device.device_kind
    for name, tflops in PUBLISHED_BF16_PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


def measured_matmul_peak_flops(dtype: str = "bfloat16", size: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul on the default device, the best of `repeats`.

    The reference on CPUs, which publish no peak; on accelerators a check of
    what the chip reaches in practice (an H200 gives about 790 of its 989).
    """
    device = jax.devices()[0]
    size = size or (1024 if device.platform == "cpu" else 8192)
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(dtype: str, device: jax.Device | None = None) -> tuple[float, str]:
    """(FLOP/s, where it comes from) for MFU: an accelerator's published bf16
    peak, else (CPUs, unknown chips) a measured matmul in the model's dtype."""
    device = device or jax.devices()[0]
    published = published_peak_flops(device)
    if device.platform != "cpu" and published is not None:
        return published, f"published bf16 peak of {device.device_kind}"
    return measured_matmul_peak_flops(dtype), f"measured {dtype} matmul on {device.device_kind}"


def system_peak_flops(dtype: str) -> tuple[float, str]:
    """Peak FLOP/s of every device in the run, for MFU of a whole step.

    Accelerators add up; a host's CPU "devices" (fake ones for testing
    sharding) share its cores, so CPUs count once per process.
    """
    device = jax.devices()[0]
    peak, source = peak_flops(dtype, device)
    count = jax.process_count() if device.platform == "cpu" else jax.device_count()
    return peak * count, f"{count} x {peak / 1e12:.2f} TFLOP/s, {source}"
