"""The training objective (spec §7): weighted token cross-entropy, normalised by the sum of the weights.

The data pipeline gives every target token a weight (answers 1, instructions and exemplars 0, the
repeated random segment 0.1, padding 0); the loss is sum(w * CE) / sum(w), so the weights say how much
each token counts and the batch composition does not change the scale. The optional z-loss
(`z_loss * log(Z)^2`, as in PaLM) keeps the softmax normaliser near 1, which helps low-precision logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                           z_loss: float = 0.0, weight_total: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """(objective, metrics) for logits [B, T, V] (float32), targets [B, T] int, weights [B, T].

  objective = sum(w * (CE + z_loss * logZ^2)) / sum(w); metrics: "ce" (the weighted cross-entropy
  alone), "z_loss", "accuracy" (weighted top-1), "weight_sum". A batch whose weights are all 0 gives 0.
  `weight_total`: divide by this instead of sum(w): the whole batch's weight when these logits are one
  microbatch of it, so that the objectives and metrics of the microbatches add up to the batch's.
  """
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  ce = log_z - target_logit
  z_term = z_loss * jnp.square(log_z)
  weight_sum = jnp.sum(weights)
  denom = jnp.maximum(weight_sum if weight_total is None else weight_total, 1e-8)
  objective = jnp.sum(weights * (ce + z_term)) / denom
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {
      "ce": jnp.sum(weights * ce) / denom,
      "z_loss": jnp.sum(weights * z_term) / denom,
      "accuracy": jnp.sum(weights * correct) / denom,
      "weight_sum": weight_sum,
  }
  return objective, metrics
