"""Token-level cross-entropy with T5X's z-loss and loss normalisation.

The loss normalisation offers T5X's choices (t5x/losses.py,
`SpecialLossNormalizingFactor` and `get_loss_normalizing_factor_and_weights`):
the summed token losses are divided by

  a number                  that constant (T5X's finetuning of the public T5 /
                            T5.1.1 checkpoints: 2048 * 114 = 233472, their
                            pretraining batch times target length);
  'NUM_REAL_TARGET_TOKENS'  the batch's real (non-padding) target tokens;
  'NUM_TOTAL_TARGET_TOKENS' all target positions, padding included
                            (batch * target length);
  'AVERAGE_PER_SEQUENCE'    each token's loss is first divided by the real
                            tokens of its sequence (its packed segment), then
                            the batch by its number of sequences: every
                            example weighs the same, whatever its length;
  None                      nothing: the summed loss (T5X's default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from flan_jax import errors

REAL_TOKENS = "NUM_REAL_TARGET_TOKENS"
TOTAL_TOKENS = "NUM_TOTAL_TARGET_TOKENS"
PER_SEQUENCE = "AVERAGE_PER_SEQUENCE"
SPECIAL_FACTORS = (REAL_TOKENS, TOTAL_TOKENS, PER_SEQUENCE)
LossNormalizingFactor = float | str | None

NORMALIZING_FACTOR = errors.Check(
    f"a positive number, one of {', '.join(map(repr, SPECIAL_FACTORS))}, or None (the summed loss)",
    lambda v: v is None or v in SPECIAL_FACTORS or errors.POSITIVE_NUMBER.test(v),
)


def objective_weights(
    loss_normalizing_factor: LossNormalizingFactor, weights: jax.Array, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Each token's weight in the objective: `weights`, except under
    'AVERAGE_PER_SEQUENCE', where each is divided by the summed weights of its
    sequence (the packed segment `segment_ids` names; the whole row unpacked)."""
    if loss_normalizing_factor != PER_SEQUENCE:
        return weights
    if segment_ids is None:
        segment_ids = jnp.zeros(weights.shape, jnp.int32)
    length = weights.shape[-1]

    def per_row(w: jax.Array, segments: jax.Array) -> jax.Array:
        # A row's segment ids are 1..k (0 on padding), so length + 1 bins hold them all.
        totals = jax.ops.segment_sum(w, segments, num_segments=length + 1)
        return w / jnp.maximum(totals[segments], 1e-9)

    return jax.vmap(per_row)(weights, segment_ids)


def normalizer_count(
    loss_normalizing_factor: LossNormalizingFactor, weights: jax.Array, objective: jax.Array
) -> jax.Array:
    """What a special factor divides by, for one batch (summed over microbatches it
    is the whole batch's); 0 for a constant or None, which count nothing."""
    if loss_normalizing_factor == REAL_TOKENS:
        return weights.sum()
    if loss_normalizing_factor == TOTAL_TOKENS:
        return jnp.asarray(weights.size, jnp.float32)
    if loss_normalizing_factor == PER_SEQUENCE:
        return objective.sum()  # each sequence's tokens sum to 1: the number of sequences
    return jnp.zeros((), jnp.float32)


def normalize(loss_normalizing_factor: LossNormalizingFactor, objective_sum: jax.Array,
              count: jax.Array) -> jax.Array:
    """The loss: `objective_sum` divided as `loss_normalizing_factor` says (see the module doc)."""
    if loss_normalizing_factor is None:
        return objective_sum
    if isinstance(loss_normalizing_factor, str):
        return objective_sum / jnp.maximum(count, 1.0)  # a batch without targets gives 0, not NaN
    return objective_sum / jnp.asarray(loss_normalizing_factor, jnp.float32)


def cross_entropy_loss(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    z_loss: float = 1e-4,
    label_smoothing: float = 0.0,
    loss_normalizing_factor: LossNormalizingFactor = REAL_TOKENS,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted cross-entropy (+ z-loss), normalised as `loss_normalizing_factor` says.

    Args:
      logits: [batch, length, vocab] float32.
      targets: [batch, length] int token ids.
      weights: [batch, length] loss weights (0 on padding).
      z_loss: coefficient of log(Z)**2, which keeps the softmax normaliser near
        1 (T5X's stabiliser).
      label_smoothing: mass spread uniformly over the vocabulary.
      loss_normalizing_factor: T5X's choices (the module doc).
      segment_ids: [batch, length] packed segments (decoder_segment_ids), for
        'AVERAGE_PER_SEQUENCE'; None: one sequence per row.

    Returns:
      (loss, metrics) where metrics hold the sums and counts: per real token
      (cross_ent_sum, z_loss_sum, num_tokens, correct, for logging) and the
      objective's (objective_sum, normalizer_count; `normalize` makes the loss).
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [b, l]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [b, l]
    if label_smoothing:
        soft = optax.smooth_labels(jax.nn.one_hot(targets, vocab), label_smoothing)
        ce = optax.softmax_cross_entropy(logits, soft)
    else:
        ce = log_z - target_logit  # optax's softmax_cross_entropy_with_integer_labels, sharing log_z
    weights = weights.astype(jnp.float32)
    z = z_loss * jnp.square(log_z)
    objective = objective_weights(loss_normalizing_factor, weights, segment_ids)
    # The target is the top token when its logit reaches the maximum. The same
    # as argmax == target except on exact ties, and far cheaper on CPUs, where
    # argmax over the vocabulary (a reduction carrying indices) cost 6% of a
    # small model's training step. (A comparison carries no gradient.)
    correct = (target_logit >= jnp.max(logits, axis=-1)).astype(jnp.float32) * weights
    metrics = {
        "cross_ent_sum": (ce * weights).sum(),
        "z_loss_sum": (z * weights).sum(),
        "num_tokens": weights.sum(),
        "correct": correct.sum(),
        "objective_sum": ((ce + z) * objective).sum(),
        "normalizer_count": normalizer_count(loss_normalizing_factor, weights, objective),
    }
    loss = normalize(loss_normalizing_factor, metrics["objective_sum"], metrics["normalizer_count"])
    return loss, metrics
