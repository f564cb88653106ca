"""One training step as a pure function of (TrainState, batch): RPO and RSP (spec §6), the weighted loss,
gradients of the trainable parameters only, the optimizer update. And its evaluation twin, eval_sums: the
same forward without RSP or RPO.

Mixed precision: the master parameters (and optimizer state) stay in their storage dtype (float32);
the model casts them to its compute dtype (bfloat16) inside the forward, so gradients arrive in float32.
All randomness comes from fold_in(state.rng, state.step): no Python-side random draws, so a step is a
deterministic function of the state and the batch, and RSP's coin flip is a `jnp.where`, not a
recompile.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from famjax.model import ModelConfig, transformer
from famjax.training import lora
from famjax.training.config import FamTrainingConfig, LoraConfig
from famjax.training.loss import chunked_cross_entropy, weighted_cross_entropy
from famjax.training.state import TrainState


def random_position_offset(key: jax.Array, batch: int, theta: float) -> jax.Array:
  """RPO (spec §6): per example, U(0, 2*pi*theta) with probability 1/2, else 0. float32 [batch].

  famjax computes rotary angles from block-relative positions, so in exact arithmetic a common offset
  cancels; what the offset changes is float32 rounding: angles as large (and as coarsely rounded) as the
  absolute angles of the paper's implementation. It reproduces that training setting; it is not a shift
  of what the model can see. Never used at evaluation or inference.
  """
  k_coin, k_value = jax.random.split(key)
  coin = jax.random.bernoulli(k_coin, 0.5, (batch,))
  value = jax.random.uniform(k_value, (batch,), jnp.float32, 0.0, 2 * math.pi * theta)
  return jnp.where(coin, value, 0.0)


def starting_fam(prompt_state: transformer.StreamState, saved: jax.Array, use_saved: jax.Array):
  """RSP (spec §6): every example starts from `saved` [L, F, D] (residual included, from_prompt False)
  when `use_saved`, else from the prompt's FAM (from_prompt True). Returns the updated StreamState."""
  fam = prompt_state.fam
  from_saved = jnp.broadcast_to(saved[:, None].astype(fam.dtype), fam.shape)
  return prompt_state.replace(
      fam=jnp.where(use_saved, from_saved, fam),
      fam_from_prompt=jnp.broadcast_to(~use_saved, prompt_state.fam_from_prompt.shape))


