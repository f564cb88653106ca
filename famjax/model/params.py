"""Parameter shapes, logical axis names and initialisation of a famjax decoder.

The parameter tree (what `famjax.Transformer.params_dict()` returns, and `init_params` builds) is:

  embed        [V, D]                      token embedding (also the output matrix when tied)
  final_norm   [D]                         RMSNorm scale before the logits
  lm_head      [D, V]                      output matrix, only when not tied
  fam_prompt   [F, D]                      learned FAM prompt, only when attention == "fam" and F > 0
  layers/      one array per weight, stacked over layers (leading axis L) for the scan over layers:
    attn_norm  [L, D]        q [L, D, N, H]   k [L, D, K, H]   v [L, D, K, H]   o [L, N, H, D]
    mlp_norm   [L, D]        gate [L, D, M]   up [L, D, M]     down [L, M, D]
    fam_gate [L, D], fam_gate_bias [L, F]  the FAM write gate, only with ModelConfig.fam_gate (a famjax
                                           extension, zero at init)
    fam_prefix [L, F, D]   each layer's learned initial FAM, only with ModelConfig.fam_init="prefix" (a
                           famjax ablation; then there is no fam_prompt)

Each entry carries logical axis names (LOGICAL_AXES) that the parallelism package maps to mesh axes.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from famjax.model.config import ModelConfig

# The projection (matrix) weights of a layer: name -> number of input axes after the layer axis, i.e. a
# weight [L, *in, *out] computes x @ W over its `in` axes (q [L, D, N, H]: 1; o [L, N, H, D]: 2). The one
# table of them: LoRA's targets and adapter split (famjax.training) and the HF Linear layouts
# (famjax.conversion.hf) are derived from it.
PROJECTIONS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}

# Logical axis names of every parameter; one table so sharding rules have one place to look.
LOGICAL_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "fam_prompt": ("fam", "embed"),
    "layers": {
        "attn_norm": ("layers", "embed"),
        "q": ("layers", "embed", "q_heads", "head_dim"),
        "k": ("layers", "embed", "kv_heads", "head_dim"),
        "v": ("layers", "embed", "kv_heads", "head_dim"),
        "o": ("layers", "q_heads", "head_dim", "embed"),
        "mlp_norm": ("layers", "embed"),
        "gate": ("layers", "embed", "mlp"),
        "up": ("layers", "embed", "mlp"),
        "down": ("layers", "mlp", "embed"),
        "fam_gate": ("layers", "embed"),
        "fam_gate_bias": ("layers", "fam"),
        "fam_prefix": ("layers", "fam", "embed"),
    },
}


def param_shapes(cfg: ModelConfig) -> dict:
  """The shape of every parameter, in the layout documented above."""
  V, D, L, N, K, H, M = (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
                         cfg.head_dim, cfg.mlp_dim)
  shapes = {
      "embed": (V, D),
      "final_norm": (D,),
      "layers": {
          "attn_norm": (L, D), "q": (L, D, N, H), "k": (L, D, K, H), "v": (L, D, K, H),
          "o": (L, N, H, D), "mlp_norm": (L, D), "gate": (L, D, M), "up": (L, D, M), "down": (L, M, D),
      },
  }
  if not cfg.tie_embeddings:
    shapes["lm_head"] = (D, V)
  if cfg.has_fam and cfg.fam_init == "prefix":
    shapes["layers"]["fam_prefix"] = (L, cfg.fam_len, D)
  elif cfg.has_fam:
    shapes["fam_prompt"] = (cfg.fam_len, D)
  if cfg.fam_gate:
    shapes["layers"].update(fam_gate=(L, D), fam_gate_bias=(L, cfg.fam_len))
  return shapes


def param_key(key: jax.Array, path: str) -> jax.Array:
  """The random key of the parameter at `path` ("embed", "layers/q"): `key` folded with the CRC-32 of the
  path, so it depends on the parameter's name and on nothing else in the tree."""
  return jax.random.fold_in(key, np.uint32(zlib.crc32(path.encode())))


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
  """Random initialisation: norms at 1, matrices and embeddings ~ N(0, init_std^2), the FAM write
  gate (ModelConfig.fam_gate) at 0 (every gate 1/2).

  The FAM prompt (or prefix) is drawn like token embeddings (times sqrt(D) when `embed_scale`), so it starts on the
  distribution of the inputs it stands in for. Output projections (o, down) are scaled by
  1/sqrt(2 L), as in GPT-2, so the residual stream does not grow with depth.

  Each parameter draws from its own key, `param_key(key, path)` with path its name in the tree
  ("layers/q"): it depends only on `key` and that name, not on which other parameters exist. So two
  configs that differ by a switch adding parameters (fam_gate, fam_init="prefix", attention bswa vs fam,
  untied lm_head) start every parameter they share, of the same shape and scale, identical at the same key.
  """
  shapes = param_shapes(cfg)
  dtype = cfg.storage_dtype
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
  leaves = []
  for path, shape in flat:
    name = path[-1].key
    if name.endswith("norm"):
      leaves.append(jnp.ones(shape, dtype))
      continue
    if name.startswith("fam_gate"):
      leaves.append(jnp.zeros(shape, dtype))
      continue
    std = cfg.init_std
    if name in ("o", "down"):
      std = std / (2 * cfg.n_layers) ** 0.5
    if name in ("fam_prompt", "fam_prefix") and cfg.embed_scale:
      std = std * cfg.d_model ** 0.5
    k = param_key(key, "/".join(entry.key for entry in path))
    leaves.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)
