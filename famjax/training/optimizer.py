"""Optimizers (Adafactor as in the paper, spec §7, or AdamW), learning-rate schedules, gradient clipping.

Adafactor follows the paper's "beta1 0.9, decay 0.99" in the Praxis/Lingvo sense: first moment
(momentum) beta1, and a second-moment estimate (factored over the last two axes of large matrices) that
decays at the constant rate `decay_rate` with Adam's bias correction. Updates are clipped to RMS
`update_clip` (Adafactor's d) and, when `param_scale`, scaled by each parameter's RMS (relative step
sizes); off by default so the learning rate is absolute, as the paper's constant 1e-4 / 3e-3 with LoRA
adapters that start at zero need.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from famjax.training.config import OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup over `warmup_steps`, then constant or cosine decay to final_learning_rate_ratio."""
  peak = cfg.learning_rate
  warmup = min(cfg.warmup_steps, total_steps)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    after = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1), cfg.final_learning_rate_ratio)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _bias_corrected_decay(step, decay):
  """Adam-style debiasing of a constant second-moment decay: the weight of the new gradient at step t
  (counted from 0) is (1 - decay) / (1 - decay^(t+1)), so the first step uses the gradient alone."""
  t = jnp.asarray(step, jnp.float32) + 1.0
  return decay * (1.0 - decay ** (t - 1.0)) / (1.0 - decay ** t)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """The full update rule: global-norm clipping (if max_grad_norm > 0), then Adafactor or AdamW."""
  schedule = learning_rate_schedule(cfg, total_steps)
  chain = []
  if cfg.max_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(cfg.max_grad_norm))
  if cfg.name == "adamw":
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*chain)
  chain.append(optax.scale_by_factored_rms(decay_rate=cfg.decay_rate, epsilon=1e-30,
                                           decay_rate_fn=_bias_corrected_decay))
  if cfg.update_clip > 0:
    chain.append(optax.clip_by_block_rms(cfg.update_clip))
  chain.append(optax.scale_by_learning_rate(schedule, flip_sign=False))
  if cfg.param_scale:
    chain.append(optax.scale_by_param_block_rms())
  if cfg.b1 > 0:
    chain.append(optax.ema(cfg.b1, debias=False))
  if cfg.weight_decay > 0:
    chain.append(optax.add_decayed_weights(cfg.weight_decay * cfg.learning_rate))
  chain.append(optax.scale(-1.0))
  return optax.chain(*chain)
