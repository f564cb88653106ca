"""LoRA (Hu et al. 2021) on the stacked projection weights of famjax.model.params.

A target weight W [L, *in, *out] gets adapters A [L, *in, r] and B [L, r, *out]; the effective weight is
W + (alpha / r) * A @ B. B starts at zero, so training starts from the base model exactly. The paper
(spec §7) trains rank-64 adapters on the attention and MLP projections plus the FAM prompt, base frozen,
and merges the adapters into the weights for inference: `merge` (the math is famjax.model.lora's) gives
a plain parameter dict for `famjax.Transformer(cfg, params=...)` or `famjax.to_hf`.

The parameters are split into what the optimizer trains and what stays frozen:
  LoRA:  trainable = {"lora": {name: {"a", "b"}}, "fam_prompt" (when the model has FAM), "fam_gate": {the
         layers' write-gate weights (with ModelConfig.fam_gate) and `fam_prefix` (with
         fam_init="prefix")}}, in float32; frozen = the rest, kept in the model's compute dtype (bfloat16
         in the paper configs; `split`). The weights a pretrained decoder lacks are trained in full.
  full:  trainable = every parameter; frozen = {}
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from famjax.model import lora as lora_math
from famjax.model.params import LOGICAL_AXES, PROJECTIONS
from famjax.training.config import LoraConfig

# Number of input axes (after the layer axis) of each target: famjax.model.params.PROJECTIONS.
IN_AXES = PROJECTIONS
# The per-layer weights a pretrained decoder lacks, trained in full: the FAM write gate's
# (ModelConfig.fam_gate) and the learned initial FAM of ModelConfig.fam_init="prefix" (as the prompt).
GATE = ("fam_gate", "fam_gate_bias", "fam_prefix")


def _split_new(tree: dict) -> tuple[dict, dict]:
  """(the weights a pretrained decoder lacks: fam_prompt and the gate's, the rest) of a parameter tree
  or of its logical axes."""
  new, rest = {}, dict(tree)
  if "fam_prompt" in rest:
    new["fam_prompt"] = rest.pop("fam_prompt")
  gate = {k: v for k, v in rest["layers"].items() if k in GATE}
  if gate:
    new["fam_gate"] = gate
    rest["layers"] = {k: v for k, v in rest["layers"].items() if k not in GATE}
  return new, rest


def adapter_shapes(layer_shapes: dict, cfg: LoraConfig) -> dict:
  """{target: {"a": shape, "b": shape}} for the stacked layer weight shapes `layer_shapes`."""
  out = {}
  for name in cfg.targets:
    shape = tuple(layer_shapes[name])
    split = 1 + IN_AXES[name]
    out[name] = {"a": shape[:split] + (cfg.rank,), "b": (shape[0], cfg.rank) + shape[split:]}
  return out


# One factor of each adapter has no "embed" axis (q's B [L, r, N, H], o's A [L, N, H, r], ...), so FSDP
# would leave it whole on every device (with its gradient and optimizer state: 5.7 GiB per chip of the
# 24B config on 128 chips). Its last axis gets a name the rules split over fsdp as well.
FSDP_NAMES = {"head_dim": "lora_head_dim", "mlp": "lora_mlp"}


def _fsdp_split(names: tuple) -> tuple:
  """names with the last axis FSDP_NAMES renames renamed, unless an "embed" axis already takes fsdp."""
  if "embed" in names:
    return names
  i = max(i for i, name in enumerate(names) if name in FSDP_NAMES)
  return names[:i] + (FSDP_NAMES[names[i]],) + names[i + 1:]


def adapter_logical_axes(cfg: LoraConfig) -> dict:
  """Logical axis names of the adapters, for famjax.parallel's rules."""
  out = {}
  for name in cfg.targets:
    names = LOGICAL_AXES["layers"][name]
    split = 1 + IN_AXES[name]
    out[name] = {"a": _fsdp_split(names[:split] + ("lora_rank",)),
                 "b": _fsdp_split((names[0], "lora_rank") + names[split:])}
  return out


def init_adapters(layers: dict, cfg: LoraConfig, key: jax.Array) -> dict:
  """A ~ N(0, 1/fan_in), B = 0 (so the merged weights equal the base at step 0), float32."""
  shapes = adapter_shapes({k: v.shape for k, v in layers.items()}, cfg)
  names = sorted(shapes)
  sizes = [math.prod(shapes[n]["a"]) for n in names]
  noise = jax.random.normal(key, (sum(sizes),), jnp.float32)  # one draw: one RNG kernel to compile
  out, start = {}, 0
  for name, size in zip(names, sizes):
    a_shape = shapes[name]["a"]
    fan_in = math.prod(a_shape[1:-1])
    out[name] = {"a": noise[start:start + size].reshape(a_shape) / math.sqrt(fan_in),
                 "b": jnp.zeros(shapes[name]["b"], jnp.float32)}
    start += size
  return out


def split(params: dict, cfg: LoraConfig, key: jax.Array, frozen_dtype=None) -> tuple[dict, dict]:
  """(trainable, frozen) of fresh parameters, see the module docstring. `frozen_dtype`: the dtype the
  frozen base is kept in (famjax.training.state: the model's compute dtype, bfloat16 in the paper
  configs: nothing updates those weights and the forward reads them in that dtype anyway, so they are
  stored, gathered over fsdp and saved at half the bytes); the adapters and the weights trained in full
  stay in their own dtype (float32)."""
  if not cfg.enabled:
    return params, {}
  new, frozen = _split_new(params)
  if frozen_dtype is not None:
    frozen = jax.tree.map(lambda w: w.astype(frozen_dtype), frozen)
  return {"lora": init_adapters(frozen["layers"], cfg, key), **new}, frozen


def merge(params: dict, adapters: dict, cfg: LoraConfig, dtype=None) -> dict:
  """params with every adapted weight replaced by W + scale * A @ B (famjax.model.lora.merge)."""
  return lora_math.merge(params, adapters, cfg.scale, dtype)


def combine(trainable: dict, frozen: dict, cfg: LoraConfig, dtype=None, in_scan: bool = False) -> dict:
  """The model's parameter dict from (trainable, frozen); adapters merged in `dtype` (inside jit, the
  compute dtype, so no float32 copy of the merged weights exists), or with `in_scan` by the model itself,
  a layer at a time inside its scans over layers (famjax.model.lora.merge_layer: the train step's way,
  so that only one layer's merged weights and gathered factors exist at a time)."""
  if not cfg.enabled:
    return trainable
  return lora_math.merge_trained(trainable, frozen, cfg.scale, dtype, in_scan)


def trainable_logical_axes(cfg: LoraConfig, model_axes: dict) -> tuple[dict, dict]:
  """Logical axes of (trainable, frozen), given the model's parameter axes `model_axes` (those of the
  parameters it has: famjax.training.state.model_logical_axes)."""
  if not cfg.enabled:
    return model_axes, {}
  new, frozen = _split_new(model_axes)
  return {"lora": adapter_logical_axes(cfg), **new}, frozen
