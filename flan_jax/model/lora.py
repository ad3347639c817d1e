"""LoRA's configuration (Hu et al. 2021): rank, scale and which kernels get adapters."""

from __future__ import annotations

import dataclasses
import re

import gin

from flan_jax import errors

# LoRA targets (regular expressions searched in T5X parameter paths such as
# `encoder/layers_0/attention/query/kernel`; scanned layers read `layers/`).
LORA_QUERY_VALUE = ("attention/query/kernel$", "attention/value/kernel$")
LORA_ATTENTION = ("attention/(query|key|value|out)/kernel$",)
LORA_ATTENTION_MLP = (*LORA_ATTENTION, "mlp/wi(_[0-9]+)?/kernel$", "mlp/wo/kernel$")


def _is_pattern(value: object) -> bool:
    try:
        return isinstance(value, str) and bool(value) and re.compile(value) is not None
    except re.error:
        return False


PATTERNS = errors.Check(
    "a non-empty list of regular expressions over parameter paths",
    lambda v: isinstance(v, (list, tuple)) and bool(v) and all(map(_is_pattern, v)),
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA (Hu et al. 2021): each targeted kernel W [in, out] computes
    x W + (alpha / rank) * dropout(x) A B with A [in, rank] and B [rank, out];
    B starts at zero, so an untrained adapter leaves the model unchanged.
    Bind it as `T5Config.lora = @LoraConfig()` (see gin/peft/)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # Kernels that get adapters; every pattern must match at least one.
    targets: tuple[str, ...] = LORA_QUERY_VALUE

    def __post_init__(self) -> None:
        errors.require_fields(
            self, rank=errors.POSITIVE_INT, alpha=errors.POSITIVE_NUMBER, dropout=errors.FRACTION, targets=PATTERNS
        )
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets_path(self, path: str) -> bool:
        """Whether the kernel at `path` ('encoder/layers_0/attention/query/kernel') gets an adapter."""
        return any(re.search(pattern, path) for pattern in self.targets)


gin.constant("flan_jax.model.LORA_QUERY_VALUE", LORA_QUERY_VALUE)
gin.constant("flan_jax.model.LORA_ATTENTION", LORA_ATTENTION)
gin.constant("flan_jax.model.LORA_ATTENTION_MLP", LORA_ATTENTION_MLP)
