"""TPU slices by name ("v5e:4x8", "v5p:4x4x4", "v6e:8x8"), to compile for them on a machine without one.

libtpu (the TPU compiler; `pip install libtpu`, which `jax[tpu]` selects) describes a slice from its
generation and chip grid: `devices(name)` gives its compile-only devices (they carry `coords`, the device
kind, one process per host), on which a mesh is built and a program lowered and compiled exactly as on
the slice; nothing runs. The process needs no TPU, only JAX_PLATFORMS=cpu so that jax does not look
for one; `compile_env()` is the rest of its environment (`COMPILE_ONLY_ENV` silences libtpu's search for
its own host, and TPU_LIBRARY_PATH points at a libtpu kept off the import path).

Where libtpu lives: `make setup-test` installs it into `.venv/libtpu` (`LIBTPU_DIR`), not among the
environment's packages: a jax that can import libtpu probes for a TPU in every process, which on a
machine without one costs seconds and prints libtpu's warnings in every CPU run (training, the tests,
evaluation). Only the processes that compile for a TPU topology get its path. A libtpu installed as a
package (`pip install jax[tpu]`, on a TPU VM) works as well.

`CHIPS` holds each generation's published per-chip figures (Google Cloud's TPU pages): the peak dense
bfloat16 FLOP/s, HBM capacity and bandwidth, and the bidirectional inter-chip interconnect (ICI)
bandwidth. famjax.training.roofline turns a compiled step's counts into a step time with them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import sys

# What libtpu wants to find in the environment when no TPU host is there (set only in processes that
# compile for a TPU topology): without them it prints warnings while looking for its accelerator type,
# its workers and the GCE metadata server; and it takes a lock meant for the one process that drives a
# TPU host's chips, which would stop a second compiling process (a test beside a benchmark).
COMPILE_ONLY_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
                    "TPU_WORKER_HOSTNAMES": "localhost", "TPU_STDERR_LOG_LEVEL": "3", "TPU_MIN_LOG_LEVEL": "3",
                    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
# The libtpu kept off the import path (`pip install --target`; the Makefile's setup-test).
LIBTPU_DIR = os.path.join(sys.prefix, "libtpu")
LIBTPU_VERSION = "0.0.42.1"  # the version jax[tpu]==0.10.2 selects (requirements-tpu.txt)
INSTALL_LIBTPU = (f"pip install --no-deps --upgrade --target {LIBTPU_DIR} libtpu=={LIBTPU_VERSION} "
                  "(what `make setup-test` runs)")


def libtpu_path() -> str | None:
  """The libtpu.so a TPU compile loads: $TPU_LIBRARY_PATH, LIBTPU_DIR's, or an importable libtpu's."""
  for path in (os.environ.get("TPU_LIBRARY_PATH"), os.path.join(LIBTPU_DIR, "libtpu", "libtpu.so")):
    if path and os.path.isfile(path):
      return path
  spec = importlib.util.find_spec("libtpu")
  if spec is not None and spec.origin:
    path = os.path.join(os.path.dirname(spec.origin), "libtpu.so")
    return path if os.path.isfile(path) else None
  return None


def compile_env() -> dict[str, str]:
  """The environment of a process that compiles for TPU topologies (with JAX_PLATFORMS=cpu):
  COMPILE_ONLY_ENV and TPU_LIBRARY_PATH. RuntimeError saying how to install libtpu when there is none."""
  path = libtpu_path()
  if path is None:
    raise RuntimeError(f"compiling for a TPU topology needs libtpu (the TPU compiler): {INSTALL_LIBTPU}")
  return {**COMPILE_ONLY_ENV, "TPU_LIBRARY_PATH": path}


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's published figures."""

  generation: str
  device_kind: str  # jax.Device.device_kind of its devices
  peak_flops: float  # dense bfloat16 FLOP/s
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s, bidirectional, all links of the chip together
  chips_per_host: int  # of a multi-host slice (smaller slices sit on one host)
  dims: int  # 2: a 2D torus (AxB), 3: a 3D torus (AxBxC)


