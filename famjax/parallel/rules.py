"""Logical axis names -> mesh axes: the one rules table, and the shardings it implies.

Every parameter carries logical axis names (famjax.model.params.LOGICAL_AXES, and the LoRA adapters'
names in famjax.training.lora); activations and batches use "batch" and "length". A name maps to a mesh
axis, a tuple of mesh axes, or None (replicated). A dimension is only split when its size is divisible
by the mesh axes' product and no other dimension of the same array already uses those axes; otherwise
it stays replicated (so small or oddly sized arrays, e.g. a 259-token vocabulary, still work).
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
}


def logical_to_spec(names, shape, mesh: jax.sharding.Mesh, rules: dict = LOGICAL_AXIS_RULES
                    ) -> PartitionSpec:
  """The PartitionSpec of an array of `shape` whose axes have logical `names`."""
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} do not match shape {shape}")
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
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
