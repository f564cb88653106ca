"""The training objective (spec §7): weighted token cross-entropy, normalised by the sum of the weights.

The data pipeline gives every target token a weight (answers 1, instructions and exemplars 0, the
repeated random segment 0.1, padding 0); the loss is sum(w * CE) / sum(w), so the weights say how much
each token counts and the batch composition does not change the scale. The optional z-loss
(`z_loss * log(Z)^2`, as in PaLM) keeps the softmax normaliser near 1, which helps low-precision logits.

`chunked_cross_entropy` is the same objective from the final hidden states: the [B, T, V] float32
logits are made a tile of tokens x vocabulary entries at a time, forward and backward (its gradient is
written by hand), so no pass holds more than one tile's logits (the paper's 256k vocabulary makes the
whole logits 16.6 GiB for one 8704-token sequence) or, under FSDP, more than one tile of the gathered
output matrix and of its gradient.
"""

from __future__ import annotations

import functools

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
                          vocab_chunk: int = 0, constrain=None) -> tuple[jax.Array, dict]:
  """weighted_cross_entropy of logits = hidden [B, T, D] @ out_weights [D, V] (float32 accumulation),
  computed in tiles of `chunk` tokens (T % chunk == 0) x `vocab_chunk` vocabulary entries (0: all V;
  padded to whole tiles when V % vocab_chunk != 0; a tile is every nv-th id), so that at most one
  [B, chunk, vocab_chunk] tile of logits exists at a time, forward and backward, and the output matrix
  is gathered (FSDP) one tile of columns at a time, in the compute dtype. `constrain(x, names)`: the sharding on the mesh
  (famjax.parallel.activation_constraint): the gathered tile is (None, "vocab"), its gradient
  ("embed", "vocab"), so each tile's gradient is reduce-scattered as soon as it is summed.

  The gradient is written by hand (`_tiled_sums`' custom VJP): per tile, d(sum w CE)/d logits =
  w (softmax - onehot) and d(sum w z logZ^2)/d logits = 2 z w logZ softmax, with logZ from the forward.
  Both passes run the vocabulary tiles in the outer loop and the token chunks in the inner one, so each
  tile of the output matrix is gathered once per pass and its gradient summed over all tokens before it
  leaves the device."""
  T = hidden.shape[1]
  if T % chunk:
    raise ValueError(f"chunked_cross_entropy: {T} tokens are not a multiple of the chunk {chunk}")
  V = out_weights.shape[1]
  tile = V if vocab_chunk <= 0 else min(vocab_chunk, V)
  sums = _tiled_sums(hidden, out_weights, targets, weights, float(z_loss), chunk, tile,
                     constrain or (lambda x, names: x))
  return _objective(sums, weight_total)


# -- the tiled loss and its gradient ('BTD' hidden, 'DV' output matrix; n token chunks of C, nv vocabulary
# tiles of Vc) -------------------------------------------------------------------------------------------
#
# Tile j holds the vocabulary ids i * nv + j (i < Vc): a strided tile, so that the output matrix reshaped
# to [D, Vc, nv] keeps the tensor-parallel split of its vocabulary axis on Vc and a tile is a local slice
# of the last axis (a contiguous tile would be a dynamic slice of the split axis, which gathers all of it).