def split_microbatches(x: jax.Array, k: int) -> jax.Array:
  """[B, ...] -> [k, B/k, ...], microbatch j holding rows j, j+k, j+2k, ...: a batch split over devices
  in contiguous blocks of rows gives every microbatch an equal share of every device's rows."""
  return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def make_train_step(model_cfg: ModelConfig, lora_cfg: LoraConfig, fam_cfg: FamTrainingConfig,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule, z_loss: float = 0.0,
                    mask_between_examples: bool = False, constrain=None, microbatches: int = 1,
                    loss_chunk: int = 0, loss_vocab_chunk: int = 0):
  """train_step(state, batch) -> (state, metrics). batch: "inputs", "targets" int32 [B, T], "weights"
  float32 [B, T], optional "segment_ids" int32 [B, T] (1, 2, ... per packed example, 0 for padding:
  padding is masked as keys and kept out of FAM updates; with `mask_between_examples` tokens attend
  only within their example and every example starts from the initial FAM). `constrain`: the activations' sharding on the mesh
  (famjax.parallel.activation_constraint; None on one device). metrics: float32 scalars (loss, ce,
  z_loss, accuracy, weight_sum, grad_norm, learning_rate, rsp_used).

  `microbatches` k > 1 (gradient accumulation): the batch is split into k microbatches
  (split_microbatches) run one after another in a lax.scan, each loss divided by the whole batch's
  weight, the gradients and metrics summed: the same update and metrics as k = 1, up to float summation
  order, with the activations of one microbatch alive at a time. RSP keeps the final FAM of microbatch
  0's first row, which is the batch's first row, as with k = 1.

  `loss_chunk` > 0: the loss from the final hidden states, `loss_chunk` tokens x `loss_vocab_chunk`
  vocabulary entries (0: all) of logits at a time (famjax.training.loss.chunked_cross_entropy): the same
  objective without [B, T, V] float32 logits, and the output matrix gathered a tile at a time."""
  use_rsp = model_cfg.has_fam and fam_cfg.rsp_prob > 0

  def loss_fn(trainable, frozen, batch, rsp_fam, use_saved, offset, weight_total):
    params = lora.combine(trainable, frozen, lora_cfg, model_cfg.compute_dtype, in_scan=True)
    inputs = batch["inputs"]
    state = transformer.empty_state(params, model_cfg, inputs.shape[0])
    if use_rsp:
      state = starting_fam(state, rsp_fam, use_saved)
    segments = batch.get("segment_ids")
    out, final = transformer.forward(
        params, model_cfg, inputs, state, max_pending=0,
        token_mask=None if segments is None else segments > 0, position_offset=offset,
        segment_ids=segments if mask_between_examples else None, constrain=constrain,
        output="hidden" if loss_chunk else "logits")
    if loss_chunk:
      loss, metrics = chunked_cross_entropy(out, transformer.output_weights(params, model_cfg),
                                            batch["targets"], batch["weights"], z_loss, weight_total,
                                            chunk=loss_chunk, vocab_chunk=loss_vocab_chunk,
                                            constrain=constrain)
    else:
      loss, metrics = weighted_cross_entropy(out, batch["targets"], batch["weights"], z_loss, weight_total)
    return loss, (metrics, final.fam[:, 0])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(trainable, frozen, batch, rsp_fam, use_saved, offset):
    """(loss, metrics, last FAM, gradients) of the whole batch, in `microbatches` pieces."""
    weight_total = jnp.sum(batch["weights"].astype(jnp.float32))
    if microbatches == 1:
      (loss, (metrics, last_fam)), grads = grad_fn(trainable, frozen, batch, rsp_fam, use_saved, offset,
                                                   weight_total)
      return loss, metrics, last_fam, grads
    pieces = jax.tree.map(lambda x: split_microbatches(x, microbatches), batch)
    offsets = None if offset is None else split_microbatches(offset, microbatches)

    def accumulate(carry, piece):
      mb, mb_offset = piece
      (loss, (metrics, fam)), grads = grad_fn(trainable, frozen, mb, rsp_fam, use_saved, mb_offset,
                                              weight_total)
      return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), fam

    (loss_shape, (metrics_shape, _)), _ = jax.eval_shape(
        grad_fn, trainable, frozen, jax.tree.map(lambda x: x[0], pieces), rsp_fam, use_saved,
        None if offsets is None else offsets[0], weight_total)
    zero = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    start = (zero(loss_shape), jax.tree.map(zero, metrics_shape),
             jax.tree.map(jnp.zeros_like, trainable))  # zeros_like: sharded as the parameters
    (loss, metrics, grads), fams = jax.lax.scan(accumulate, start, (pieces, offsets))
    return loss, metrics, fams[0], grads  # microbatch 0's first row is the batch's row 0

  def train_step(state: TrainState, batch: dict):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_rsp, k_rpo = jax.random.split(key)
    batch_size = batch["inputs"].shape[0]
    use_saved = (state.rsp_valid & (state.step >= fam_cfg.rsp_start_step)
                 & jax.random.bernoulli(k_rsp, fam_cfg.rsp_prob)) if use_rsp else jnp.zeros((), bool)
    offset = random_position_offset(k_rpo, batch_size, model_cfg.rope_theta) if fam_cfg.rpo else None
    loss, metrics, last_fam, grads = gradients(state.trainable, state.frozen, batch, state.rsp_fam,
                                               use_saved, offset)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    if use_rsp:
      new_state = new_state.replace(rsp_fam=jax.lax.stop_gradient(last_fam).astype(jnp.float32),
                                    rsp_valid=jnp.ones((), bool))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                   rsp_used=use_saved.astype(jnp.float32))
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

  return train_step


def eval_sums(params: dict, cfg: ModelConfig, batch: dict, *, mask_between_examples: bool,
              constrain=None) -> jax.Array:
  """float32 [3]: a batch's weighted CE sum, weighted correct-prediction sum and weight sum, with the
  training forward (token masks, masked packing, sharding) from the learned FAM prompt (no RSP, RPO)."""
  inputs = batch["inputs"]
  state = transformer.empty_state(params, cfg, inputs.shape[0])
  segments = batch.get("segment_ids")
  logits, _ = transformer.forward(
      params, cfg, inputs, state, max_pending=0, token_mask=None if segments is None else segments > 0,
      segment_ids=segments if mask_between_examples else None, constrain=constrain)
  _, m = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
  return jnp.stack([m["ce"] * m["weight_sum"], m["accuracy"] * m["weight_sum"], m["weight_sum"]])
