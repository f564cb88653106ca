"""The device mesh: axes ("data", "fsdp", "tensor"), sized by a validated MeshConfig.

  data    pure data parallelism: parameters replicated, the batch split.
  fsdp    data parallelism with parameters (and optimizer state) split along their `embed` axis.
  tensor  model parallelism: heads, the MLP hidden axis and the vocabulary split.

One axis may be -1: it takes whatever the device count leaves (the default, data=-1, uses every device
for data parallelism). The product must equal the number of devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; -1 on at most one axis means "the remaining devices"."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in MESH_AXES:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
        raise ValueError(f"mesh.{name} must be a positive integer or -1, got {value!r}")
    if sum(getattr(self, name) == -1 for name in MESH_AXES) > 1:
      raise ValueError(f"mesh: at most one axis may be -1, got {self.as_dict()}")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def resolve(self, device_count: int) -> tuple[int, int, int]:
    """Concrete axis sizes for `device_count` devices; ValueError naming the mesh if they cannot fit."""
    sizes = [getattr(self, name) for name in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if device_count % fixed:
        raise ValueError(f"mesh: {self.as_dict()} cannot be filled on {device_count} devices "
                         f"({device_count} is not divisible by {fixed})")
      sizes[sizes.index(-1)] = device_count // fixed
    elif fixed != device_count:
      raise ValueError(f"mesh: data*fsdp*tensor = {fixed} ({self.as_dict()}) must equal the number of "
                       f"devices, {device_count}")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """A mesh with axes MESH_AXES over `devices` (default: all), Auto axis types (sharding by the rules)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = config.resolve(len(devices))
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
  except (TypeError, ValueError):  # device layouts make_mesh cannot arrange (e.g. a subset of devices)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