def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[B, T, ...] -> [n, B, C, ...], n = T / C."""
  B, T = x.shape[:2]
  return jnp.swapaxes(x.reshape(B, T // chunk, chunk, *x.shape[2:]), 0, 1)


def _unchunk(x: jax.Array) -> jax.Array:
  n, B, C = x.shape[:3]
  return jnp.swapaxes(x, 0, 1).reshape(B, n * C, *x.shape[3:])


def _tiled(out_weights: jax.Array, tile: int) -> jax.Array:
  """[D, V] -> [D, Vc, nv] (padded with zero columns to nv * Vc ids): column j of the last axis is tile j."""
  D, V = out_weights.shape
  n_tiles = -(-V // tile)
  if n_tiles * tile != V:
    out_weights = jnp.pad(out_weights, ((0, 0), (0, n_tiles * tile - V)))
  return out_weights.reshape(D, tile, n_tiles)


def _tile_ids(j, tiles):
  """The vocabulary ids [Vc] of tile j."""
  tile, n_tiles = tiles.shape[1:]
  return jnp.arange(tile) * n_tiles + j


def _tile_logits(h, w_tile, ids, V):
  """logits [B, C, Vc] (float32) of one tile; the padding ids (>= V) are -inf."""
  logits = jnp.einsum("BCD,DV->BCV", h, w_tile, preferred_element_type=jnp.float32)
  return jnp.where(ids < V, logits, -jnp.inf)


def _gathered_tile(tiles, j, dtype, constrain):
  """Tile j of the output matrix [D, Vc] in the compute dtype, gathered over the FSDP axes."""
  w = jax.lax.dynamic_index_in_dim(tiles, j, axis=2, keepdims=False).astype(dtype)
  return constrain(w, (None, "vocab"))


def _forward_stats(hidden, out_weights, targets, chunk, tile, constrain):
  """Per token [n, B, C]: logZ, the target's logit and the argmax, one vocabulary tile at a time (an
  online logsumexp: running max M and sum S of exp(logit - M))."""
  V = out_weights.shape[1]
  tiles, hs, ts = _tiled(out_weights, tile), _chunks(hidden, chunk), _chunks(targets, chunk)
  n_tiles = tiles.shape[2]

  def vocab_tile(stats, j):
    w, ids = _gathered_tile(tiles, j, hidden.dtype, constrain), _tile_ids(j, tiles)

    def token_chunk(_, xs):
      h, t = xs
      logits = _tile_logits(h, w, ids, V)
      m = jnp.max(logits, axis=-1)
      s = jnp.sum(jnp.exp(logits - m[..., None]), axis=-1)
      best = jnp.argmax(logits, axis=-1).astype(jnp.int32) * n_tiles + j
      t = t.astype(jnp.int32)
      target = jnp.take_along_axis(logits, (t // n_tiles)[..., None], axis=-1)[..., 0]
      return None, (m, s, best, jnp.where(t % n_tiles == j, target, 0.0))

    _, (m, s, best, target) = jax.lax.scan(token_chunk, None, (hs, ts))
    M, S, argmax, target_logit = stats
    new_m = jnp.maximum(M, m)
    S = S * jnp.exp(M - new_m) + s * jnp.exp(m - new_m)
    # the smallest id of the tied maxima, as jnp.argmax over the whole vocabulary
    argmax = jnp.where(m > M, best, jnp.where(m == M, jnp.minimum(best, argmax), argmax))
    return (new_m, S, argmax, target_logit + target), None

  shape = ts.shape
  start = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32),
           jnp.zeros(shape, jnp.float32))
  (M, S, argmax, target_logit), _ = jax.lax.scan(vocab_tile, start, jnp.arange(n_tiles))
  return M + jnp.log(S), target_logit, argmax


def _sums_of(log_z, target_logit, argmax, targets, weights, z_loss):
  w = _chunks(weights, log_z.shape[2]).astype(jnp.float32)
  t = _chunks(targets, log_z.shape[2])
  return {"ce": jnp.sum(w * (log_z - target_logit)), "z_loss": jnp.sum(w * z_loss * jnp.square(log_z)),
          "correct": jnp.sum(w * (argmax == t)), "weight": jnp.sum(w)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _tiled_sums(hidden, out_weights, targets, weights, z_loss, chunk, tile, constrain) -> dict:
  log_z, target_logit, argmax = _forward_stats(hidden, out_weights, targets, chunk, tile, constrain)
  return _sums_of(log_z, target_logit, argmax, targets, weights, z_loss)


def _tiled_sums_fwd(hidden, out_weights, targets, weights, z_loss, chunk, tile, constrain):
  log_z, target_logit, argmax = _forward_stats(hidden, out_weights, targets, chunk, tile, constrain)
  sums = _sums_of(log_z, target_logit, argmax, targets, weights, z_loss)
  return sums, (hidden, out_weights, targets, weights, log_z)


def _tiled_sums_bwd(z_loss, chunk, tile, constrain, residuals, cotangent):
  """Cotangents of hidden and out_weights (none for the targets and the weights, which are data)."""
  hidden, out_weights, targets, weights, log_z = residuals
  D, V = out_weights.shape
  tiles = _tiled(out_weights, tile)
  hs, ts, ws = _chunks(hidden, chunk), _chunks(targets, chunk), _chunks(weights, chunk).astype(jnp.float32)
  g_ce, g_z = cotangent["ce"], cotangent["z_loss"]
  # d/d logits of g_ce * sum w (logZ - logit_t) + g_z * sum w z logZ^2: softmax * coef - onehot * w g_ce
  coef = ws * (g_ce + 2.0 * z_loss * g_z * log_z)  # [n, B, C]

  def vocab_tile(dh, j):
    w, ids = _gathered_tile(tiles, j, hidden.dtype, constrain), _tile_ids(j, tiles)

    def token_chunk(dw, xs):
      h, t, wt, lz, c = xs
      logits = _tile_logits(h, w, ids, V)
      onehot = t.astype(jnp.int32)[..., None] == ids
      d_logits = (c[..., None] * jnp.exp(logits - lz[..., None]) - (wt * g_ce)[..., None] * onehot)
      d_logits = d_logits.astype(h.dtype)
      dw = dw + jnp.einsum("BCD,BCV->DV", h, d_logits, preferred_element_type=jnp.float32)
      return dw, jnp.einsum("BCV,DV->BCD", d_logits, w, preferred_element_type=jnp.float32)

    dw, dh_tile = jax.lax.scan(token_chunk, jnp.zeros(w.shape, jnp.float32), (hs, ts, ws, log_z, coef))
    return dh + dh_tile, constrain(dw, ("embed", "vocab"))

  dh, dw = jax.lax.scan(vocab_tile, jnp.zeros(hs.shape, jnp.float32), jnp.arange(tiles.shape[2]))
  dw = jnp.moveaxis(dw, 0, -1).reshape(D, -1)[:, :V]  # [nv, D, Vc] -> [D, Vc, nv] -> [D, V]
  return (_unchunk(dh).astype(hidden.dtype), dw.astype(out_weights.dtype), None, None)


_tiled_sums.defvjp(_tiled_sums_fwd, _tiled_sums_bwd)


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