GIB = 2 ** 30
CHIPS = {
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s, ICI 400 GB/s (4 ports)
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GIB, 819e9, 400e9, 4, 2),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, ICI 1200 GB/s
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GIB, 2765e9, 1200e9, 4, 3),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, ICI 800 GB/s (4 ports)
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GIB, 1638e9, 800e9, 4, 2),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice (or `num_slices` of them, joined by the data-center network) described by its name."""

  name: str  # "v5e:4x8"
  chip: Chip
  grid: tuple[int, ...]  # chips along each torus axis
  num_slices: int = 1

  @property
  def chips(self) -> int:
    """Chips of all slices."""
    return math.prod(self.grid) * self.num_slices

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """The chip grid of one host: a whole small slice (up to 8 chips of v5e/v6e, 4 of v5p), else 2x2."""
    grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
    if math.prod(grid) <= (8 if self.chip.dims == 2 else 4):
      return grid
    return (2, 2, 1)

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.chips_per_host_bounds)


def parse(name: str, num_slices: int = 1) -> Slice:
  """A Slice from "GENERATION:AxB" (v5e, v6e: a 2D grid) or "v5p:AxBxC"; ValueError saying the form."""
  m = re.fullmatch(r"(v5e|v5p|v6e):(\d+(?:x\d+)+)", name.strip())
  if not m:
    raise ValueError(f"TPU topology {name!r}: expected GENERATION:AxB (v5e, v6e) or v5p:AxBxC, e.g. v5e:4x8, "
                     f"v5p:4x4x4 (generations: {', '.join(CHIPS)})")
  chip = CHIPS[m.group(1)]
  grid = tuple(int(d) for d in m.group(2).split("x"))
  if len(grid) != chip.dims or min(grid) < 1:
    raise ValueError(f"TPU topology {name!r}: a {chip.generation} slice has {chip.dims} axes of at least one "
                     f"chip each, e.g. {chip.generation}:{'x'.join(['4'] * chip.dims)}")
  if num_slices < 1:
    raise ValueError(f"num_slices={num_slices} must be >= 1")
  return Slice(name.strip(), chip, grid, num_slices)


def devices(name: str, num_slices: int = 1) -> list:
  """The compile-only devices of the slice `name` (num_slices of them), in the order libtpu gives.
  Needs libtpu; call it in a process started with compile_env() and JAX_PLATFORMS=cpu."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  tpu = parse(name, num_slices)
  try:
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=f"{tpu.chip.generation}:{'x'.join(map(str, tpu.grid))}",
        chip_config_name="default", chips_per_host_bounds=tpu.chips_per_host_bounds, num_slices=num_slices)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise RuntimeError(f"compiling for {name} needs libtpu (the TPU compiler) and this process found none: "
                         f"{INSTALL_LIBTPU}, and start the process with famjax.parallel.topology.compile_env()"
                         ) from None
    raise
  return list(description.devices)


def chip_of(device) -> Chip | None:
  """The Chip of a jax device (by its device_kind), or None for anything else (CPU, GPU)."""
  return next((c for c in CHIPS.values() if c.device_kind == getattr(device, "device_kind", None)), None)


def name_of(devices_) -> str | None:
  """The slice name ("v5e:4x8") of a list of TPU devices, from their kind and coordinates; None for
  other devices or when they carry no coordinates."""
  devices_ = list(devices_)
  chip = chip_of(devices_[0]) if devices_ else None
  coords = [getattr(d, "coords", None) for d in devices_]
  if chip is None or any(c is None for c in coords):
    return None
  grid = [max(c[i] for c in coords) + 1 for i in range(chip.dims)]
  return f"{chip.generation}:{'x'.join(map(str, grid))}"


# The slice shapes of each generation by chip count (Google Cloud's tables of v5e/v6e and v5p slices).
SHAPES = {
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
        256: (4, 8, 8), 512: (8, 8, 8)},
}


def slice_for(generation: str, chips: int) -> str:
  """The name of the `generation` slice with `chips` chips ("v5e", 32 -> "v5e:4x8"); ValueError when that
  generation has no slice of that size."""
  if generation not in CHIPS:
    raise ValueError(f"TPU generation {generation!r}: one of {', '.join(CHIPS)}")
  shapes = SHAPES[CHIPS[generation].dims]
  if chips not in shapes:
    raise ValueError(f"{generation} has no slice of {chips} chips (sizes: {sorted(shapes)}); name one with "
                     "--topology")
  return f"{generation}:{'x'.join(map(str, shapes[chips]))}"
