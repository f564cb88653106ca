"""Will it fit? Per-device memory of the training step for a config, a mesh and a per-device batch.

  python benchmarks/memory_fit.py                        # the estimate table (no compiling), markdown
  python benchmarks/memory_fit.py --compile              # plus ahead-of-time compiles of the paper's points
  python benchmarks/memory_fit.py --compile --out bench_results/memory_fit.json
  python benchmarks/memory_fit.py --load bench_results/memory_fit.json   # the table with saved compiles

Two numbers per point:

* compiled: the step is compiled ahead of time on simulated CPU devices
  (XLA_FLAGS=--xla_force_host_platform_device_count=N, one subprocess per device count) from abstract
  inputs (jax.ShapeDtypeStruct with the job's shardings: nothing is allocated) and XLA's
  memory_analysis() gives the per-device bytes: arguments (the train state and the batch) + temporaries
  + outputs not aliased to donated inputs, at the config's full depth (the layers are scanned, so a
  56-layer step compiles in about the time of a 2-layer one). These are XLA:CPU's buffer assignments;
  the TPU compiler fuses more (e.g. the softmax over the scores) and would usually need less, not more.
* estimate: `estimate()`, a formula: the train state exactly (every array's shard under famjax's
  sharding rules on the mesh), the gradients of the trained arrays, the merged LoRA weights (compute
  dtype) and their gradient (float32), the layer inputs that full remat keeps (one [b, T, D] per layer),
  and the larger of the two activation peaks of the step: the loss (the float32 logits and their
  gradient, the gathered output matrix) or one layer's backward (the attention scores of every block,
  the MLP hidden activations, the layer's gathered weights), with the number of live copies XLA:CPU
  keeps of each (ACTIVATION_COPIES: partly read from its buffer assignments, partly fitted). Against the
  13 compiles of the paper configs in docs/launch.md it is within 5%; `tests/test_memory_fit.py` checks
  it against compiles of small configs it was not fitted to.

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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from famjax.model import init_params  # noqa: E402
from famjax.parallel import MESH_AXES, logical_to_spec  # noqa: E402
from famjax.training.config import JobConfig, job_config  # noqa: E402
from famjax.training.optimizer import make_optimizer  # noqa: E402
from famjax.training.state import model_logical_axes, new_state, state_logical_axes  # noqa: E402

GIB = 2 ** 30
HBM_GIB = {"v5e": 16, "v4": 32, "v5p": 95}  # per chip
PAPER_CHIPS = {"1b": 32, "8b": 64, "24b": 128}  # the paper's "TPU v5 cores" per model
GLOBAL_BATCH = 128

# Live copies XLA:CPU keeps at a layer's backward, in units of one float32 array: the attention scores of
# all blocks (f32 scores, their gradient and softmax intermediates, a bf16 copy and the boolean mask: read
# from the buffer assignments of the 1B and 24B steps), the MLP's [b, T, mlp] activations and their
# gradients, and the layer's weights gathered over fsdp (counted as an f32 + compute-dtype pair each).
# The last two, and LAYER_INPUT_EXTRA_BYTES, are fitted to the 13 compiles of docs/launch.md.
ACTIVATION_COPIES = {"scores": 4.75, "mlp": 4.0, "layer_weights": 3.0}
LAYER_INPUT_EXTRA_BYTES = 1  # per element of a saved layer input, beyond its compute-dtype copy


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


# -- the estimate ---------------------------------------------------------------------------------------

def _shard_bytes(shape, dtype, names, mesh) -> int:
  spec = logical_to_spec(names, shape, mesh)
  count = math.prod(shape)
  for axes in spec:
    for axis in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
      count //= mesh.shape[axis]
  return count * np.dtype(dtype).itemsize


def _tree_bytes(tree, axes, mesh) -> int:
  leaves = jax.tree.leaves(jax.tree.map(lambda names, x: _shard_bytes(x.shape, x.dtype, names, mesh), axes,
                                        tree, is_leaf=lambda n: isinstance(n, tuple)))
  return int(sum(leaves))


def state_bytes(job: JobConfig, sizes: tuple[int, int, int]) -> dict:
  """Per-device bytes of the train state on a (data, fsdp, tensor) mesh, and of the gradients."""
  mesh = jax.sharding.AbstractMesh(sizes, MESH_AXES)
  cfg = job.model
  optimizer = make_optimizer(job.optimizer, job.train.steps)
  params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  state = jax.eval_shape(lambda p: new_state(p, cfg, job.lora, optimizer, 0), params)
  trainable_axes, frozen_axes = state_logical_axes(cfg, job.lora)
  trainable = _tree_bytes(state.trainable, trainable_axes, mesh)
  frozen = _tree_bytes(state.frozen, frozen_axes, mesh)
  # The optimizer state is split like the trained array it mirrors (famjax.parallel.mirror_shardings);
  # the small factored statistics (rows and columns of Adafactor's second moment) are whole.
  divisor = {}
  for names, x in zip(jax.tree.leaves(trainable_axes, is_leaf=lambda n: isinstance(n, tuple)),
                      jax.tree.leaves(state.trainable)):
    divisor[x.shape] = math.prod(x.shape) * 4 // _shard_bytes(x.shape, np.float32, names, mesh)
  optimizer_state = sum(math.prod(x.shape) * x.dtype.itemsize // divisor.get(x.shape, 1)
                        for x in jax.tree.leaves(state.opt_state))
  other = sum(math.prod(x.shape) * x.dtype.itemsize for x in (state.step, state.rng, state.rsp_fam,
                                                             state.rsp_valid))
  return {"trained": trainable, "frozen": frozen, "optimizer": int(optimizer_state), "scalars_rsp": other,
          "gradients": trainable}


def _split(size: int, mesh_size: int) -> int:
  return size // mesh_size if size % mesh_size == 0 else size


def estimate(job: JobConfig, sizes: tuple[int, int, int]) -> dict:
  """Per-device bytes of the training step, term by term, and "total" (see the module docstring)."""
  data, fsdp, tensor = sizes
  cfg, train = job.model, job.train
  if train.batch_size % (data * fsdp):
    raise ValueError(f"batch {train.batch_size} does not split over data*fsdp = {data * fsdp}")
  if cfg.remat != "full":
    raise ValueError(f"the estimate models remat='full' (the paper configs), not {cfg.remat!r}")
  b, T, D, L = train.batch_size // (data * fsdp), train.seq_len, cfg.d_model, cfg.n_layers
  c = np.dtype(cfg.compute_dtype).itemsize
  heads, kv_heads = _split(cfg.n_heads, tensor), _split(cfg.n_kv_heads, tensor)
  vocab, mlp = _split(cfg.vocab_size, tensor), _split(cfg.mlp_dim, tensor)
  out = state_bytes(job, sizes)
  if job.lora.enabled:  # W + scale * A @ B for every layer at once (compute dtype), its gradient (f32)
    axes = model_logical_axes(cfg)["layers"]
    mesh = jax.sharding.AbstractMesh(sizes, MESH_AXES)
    layer_shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))["layers"]
    merged = sum(_shard_bytes(layer_shapes[n].shape, np.uint8, axes[n], mesh) for n in job.lora.targets)
    out["lora_merged"] = merged * (c + 4)
  # what full remat keeps of each layer for the backward: its input in the compute dtype (+ fitted extra)
  out["layer_inputs"] = L * b * T * D * (c + LAYER_INPUT_EXTRA_BYTES)
  if cfg.uses_blocks:
    blocks, width = T // cfg.block_size, (cfg.mem_segments + 1) * cfg.block_size + cfg.fam_len
    scores = b * blocks * heads * cfg.block_size * width * 4
  else:  # one query chunk of block_size at a time
    scores = b * heads * cfg.block_size * T * 4
  H = cfg.head_dim
  layer_weights = (D * (heads + 2 * kv_heads) * H + heads * H * D + 3 * D * mlp) * (4 + c)
  layer = (ACTIVATION_COPIES["scores"] * scores + ACTIVATION_COPIES["mlp"] * b * T * mlp * 4 +
           ACTIVATION_COPIES["layer_weights"] * layer_weights)
  loss = 2 * b * T * vocab * 4 + vocab * D * (4 + c)  # logits and their gradient; the output matrix
  out["activation_peak"] = int(max(layer, loss))
  out["activation_peak_is"] = "loss" if loss >= layer else "layer"
  out["total"] = sum(v for k, v in out.items() if isinstance(v, int) and k != "total")
  return out


# -- compiling -------------------------------------------------------------------------------------------

def compiled_bytes(job: JobConfig) -> dict:
  """XLA's per-device memory of the job's train step on this process's devices (nothing allocated)."""
  from famjax.parallel import make_mesh
  from famjax.training.trainer import Programs, StepSpec
  programs = Programs(StepSpec.of(job, make_mesh(job.mesh)))
  start = time.perf_counter()
  stats = programs.step.lower(programs.abstract_state, programs.abstract_batch).compile().memory_analysis()
  out = {"arguments": stats.argument_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
         "outputs_not_aliased": stats.output_size_in_bytes - stats.alias_size_in_bytes,
         "compile_s": round(time.perf_counter() - start, 1)}
  out["total"] = out["arguments"] + out["temporaries"] + out["outputs_not_aliased"]
  return out


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
