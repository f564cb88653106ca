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


# params["layers"][IN_SCAN]: adapters {name: {"a": A, "b": scale * B}} that the model merges one layer at
# a time inside its scans over layers (merge_layer), so that no step holds every layer's merged weights,
# or every layer's factors gathered, at once (famjax.training.lora.combine(..., in_scan=True)).
IN_SCAN = "lora"


def merge_layer(p: dict, dtype) -> dict:
  """One layer's parameters (a slice of params["layers"]) with its adapters p[IN_SCAN], if any, merged:
  W + A @ B in `dtype` (B comes scaled)."""
  if IN_SCAN not in p:
    return p
  p = dict(p)
  for name, ab in p.pop(IN_SCAN).items():
    r = ab["a"].shape[-1]
    a, b = ab["a"].reshape(-1, r).astype(dtype), ab["b"].reshape(r, -1).astype(dtype)
    p[name] = p[name].astype(dtype) + jnp.einsum("IR,RO->IO", a, b).reshape(p[name].shape)
  return p


def merge(params: dict, adapters: dict, scale: float, dtype=None) -> dict:
  """params with every adapted weight replaced by W + scale * A @ B (in `dtype`; default the wider of
  W's and the adapters' dtypes: a bfloat16 base with float32 adapters merges in float32).

  `adapters`: {target name: {"a": A, "b": B}} for targets among params["layers"]."""
  layers = dict(params["layers"])
  for name, ab in adapters.items():
    w = jnp.asarray(layers[name])
    dt = jnp.promote_types(w.dtype, jnp.asarray(ab["a"]).dtype) if dtype is None else dtype
    layers[name] = w.astype(dt) + delta(ab["a"], ab["b"], scale, w.shape, dt)
  return {**params, "layers": layers}


def merge_trained(trainable: dict, frozen: dict, scale: float, dtype=None, in_scan: bool = False) -> dict:
  """The model's parameter dict from a LoRA run's (trainable, frozen) split (famjax.training.lora.split):
  the frozen base, the weights trained in full (`fam_prompt`; the FAM write gate's layer weights and the
  fam_init="prefix" ablation's `fam_prefix`, both under "fam_gate") put back in place, and the adapters
  merged; with `in_scan`, left for the model to merge a layer at a time (params["layers"][IN_SCAN], B
  scaled). Without `dtype`, every parameter comes out in the trained arrays' dtype (float32), also when
  the frozen base is kept narrower (bfloat16): the model's parameter dict in its storage dtype."""
  if dtype is None and not in_scan and trainable.get("lora"):
    storage = jax.tree.leaves(trainable["lora"])[0].dtype
    frozen = jax.tree.map(lambda w: jnp.asarray(w).astype(jnp.promote_types(w.dtype, storage)), frozen)
  params = dict(frozen)
  if "fam_prompt" in trainable:
    params["fam_prompt"] = trainable["fam_prompt"]
  if "fam_gate" in trainable:
    params["layers"] = {**frozen["layers"], **trainable["fam_gate"]}
  if in_scan:
    adapters = {name: {"a": ab["a"], "b": scale * ab["b"]} for name, ab in trainable["lora"].items()}
    return {**params, "layers": {**params["layers"], IN_SCAN: adapters}}
  return merge(params, trainable["lora"], scale, dtype)
