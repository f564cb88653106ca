"""A predicted step time from what a compiled step does per device and what its chip can do.

Three times per step and device, each the work over the chip's published rate
(famjax.parallel.topology.CHIPS):

  compute     the matmul FLOPs the step runs (famjax.training.flops.executed_matmul_flops: recomputation
              included, every loop trip counted) / the peak dense bfloat16 FLOP/s
  memory      the bytes its instructions read and write in HBM (famjax.training.hlo.hbm_bytes) / the HBM
              bandwidth
  collectives the bytes each device receives over the interconnect (famjax.training.hlo.collectives'
              wire bytes) / half the chip's bidirectional ICI bandwidth (what can come in)

and two step times: with the collectives serialised, max(compute, memory) + collectives, and with them
overlapped with the rest, max(compute, memory, collectives). It is a roofline: every unit at its peak at
once (compute and memory overlapped by the compiler's fusion and pipelining; collectives over every ICI
link of the chip). What a step really takes is more; the point is which of the three sets the pace and
how far the step is from what the chip allows. MFU is the model FLOPs (famjax.training.flops, 3 x the
forward the architecture needs) over the step time and the peak: below 100% by what is recomputed, and
by whatever takes longer than the compute.
"""

from __future__ import annotations

from famjax.parallel.topology import Chip


def predict(chip: Chip, executed_flops: float, model_flops: float, hbm_bytes: float, wire_bytes: float) -> dict:
  """The three times (seconds), the two step times, the MFU each implies and what limits the step.

  All quantities per device per step."""
  compute = executed_flops / chip.peak_flops
  memory = hbm_bytes / chip.hbm_bandwidth
  collectives = wire_bytes / (chip.ici_bandwidth / 2)
  serialised = max(compute, memory) + collectives
  overlapped = max(compute, memory, collectives)
  terms = {"compute": compute, "memory": memory, "collectives": collectives}
  limit = max(terms, key=terms.get)
  mfu = lambda t: model_flops / t / chip.peak_flops if t > 0 else 0.0  # noqa: E731
  return {"compute_s": compute, "memory_s": memory, "collectives_s": collectives,
          "step_s_serialised": serialised, "step_s_overlapped": overlapped,
          "mfu_serialised": mfu(serialised), "mfu_overlapped": mfu(overlapped), "limited_by": limit,
          "recompute_ratio": executed_flops / model_flops if model_flops else 0.0}


def limits(prediction: dict) -> str:
  """One phrase: what bounds the step and by how much (for the tables of docs/launch.md)."""
  p = prediction
  if p["limited_by"] == "compute":
    what = f"compute; the step runs {p['recompute_ratio']:.2f}x the model FLOPs (recomputation)"
  elif p["limited_by"] == "memory":
    what = f"HBM bandwidth ({p['memory_s'] / p['compute_s']:.2f}x the compute time)"
  else:
    what = f"the interconnect ({p['collectives_s'] / p['compute_s']:.2f}x the compute time)"
  return what
