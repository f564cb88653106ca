"""The training state: everything a checkpoint holds besides the data iterator's position.

  step       int32 []          optimizer steps done
  trainable  dict              what the optimizer updates (see famjax.training.lora.split)
  frozen     dict              the rest of the parameters ({} for full fine-tuning), in the model's
                               compute dtype (LoRA's frozen base: bfloat16 in the paper configs; a
                               checkpoint that holds it in float32, as famjax wrote before, is cast
                               when it is restored)
  opt_state  optax state       of `trainable`
  rng        uint32 [2]        the run's base key; step s draws from fold_in(rng, s), so a resumed run
                               draws exactly what the uninterrupted one would have
  rsp_fam    float32 [L, F, D] Random State Passing (spec §6): the final FAM of every layer of example 0
                               of the previous step (without FAM an unused [1]: Orbax cannot save
                               empty arrays)
  rsp_valid  bool []           rsp_fam holds a state (False until the first step has run)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from famjax.model import ModelConfig
from famjax.model.params import LOGICAL_AXES, param_shapes
from famjax.training import lora
from famjax.training.config import LoraConfig


@struct.dataclass
class TrainState:
  step: jax.Array
  trainable: dict
  frozen: dict
  opt_state: Any
  rng: jax.Array
  rsp_fam: jax.Array
  rsp_valid: jax.Array

  def params(self, lora_cfg: LoraConfig, dtype=None) -> dict:
    """The model's parameter dict (LoRA adapters merged in `dtype`)."""
    return lora.combine(self.trainable, self.frozen, lora_cfg, dtype)


def model_logical_axes(cfg: ModelConfig) -> dict:
  """LOGICAL_AXES restricted to the parameters this config has."""
  shapes = param_shapes(cfg)
  return {k: (LOGICAL_AXES[k] if k != "layers" else {n: LOGICAL_AXES["layers"][n] for n in shapes["layers"]})
          for k in shapes}


def new_state(params: dict, cfg: ModelConfig, lora_cfg: LoraConfig, optimizer: optax.GradientTransformation,
              seed: int) -> TrainState:
  """The state before step 0 from initial `params` (random or loaded). Jit it for large models."""
  key = jax.random.key_data(jax.random.key(seed))
  adapter_key = jax.random.fold_in(jax.random.wrap_key_data(key), 0x10A)
  trainable, frozen = lora.split(params, lora_cfg, adapter_key, frozen_dtype=cfg.compute_dtype)
  return TrainState(
      step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
      opt_state=optimizer.init(trainable), rng=key,
      rsp_fam=jnp.zeros((cfg.n_layers, cfg.fam_len, cfg.d_model) if cfg.has_fam else (1,), jnp.float32),
      rsp_valid=jnp.zeros((), bool))


def state_logical_axes(cfg: ModelConfig, lora_cfg: LoraConfig) -> tuple[dict, dict]:
  """Logical axes of (trainable, frozen); the optimizer state and scalars are sharded by propagation."""
  return lora.trainable_logical_axes(lora_cfg, model_logical_axes(cfg))
