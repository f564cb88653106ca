"""The training objective (spec §7): weighted token cross-entropy, normalised by the sum of the weights.

The data pipeline gives every target token a weight (answers 1, instructions and exemplars 0, the
repeated random segment 0.1, padding 0); the loss is sum(w * CE) / sum(w), so the weights say how much
each token counts and the batch composition does not change the scale. The optional z-loss
(`z_loss * log(Z)^2`, as in PaLM) keeps the softmax normaliser near 1, which helps low-precision logits.

`chunked_cross_entropy` is the same objective from the final hidden states: the [B, T, V] float32
logits are made a chunk of tokens at a time in a scan whose body is rematerialised, so neither the
forward nor the backward holds more than one chunk's logits (the paper's 256k vocabulary makes them
16.6 GiB for one 8704-token sequence).
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
  return _objective(_sums(logits, targets, weights, z_loss), weight_total)


def chunked_cross_entropy(hidden: jax.Array, out_weights: jax.Array, targets: jax.Array, weights: jax.Array,
                          z_loss: float = 0.0, weight_total: jax.Array | None = None, *, chunk: int,
                          constrain=None) -> tuple[jax.Array, dict]:
  """weighted_cross_entropy of logits = hidden [B, T, D] @ out_weights [D, V] (float32 accumulation),
  computed `chunk` tokens at a time (T % chunk == 0). `constrain(x, names)`: the logits' sharding."""
  B, T, D = hidden.shape
  if T % chunk:
    raise ValueError(f"chunked_cross_entropy: {T} tokens are not a multiple of the chunk {chunk}")
  n = T // chunk
  split = lambda x: jnp.swapaxes(x.reshape(B, n, chunk, *x.shape[2:]), 0, 1)  # noqa: E731  [n, B, C, ...]

  @jax.checkpoint  # the backward recomputes a chunk's logits instead of keeping them
  def one_chunk(sums, xs):
    h, t, w = xs
    logits = jnp.einsum("BCD,DV->BCV", h, out_weights.astype(h.dtype), preferred_element_type=jnp.float32)
    if constrain is not None:
      logits = constrain(logits, ("batch", "length", "vocab"))
    return jax.tree.map(jnp.add, sums, _sums(logits, t, w, z_loss)), None

  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(one_chunk, dict.fromkeys(_SUMS, zero), (split(hidden), split(targets), split(weights)))
  return _objective(sums, weight_total)


_SUMS = ("ce", "z_loss", "correct", "weight")


def _sums(logits, targets, weights, z_loss) -> dict:
  """The weighted sums of CE, z-loss and correct predictions, and the weight, of some tokens."""
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"ce": jnp.sum(weights * (log_z - target_logit)), "z_loss": jnp.sum(weights * z_loss * jnp.square(log_z)),
          "correct": jax.lax.stop_gradient(jnp.sum(weights * correct)), "weight": jnp.sum(weights)}


def _objective(sums: dict, weight_total) -> tuple[jax.Array, dict]:
  denom = jnp.maximum(sums["weight"] if weight_total is None else weight_total, 1e-8)
  metrics = {"ce": sums["ce"] / denom, "z_loss": sums["z_loss"] / denom,
             "accuracy": sums["correct"] / denom, "weight_sum": sums["weight"]}
  return (sums["ce"] + sums["z_loss"]) / denom, metrics
