"""Logical axis names -> mesh axes: the one rules table, and the shardings it implies.

Every parameter carries logical axis names (famjax.model.params.LOGICAL_AXES, and the LoRA adapters'
names in famjax.training.lora); batches use "batch" and "length"; the activations the model pins between
layers use ("batch", "length", "embed") and its logits ("batch", "length", "vocab"), see
`activation_constraint`. A name maps to a mesh axis, a tuple of mesh axes, or None (replicated); a name
given as None is never split. A dimension is only split when its size is divisible by the mesh axes'
product and no other dimension of the same array already uses those axes; otherwise it stays replicated
(so small or oddly sized arrays, e.g. a 259-token vocabulary, still work). The optimizer state is split like the parameters it mirrors
(`mirror_shardings`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

LOGICAL_AXIS_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "fam": None,
    "lora_rank": None,
    # the LoRA factors without an "embed" axis (famjax.training.lora.FSDP_NAMES): split over fsdp too
    "lora_head_dim": "fsdp",
    "lora_mlp": ("tensor", "fsdp"),
}


def logical_to_spec(names, shape, mesh: jax.sharding.Mesh, rules: dict = LOGICAL_AXIS_RULES
                    ) -> PartitionSpec:
  """The PartitionSpec of an array of `shape` whose axes have logical `names`."""
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} do not match shape {shape}")
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    if name is None:  # whole on every device (e.g. an FSDP-gathered weight)
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
    axes = rules[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def tree_shardings(tree, logical_axes, mesh: jax.sharding.Mesh, rules: dict = LOGICAL_AXIS_RULES):
  """NamedShardings for every array of `tree` (arrays or ShapeDtypeStructs), given a tree of the same
  structure whose leaves are tuples of logical names (e.g. LOGICAL_AXES restricted to the params)."""
  def one(names, x):
    return NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules))
  return jax.tree.map(one, logical_axes, tree, is_leaf=lambda n: isinstance(n, tuple))


def batch_sharding(mesh: jax.sharding.Mesh, batch_size: int, ndim: int = 2) -> NamedSharding:
  """A [batch, length, ...] array split over the mesh axes of the "batch" rule."""
  names = ("batch",) + ("length",) * (ndim - 1)
  return NamedSharding(mesh, logical_to_spec(names, (batch_size,) + (1,) * (ndim - 1), mesh))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def activation_constraint(mesh: jax.sharding.Mesh, rules: dict = LOGICAL_AXIS_RULES):
  """constrain(x, logical_names) -> x pinned to the rules' sharding on `mesh`, for use inside jit.

  The model calls it on the activations between layers and on the logits (famjax.model.transformer
  .forward's `constrain`), so the batch stays split over ("data", "fsdp") and FSDP gathers weights, not
  activations. On a one-device mesh it does nothing.
  """
  if mesh.size == 1:
    return lambda x, names: x

  def constrain(x, names):
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return constrain


def mirror_shardings(tree, params, param_shardings, mesh: jax.sharding.Mesh):
  """Shardings for a tree whose arrays mirror parameters, e.g. an optimizer state: an array with the shape
  of the parameter whose path its own path ends with (`.mu['layers']['q']` and `['layers']['q']`) is split
  like it; anything else (Adafactor's factored row and column statistics, counters) is replicated.

  (Left to propagation, an optimizer state initialised with zeros comes out replicated: every device
  would hold all of it.)"""
  by_path = {jax.tree_util.keystr(path): (x.shape, s) for (path, x), s in
             zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings))}

  def one(path, x):
    key = jax.tree_util.keystr(path)
    for param_path, (shape, sharding) in by_path.items():
      if key.endswith(param_path) and tuple(x.shape) == tuple(shape):
        return sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)
