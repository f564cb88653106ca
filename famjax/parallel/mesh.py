"""The device mesh: axes ("data", "fsdp", "tensor"), sized by a validated MeshConfig.

  data    pure data parallelism: parameters replicated, the batch split.
  fsdp    data parallelism with parameters (and optimizer state) split along their `embed` axis.
  tensor  model parallelism: heads, the MLP hidden axis and the vocabulary split.

`data`, `fsdp` and `tensor` are the sizes inside one slice (the devices joined by the fast interconnect,
ICI). One of them may be -1: it takes whatever the slice's device count leaves (the default, data=-1,
uses every device for data parallelism). A multislice job (several TPU slices joined by the data-center
network, DCN) also sets `dcn_data` and/or `dcn_fsdp`, the sizes across slices: the mesh axis `data` then
has dcn_data x data devices, slice-major, and the same for `fsdp`. The product of all sizes must equal the
number of devices, and dcn_data x dcn_fsdp the number of slices. DCN is much slower than ICI, so across
slices put data parallelism (dcn_data; dcn_fsdp only when the parameters do not fit otherwise) and never
tensor parallelism.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

MESH_AXES = ("data", "fsdp", "tensor")
DCN_AXES = ("dcn_data", "dcn_fsdp")  # across-slice sizes of "data" and "fsdp"; "tensor" never crosses DCN


class MeshShape(NamedTuple):
  """Concrete sizes, each (data, fsdp, tensor): `ici` inside one slice, `dcn` across slices."""

  ici: tuple[int, int, int]
  dcn: tuple[int, int, int]

  @property
  def total(self) -> tuple[int, int, int]:
    return tuple(i * d for i, d in zip(self.ici, self.dcn))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """In-slice axis sizes (-1 on at most one: the slice's remaining devices) and across-slice sizes."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1

  def __post_init__(self):
    for name in MESH_AXES:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
        raise ValueError(f"mesh.{name} must be a positive integer or -1, got {value!r}")
    if sum(getattr(self, name) == -1 for name in MESH_AXES) > 1:
      raise ValueError(f"mesh: at most one axis may be -1, got {self.as_dict()}")
    for name in DCN_AXES:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mesh.{name} must be a positive integer (the number of slices along that axis), "
                         f"got {value!r}")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def num_slices(self) -> int:
    return self.dcn_data * self.dcn_fsdp

  def shape(self, device_count: int, slices: int | None = None) -> MeshShape:
    """In-slice and across-slice sizes for `device_count` devices; ValueError naming the fields if they
    cannot fit. `slices`: how many slices the devices span (checked against dcn_data x dcn_fsdp)."""
    if slices is not None and slices != self.num_slices:
      if self.num_slices == 1:
        raise ValueError(f"mesh: the devices span {slices} slices, but dcn_data*dcn_fsdp = 1: set "
                         f"mesh.dcn_data (data parallelism across slices) so that dcn_data*dcn_fsdp = "
                         f"{slices}")
      raise ValueError(f"mesh: dcn_data*dcn_fsdp = {self.dcn_data}*{self.dcn_fsdp} = {self.num_slices} "
                       f"must equal the number of slices the devices span, {slices} (devices without a "
                       f"slice_index, e.g. CPU or GPU, or a single TPU slice, are one slice)")
    if device_count % self.num_slices:
      raise ValueError(f"mesh: dcn_data*dcn_fsdp = {self.num_slices} slices do not divide the "
                       f"{device_count} devices")
    per_slice = device_count // self.num_slices
    where = ("the number of devices" if self.num_slices == 1 else
             f"the devices per slice ({device_count} devices / {self.num_slices} slices)")
    sizes = [getattr(self, name) for name in MESH_AXES]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if per_slice % fixed:
        raise ValueError(f"mesh: {self.as_dict()} cannot be filled on {per_slice} devices "
                         f"({per_slice} is not divisible by {fixed})")
      sizes[sizes.index(-1)] = per_slice // fixed
    elif fixed != per_slice:
      raise ValueError(f"mesh: data*fsdp*tensor = {fixed} ({self.as_dict()}) must equal {where}, {per_slice}")
    return MeshShape(tuple(sizes), (self.dcn_data, self.dcn_fsdp, 1))

  def resolve(self, device_count: int, slices: int | None = None) -> tuple[int, int, int]:
    """The mesh's axis sizes (data, fsdp, tensor), across slices included; see `shape`."""
    return self.shape(device_count, slices).total


def slice_count(devices: Sequence[Any]) -> int:
  """How many slices `devices` span (their distinct `slice_index`; a device without one is slice 0)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(config: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
  """The devices arranged as a [data, fsdp, tensor] array for `config`.

  One slice: jax's topology-aware arrangement (mesh_utils.create_device_mesh), or the devices in order
  where it has none (CPU, a subset of devices). Several slices: mesh_utils.create_hybrid_device_mesh,
  each slice arranged by its ICI topology and the slices laid out along dcn_data x dcn_fsdp, so only the
  dcn axes' collectives cross the data-center network.
  """
  devices = list(devices)
  shape = config.shape(len(devices), slice_count(devices))
  # v5e slices have a 2D torus that 3-axis meshes must split (jax.make_mesh does the same)
  split = devices[0].device_kind in ("TPU v5 lite", "TPU v5e")
  if config.num_slices > 1:
    return mesh_utils.create_hybrid_device_mesh(shape.ici, shape.dcn, devices,
                                                allow_split_physical_axes=split)
  try:
    return mesh_utils.create_device_mesh(shape.ici, devices, allow_split_physical_axes=split)
  except (AssertionError, NotImplementedError, ValueError):  # layouts it cannot arrange (a subset)
    return np.asarray(devices).reshape(shape.ici)


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """A mesh with axes MESH_AXES over `devices` (default: all), Auto axis types (sharding by the rules)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(device_grid(config, devices), MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
