"""A job's train step compiled ahead of time for a target, and what it needs and does per step.

  report = aot.compile_report(job, devices)   # devices: famjax.parallel.topology.devices("v5e:4x8"),
                                              # or this process's CPU devices

The step is the one famjax.train runs: famjax.training.trainer.Programs with the job's shardings, lowered
from abstract state and batch (ShapeDtypeStructs: nothing is allocated) and compiled by the target's
compiler: the TPU compiler (libtpu) for a TPU topology, XLA:CPU for CPU devices. One record (a dict):

  platform, devices, device_kind, topology  where it was compiled for
  arguments, outputs_not_aliased, temporaries, total   memory_analysis() per device, bytes
  hbm_bytes_capacity, fits                   against the chip's HBM (TPU; CPU: None)
  flops, bytes_accessed                      cost_analysis() as XLA reports it (every loop body once)
  collectives                                per kind: count, bytes, wire_bytes per step (loops per trip;
                                             famjax.training.hlo)
  hbm_bytes                                  bytes the step reads and writes in HBM per step (hlo)
  executed_flops, model_flops                per device: the matmuls the step runs (recomputation
                                             included), and famjax's model FLOPs (3 x the forward)
  roofline                                   famjax.training.roofline.predict (TPU only)
  compile_s, error                           error: the compiler's out-of-memory message (then fits False,
                                             temporaries and total from it; the rest None)
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax

from famjax.parallel import make_mesh, topology
from famjax.training import flops as flops_lib
from famjax.training import hlo, memory, roofline
from famjax.training.config import JobConfig, check_platform


class Compiled(NamedTuple):
  """A job's step compiled for some devices: its Programs, the traced step (a jaxpr), and the compiled
  executable, or the StepDoesNotFit the compiler's out-of-memory error became (then compiled is None)."""

  job: JobConfig
  devices: list
  programs: object  # famjax.training.trainer.Programs
  jaxpr: object
  compiled: object | None
  does_not_fit: memory.StepDoesNotFit | None
  compile_s: float


def compile_step(job: JobConfig, devices) -> Compiled:
  """The job's train step traced, lowered and compiled for `devices` (TPU compile-only devices, or CPU)."""
  from famjax.training.trainer import Programs, StepSpec  # pylint: disable=import-outside-toplevel
  devices = list(devices)
  check_platform(job.model, devices[0].platform)
  programs = Programs(StepSpec.of(job, make_mesh(job.mesh, devices)))
  start = time.perf_counter()
  traced = programs.step.trace(programs.abstract_state, programs.abstract_batch)
  try:
    compiled, error = memory.compile_step(traced.lower(), (programs.abstract_state, programs.abstract_batch),
                                          devices), None
  except memory.StepDoesNotFit as e:
    compiled, error = None, e
  return Compiled(job, devices, programs, traced.jaxpr, compiled, error, round(time.perf_counter() - start, 1))


def report(step: Compiled, with_hlo: bool = True) -> dict:
  """The record of the module docstring. `with_hlo`: also read the optimised HLO (collectives, HBM bytes;
  a few seconds for a large step)."""
  job, devices = step.job, step.devices
  chip = topology.chip_of(devices[0])
  record = {"platform": devices[0].platform, "devices": len(devices), "device_kind": devices[0].device_kind,
            "topology": topology.name_of(devices), "hbm_bytes_capacity": chip.hbm_bytes if chip else None,
            "error": None, "compile_s": step.compile_s, "collectives": None, "hbm_bytes": None,
            "roofline": None, "flops": None, "bytes_accessed": None,
            "executed_flops": flops_lib.executed_matmul_flops(step.jaxpr) / len(devices),
            "model_flops": flops_lib.train_flops_per_step(job.model, job.train.batch_size,
                                                          job.train.seq_len) / len(devices)}
  if step.does_not_fit is not None:  # the compiler's sizes: the arguments + the temporaries it needed
    e = step.does_not_fit
    held = memory.arguments_bytes((step.programs.abstract_state, step.programs.abstract_batch))
    record.update(fits=False, error=str(e), arguments=held, temporaries=e.needed - held, outputs_not_aliased=0,
                  total=e.needed, hbm_bytes_capacity=e.available)
    return record
  m = step.compiled.memory_analysis()
  record.update(arguments=m.argument_size_in_bytes, temporaries=m.temp_size_in_bytes,
                outputs_not_aliased=m.output_size_in_bytes - m.alias_size_in_bytes)
  record["total"] = record["arguments"] + record["temporaries"] + record["outputs_not_aliased"]
  record["fits"] = None if chip is None else record["total"] <= chip.hbm_bytes
  cost = step.compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  record.update(flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"))
  if with_hlo:
    text = step.compiled.as_text()
    found = hlo.collectives(text, len(devices))
    record["unknown_loops"] = found.pop("unknown_loops")
    record["collectives"] = found
    record["hbm_bytes"] = hlo.hbm_bytes(text)
    if chip is not None:
      wire = sum(c["wire_bytes"] for c in found.values())
      record["roofline"] = roofline.predict(chip, record["executed_flops"], record["model_flops"],
                                            record["hbm_bytes"], wire)
  return record


def compile_report(job: JobConfig, devices, with_hlo: bool = True) -> dict:
  """report(compile_step(job, devices)): the record of the module docstring."""
  return report(compile_step(job, devices), with_hlo)


def cpu_devices(count: int):
  """`count` of this process's CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N sets how
  many it has); ValueError saying so when it has fewer."""
  cpus = jax.devices("cpu")
  if len(cpus) < count:
    raise ValueError(f"{count} CPU devices needed, this process has {len(cpus)}: start it with "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={count}")
  return cpus[:count]
