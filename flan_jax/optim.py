"""Optimizer: optax's Adafactor with T5X's defaults and a constant learning rate."""

from __future__ import annotations

import gin
import optax


@gin.configurable
def adafactor(
    learning_rate: float = 1e-3,
    *,
    decay_rate: float = 0.8,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    min_dim_size_to_factor: int = 128,
    momentum: float | None = None,
    weight_decay_rate: float | None = None,
    factored: bool = True,
    warmup_steps: int = 0,
) -> optax.GradientTransformation:
    """Adafactor as T5X configures it for finetuning (Flan used lr 1e-3, constant).

    `decay_rate` 0.8 gives the second-moment decay 1 - (step + 1)**-0.8;
    `multiply_by_parameter_scale` scales updates by each parameter's RMS, so
    the learning rate is relative. An optional linear warmup precedes the
    constant rate.
    """
    schedule: optax.Schedule = optax.constant_schedule(learning_rate)
    if warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), schedule], [warmup_steps]
        )
    return optax.adafactor(
        learning_rate=schedule,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold,
        momentum=momentum,
        weight_decay_rate=weight_decay_rate,
        factored=factored,
    )
