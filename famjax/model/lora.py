"""Merging LoRA adapters (Hu et al. 2021) into the stacked projection weights of famjax.model.params.

A target weight W [L, *in, *out] with adapters A [L, *in, r] and B [L, r, *out] acts as
W + scale * A @ B (scale = alpha / r). Training them is famjax.training.lora's business; merging is
what a trained run's weights need for inference (famjax.workdir.model, famjax.to_hf), so it lives here,
below both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def delta(a: jax.Array, b: jax.Array, scale: float, shape: tuple, dtype) -> jax.Array:
  """scale * A @ B reshaped to the weight's `shape` [L, *in, *out], computed in `dtype`."""
  L, r = a.shape[0], a.shape[-1]
  a2 = jnp.asarray(a).reshape(L, -1, r).astype(dtype)
  b2 = jnp.asarray(b).reshape(L, r, -1).astype(dtype)
  return (scale * jnp.einsum("LIR,LRO->LIO", a2, b2)).reshape(shape)


def merge(params: dict, adapters: dict, scale: float, dtype=None) -> dict:
  """params with every adapted weight replaced by W + scale * A @ B (in `dtype`, default W's dtype).

  `adapters`: {target name: {"a": A, "b": B}} for targets among params["layers"]."""
  layers = dict(params["layers"])
  for name, ab in adapters.items():
    w = jnp.asarray(layers[name])
    dt = w.dtype if dtype is None else dtype
    layers[name] = w.astype(dt) + delta(ab["a"], ab["b"], scale, w.shape, dt)
  return {**params, "layers": layers}


def merge_trained(trainable: dict, frozen: dict, scale: float, dtype=None) -> dict:
  """The model's parameter dict from a LoRA run's (trainable, frozen) split (famjax.training.lora.split):
  the frozen base, the weights trained in full (`fam_prompt`; the FAM write gate's layer weights and the
  fam_init="prefix" ablation's `fam_prefix`, both under "fam_gate") put back in place, and the adapters
  merged."""
  params = dict(frozen)
  if "fam_prompt" in trainable:
    params["fam_prompt"] = trainable["fam_prompt"]
  if "fam_gate" in trainable:
    params["layers"] = {**frozen["layers"], **trainable["fam_gate"]}
  return merge(params, trainable["lora"], scale, dtype)
