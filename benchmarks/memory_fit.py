"""Will it fit? Per-device memory of the training step for a config, a mesh and a per-device batch.

  python benchmarks/memory_fit.py                        # the estimate table (no compiling), markdown
  python benchmarks/memory_fit.py --compile              # plus ahead-of-time compiles of the paper's points
  python benchmarks/memory_fit.py --compile --out bench_results/memory_fit.json
  python benchmarks/memory_fit.py --load bench_results/memory_fit.json   # the table with saved compiles

Two numbers per point, both from famjax.training.memory (its docstring says what each counts):

* compiled: `compiled_bytes()`, the step compiled ahead of time on simulated CPU devices
  (XLA_FLAGS=--xla_force_host_platform_device_count=N, one subprocess per device count), XLA's
  memory_analysis() at the config's full depth, nothing allocated.
* estimate: `estimate()`, a formula, no compiling. Against the 13 compiles of the paper configs in
  docs/launch.md it is within 5%; `tests/test_memory_fit.py` checks it against compiles of small configs
  it was not fitted to.

Sizes: the paper's global batch (128 sequences of 8704 tokens) split over data x fsdp; famjax has no
gradient accumulation, so fewer chips means more sequences per chip.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from famjax.parallel import MESH_AXES  # noqa: E402
from famjax.training.config import JobConfig, job_config  # noqa: E402
from famjax.training.memory import compiled_bytes, estimate  # noqa: E402

GIB = 2 ** 30
HBM_GIB = {"v5e": 16, "v4": 32, "v5p": 95}  # per chip
PAPER_CHIPS = {"1b": 32, "8b": 64, "24b": 128}  # the paper's "TPU v5 cores" per model
GLOBAL_BATCH = 128


# -- configs --------------------------------------------------------------------------------------------

def paper_job(size: str, *, batch_size: int = GLOBAL_BATCH, mesh: tuple = (1, -1, 1), n_layers=None,
              seq_len=None, lora_rank=None, **model) -> JobConfig:
  """configs/fam_<size>.py (the paper's recipe, LoRA rank 64) with `mesh` = (data, fsdp, tensor), and
  optionally other sizes (`n_layers`, `seq_len`, `lora_rank`, any ModelConfig field)."""
  from configs import paper
  c = paper.get_config(size).to_dict()
  c["batch_size"] = batch_size
  c["seq_len"] = seq_len or c["seq_len"]
  c["lora"]["rank"] = c["lora"]["rank"] if lora_rank is None else lora_rank
  c["data"]["mixture"] = "synthetic"  # the sizes are the config's; no data needed to lower the step
  c["mesh"] = dict(zip(MESH_AXES, mesh))
  c["model"].update(model, **({"n_layers": n_layers} if n_layers else {}))
  return job_config(c)


def resolved(job: JobConfig, devices: int) -> tuple[int, int, int]:
  return job.mesh.resolve(devices)


# -- compiling -------------------------------------------------------------------------------------------

def compiled_point(size: str, mesh: tuple, batch_size: int) -> dict:
  """compiled_bytes of the paper config at its full depth (the layers are scanned: compiling 56 layers
  costs about what 2 do, 15-30 s here, about 1 GiB of memory, no weights allocated)."""
  job = paper_job(size, batch_size=batch_size, mesh=mesh)
  return {"size": size, "mesh": list(resolved(job, jax.device_count())), "batch_size": batch_size,
          "layers": job.model.n_layers, **compiled_bytes(job)}


def compile_points(points: list[dict], timeout_s: float = 3600) -> list[dict]:
  """Compiles each point {"size", "mesh", "batch_size", "devices"} in a subprocess with that many CPU
  devices (the device count is fixed when jax starts); returns the points with their results."""
  results = []
  for devices in sorted({p["devices"] for p in points}):
    group = [p for p in points if p["devices"] == devices]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(group)], env=env,
                         capture_output=True, text=True, timeout=timeout_s)
    if out.returncode:
      raise RuntimeError(out.stderr[-4000:])
    results += json.loads(out.stdout.strip().splitlines()[-1])
  return results


def _child(points: list[dict]) -> None:
  out = []
  for p in points:
    result = compiled_point(p["size"], tuple(p["mesh"]), p["batch_size"])
    print(f"compiled {p}: {result['total'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
    out.append({**p, **result})
  print(json.dumps(out))


# -- the table -------------------------------------------------------------------------------------------

def mesh_for(chips: int, batch: int = GLOBAL_BATCH) -> tuple[int, int, int]:
  """FSDP over every chip while the batch splits (a sequence per chip at most); tensor beyond that."""
  fsdp = math.gcd(chips, batch)
  return (1, fsdp, chips // fsdp)


def fits(total_bytes: float) -> dict:
  return {chip: total_bytes <= hbm * GIB for chip, hbm in HBM_GIB.items()}


def table(sizes=("1b", "8b", "24b"), chips=(8, 16, 32, 64, 128, 256), compiled=()) -> str:
  """Markdown: per model and chip count, the mesh, the estimate, the compile (where done) and whether it
  fits each chip's HBM (judged by the compile where there is one, else by the estimate)."""
  compiled = {(r["size"], tuple(r["mesh"])): r for r in compiled}
  lines = ["| model | chips | mesh (data, fsdp, tensor) | sequences / chip | estimate GiB | compiled GiB "
           "| " + " | ".join(f"{chip} {hbm} GiB" for chip, hbm in HBM_GIB.items()) + " |",
           "|---|---:|---|---:|---:|---:|" + "---|" * len(HBM_GIB)]
  for size in sizes:
    for n in chips:
      mesh = mesh_for(n)
      est = estimate(paper_job(size, mesh=mesh), mesh)["total"]
      got = compiled.get((size, mesh), {}).get("total")
      marks = ["yes" if ok else "no" for ok in fits(est if got is None else got).values()]
      cells = [size, f"{n}{' (paper)' if PAPER_CHIPS[size] == n else ''}", str(mesh),
               str(GLOBAL_BATCH // (mesh[0] * mesh[1])), f"{est / GIB:.1f}",
               "-" if got is None else f"{got / GIB:.1f}", *marks]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="1b,8b,24b")
  parser.add_argument("--chips", default="8,16,32,64,128,256")
  parser.add_argument("--compile", action="store_true", help="also compile the points in --compile_points")
  parser.add_argument("--compile_points", default="1b:32,8b:64,24b:128,1b:128,8b:128",
                      help="size:chips pairs to compile (on as many simulated CPU devices)")
  parser.add_argument("--out", default=None, help="write the compiled results as JSON here")
  parser.add_argument("--load", default="", help="comma-separated JSON files of earlier --out results to "
                      "show in the table (without compiling again)")
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._child:
    _child(json.loads(args._child))
    return
  results = []
  for path in filter(None, args.load.split(",")):
    with open(path) as f:
      results += json.load(f)
  if args.compile:
    points = []
    for item in args.compile_points.split(","):
      size, chips = item.split(":")
      mesh = mesh_for(int(chips))
      points.append({"size": size, "mesh": list(mesh), "batch_size": GLOBAL_BATCH, "devices": int(chips)})
    compiled = compile_points(points)
    results += compiled
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(compiled, f, indent=1)
  print(table(args.sizes.split(","), [int(n) for n in args.chips.split(",")], results))


if __name__ == "__main__":
  main()
