"""Will it fit? Per-device memory of the training step of the paper's configs, and the fewest microbatches
that fit a chip's HBM; on a TPU topology, also what the step does per step and how long it should take.

  python benchmarks/memory_fit.py                        # the estimate table (no compiling), markdown
  python benchmarks/memory_fit.py --compile              # plus the microbatch search, compiled on XLA:CPU
  python benchmarks/memory_fit.py --compile --out bench_results/memory_fit.json
  python benchmarks/memory_fit.py --load bench_results/memory_fit.json   # the tables from saved compiles
  python benchmarks/memory_fit.py --compile --baseline  # and the step as the paper configs define it
  python benchmarks/memory_fit.py --platform=tpu --out bench_results/memory_fit_tpu.json   # the TPU compiler
  python benchmarks/memory_fit.py --platform=tpu --topology=v5e:8x8 --job=WORKDIR/config.json  # a run's job

Two platforms:

* cpu (the default; `--compile`): the step compiled ahead of time on simulated CPU devices
  (XLA_FLAGS=--xla_force_host_platform_device_count=N, one subprocess per device count), XLA:CPU's
  memory_analysis() at the config's full depth (`famjax.training.memory.compiled_bytes`), beside
  `estimate()`, a formula (tests/test_memory_fit.py checks it against compiles of small configs).
  For each point of --compile_points the microbatch count is searched (1, 2, 4, ... until one fits
  --hbm_gib) with the memory-saving settings of the options (--loss_chunk, --loss_vocab_chunk,
  --attention_chunk, --mlp_chunk); --one_sequence adds one sequence per chip, --baseline the step as the
  paper defines it (configs/fam_<size>.py:fam,unchunked).
* tpu (`--platform=tpu`, needs libtpu: requirements-tpu.txt, which `make setup-test` installs into
  .venv/libtpu): the step compiled by the TPU compiler for a TPU topology described by name
  (famjax.parallel.topology: v5e, v5p, v6e; chips and hosts from the name), no TPU needed. The points:
  configs/fam_1b.py, fam_8b.py and fam_24b.py as shipped (their own settings, "as_shipped": true) on the
  --generation slice of --compile_points' chips (v5e: 32 = 4x8, 64 = 8x8, 128 = 8x16), one 1B sequence per
  chip (--one_sequence), the 1B point with attention_impl="pallas" (--pallas), and with --baseline the
  paper's unchunked step (recorded as not fitting, with the size the compiler needed). Each record
  (famjax.training.aot.compile_report): memory_analysis per chip, cost_analysis (flops, bytes accessed), the
  collectives of the optimised HLO per step (loops counted per trip), HBM bytes per step, the matmul FLOPs
  the step runs and famjax's model FLOPs, and the predicted step time (famjax.training.roofline: serialised
  and overlapped collectives, MFU, what limits it); beside it XLA:CPU's compile of the same step
  (--cpu_compare, on by default) and the estimate. `--job FILE` (a run's config.json) compiles that job for
  --topology and, when it does not fit, searches the memory-saving settings and microbatch counts (the
  command a job that does not fit names).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from famjax.model import ModelConfig  # noqa: E402
from famjax.parallel import MESH_AXES  # noqa: E402
from famjax.training.config import JobConfig, job_config  # noqa: E402
from famjax.training.memory import compiled_bytes, estimate  # noqa: E402

GIB = 2 ** 30
HBM_GIB = {"v5e": 16, "v4": 32, "v5p": 95}  # per chip
PAPER_CHIPS = {"1b": 32, "8b": 64, "24b": 128}  # the paper's "TPU v5 cores" per model
GLOBAL_BATCH = 128
SEQ_LEN = 8704  # configs/paper.py: 2^9 x 17 tokens
# ModelConfig.attention_chunk (query blocks whose attention scores exist at once; 0: all) where this
# famjax has it.
HAS_ATTENTION_CHUNK = "attention_chunk" in {f.name for f in dataclasses.fields(ModelConfig)}
# ModelConfig.mlp_chunk (tokens whose MLP activations exist at once; 0: all), likewise.
HAS_MLP_CHUNK = "mlp_chunk" in {f.name for f in dataclasses.fields(ModelConfig)}
# The defaults of the memory-saving settings: a loss chunk of 512 tokens divides 8704 (17 chunks) and keeps
# the [512, 256000] logits matmul compute-bound on a TPU (512 flops per byte of the bf16 output matrix);
# one query block's attention scores at a time.
DEFAULT_LOSS_CHUNK = 512
# and 32000 of the 256000 vocabulary entries at a time (8 tiles): the output matrix is gathered a tile at a
# time, [D, 32000] in bfloat16, and each tile's gradient leaves the chip once summed.
DEFAULT_LOSS_VOCAB_CHUNK = 32000
DEFAULT_ATTENTION_CHUNK = 1 if HAS_ATTENTION_CHUNK else 0
# and the MLP 1088 tokens at a time: 8 groups of the 8704 tokens (1088 = 8704 / 8), a [1088, d_model] x
# [d_model, mlp_dim] matmul per group (1088 flops per byte of the bfloat16 weights read again per group).
DEFAULT_MLP_CHUNK = 1088 if HAS_MLP_CHUNK else 0


# -- configs --------------------------------------------------------------------------------------------

def paper_job(size: str, *, batch_size: int = GLOBAL_BATCH, mesh: tuple = (1, -1, 1), n_layers=None,
              seq_len=None, lora_rank=None, microbatches: int = 1, loss_chunk: int = 0,
              loss_vocab_chunk: int = 0, **model) -> JobConfig:
  """configs/fam_<size>.py (the paper's recipe, LoRA rank 64) with `mesh` = (data, fsdp, tensor), and
  optionally other sizes (`n_layers`, `seq_len`, `lora_rank`), `microbatches`, `loss_chunk`,
  `loss_vocab_chunk` and any
  ModelConfig field (attention_chunk=0 and mlp_chunk=0 are dropped where ModelConfig lacks the field)."""
  from configs import paper
  c = paper.get_config(size, "fam,unchunked").to_dict()
  c["batch_size"] = batch_size
  c["seq_len"] = seq_len or c["seq_len"]
  c["microbatches"] = microbatches
  c["loss_chunk"] = loss_chunk
  c["loss_vocab_chunk"] = loss_vocab_chunk
  c["lora"]["rank"] = c["lora"]["rank"] if lora_rank is None else lora_rank
  c["data"]["mixture"] = "synthetic"  # the sizes are the config's; no data needed to lower the step
  c["mesh"] = dict(zip(MESH_AXES, mesh))
  if not HAS_ATTENTION_CHUNK and not model.get("attention_chunk", 1):
    model.pop("attention_chunk")
  if not HAS_MLP_CHUNK and not model.get("mlp_chunk", 1):
    model.pop("mlp_chunk")
  c["model"].update(model, **({"n_layers": n_layers} if n_layers else {}))
  return job_config(c)


def mesh_for(chips: int, batch: int = GLOBAL_BATCH) -> tuple[int, int, int]:
  """FSDP over every chip while the batch splits (a sequence per chip at most); tensor beyond that."""
  fsdp = math.gcd(chips, batch)
  return (1, fsdp, chips // fsdp)


def sequences_per_shard(mesh, batch: int = GLOBAL_BATCH) -> int:
  return batch // (mesh[0] * mesh[1])


def divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def point_job(record: dict) -> JobConfig:
  """The job of a record (a point of the search, or an --out record)."""
  model = {"attention_chunk": record.get("attention_chunk", 0), "mlp_chunk": record.get("mlp_chunk", 0)}
  return paper_job(record["size"], batch_size=record.get("batch_size", GLOBAL_BATCH),
                   mesh=tuple(record["mesh"]), microbatches=record.get("microbatches", 1),
                   loss_chunk=record.get("loss_chunk", 0),
                   loss_vocab_chunk=record.get("loss_vocab_chunk", 0), **model)


# -- compiling -------------------------------------------------------------------------------------------

def search_point(point: dict) -> list[dict]:
  """Compiles the point at each microbatch count of point["candidates"] in turn, stopping at the first
  whose total fits point["hbm_gib"] when point["stop_at_fit"]; one record per compile (printed as soon
  as it is done, so that a run cut short keeps what it compiled)."""
  records = []
  for k in point["candidates"]:
    record = {key: point[key] for key in ("size", "chips", "mesh", "role", "batch_size", "hbm_gib")}
    record.update({name: point.get(name, 0) for name in SETTINGS})
    job = point_job({**record, "microbatches": k})
    b = sequences_per_shard(point["mesh"], point["batch_size"])
    record.update(microbatches=k, sequences_per_chip=b, sequences_per_microbatch=b // k,
                  seq_len=job.train.seq_len, layers=job.model.n_layers, **compiled_bytes(job))
    record["fits"] = record["total"] <= point["hbm_gib"] * GIB
    print("RECORD " + json.dumps(record), flush=True)
    print(f"compiled {record['size']} on {record['chips']} chips, {k} microbatch(es): "
          f"{record['total'] / GIB:.2f} GiB in {record['compile_s']} s", file=sys.stderr, flush=True)
    records.append(record)
    if record["fits"] and point["stop_at_fit"]:
      break
  return records


def compile_points(points: list[dict], timeout_s: float = 3600) -> tuple[list[dict], list[str]]:
  """Runs search_point for each point in a subprocess with point["chips"] CPU devices (the device count is
  fixed when jax starts), one subprocess per device count. Returns every record and a line per device
  count whose subprocess failed or ran out of time (its records up to then are kept)."""
  return run_children("", cpu_groups(points), timeout_s)


def cpu_groups(points: list[dict]) -> list[tuple[dict, list[dict]]]:
  """(environment, points) per device count: one XLA:CPU process for the points of each chip count."""
  return [({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"},
           [p for p in points if p["chips"] == n]) for n in sorted({p["chips"] for p in points})]


def _child(points: list[dict]) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  for p in points:
    assert jax.device_count() == p["chips"], (jax.device_count(), p)
    search_point(p)


# -- tables ----------------------------------------------------------------------------------------------

def with_estimates(records: list[dict]) -> list[dict]:
  """The records with "estimate" (bytes, famjax.training.memory.estimate of the record's job)."""
  return [{**r, "estimate": int(estimate(point_job(r), tuple(r["mesh"]))["total"])} for r in records]


# the memory-saving settings of a record
SETTINGS = ("loss_chunk", "loss_vocab_chunk", "attention_chunk", "mlp_chunk")


def _settings(record: dict) -> tuple:
  return tuple(record.get(name, 0) for name in SETTINGS)


def row_estimates(size: str, mesh, settings: dict) -> dict[int, int]:
  """microbatches -> estimated bytes, for every count that divides the sequences per data shard."""
  return {k: estimate(paper_job(size, mesh=mesh, microbatches=k, **settings), mesh)["total"]
          for k in divisors(sequences_per_shard(mesh))}


def fewest_microbatches(estimates: dict[int, int], hbm_gib: float):
  """The fewest microbatches whose estimate fits hbm_gib, or None."""
  return next((k for k, total in sorted(estimates.items()) if total <= hbm_gib * GIB), None)


def estimate_table(sizes, chips, hbm_gib: float, settings: dict, compiled=()) -> str:
  """Markdown: per model and chip count, the mesh, the estimate and compile (where there is one, from
  --load or --compile, with the same settings) at 1 microbatch, and per chip's HBM the fewest
  microbatches whose estimate fits ("no": not even one sequence per microbatch)."""
  hbms = dict(HBM_GIB)
  if hbm_gib not in hbms.values():
    hbms["--hbm_gib"] = hbm_gib
  compiled = {(r["size"], tuple(r["mesh"])): r for r in compiled
              if r.get("microbatches", 1) == 1 and _settings(r) == _settings(settings)}
  lines = ["| model | chips | mesh (data, fsdp, tensor) | sequences / chip | estimate GiB, 1 microbatch "
           "| compiled GiB, 1 microbatch | " + " | ".join(f"{chip} {hbm:g} GiB" for chip, hbm in hbms.items())
           + " |", "|---|---:|---|---:|---:|---:|" + "---:|" * len(hbms)]
  for size in sizes:
    for n in chips:
      mesh = mesh_for(n)
      estimates = row_estimates(size, mesh, settings)
      got = compiled.get((size, mesh), {}).get("total")
      marks = [str(fewest_microbatches(estimates, hbm) or "no") for hbm in hbms.values()]
      cells = [size.upper(), f"{n}{' (paper)' if PAPER_CHIPS.get(size) == n else ''}", str(mesh),
               str(sequences_per_shard(mesh)), f"{estimates[1] / GIB:.1f}",
               "-" if got is None else f"{got / GIB:.1f}", *marks]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


ROLES = ("baseline", "paper", "one_sequence")


def _order(r: dict):
  return list(PAPER_CHIPS).index(r["size"]), r["chips"], ROLES.index(r["role"]), r["microbatches"]


def search_table(records: list[dict]) -> str:
  """Markdown: every compiled record, by model, chips, baseline first, microbatches."""
  records = sorted(records, key=_order)
  lines = ["| model | chips | mesh (data, fsdp, tensor) | sequences / chip | microbatches | sequences / "
           "microbatch | loss_chunk | loss_vocab_chunk | attention_chunk | mlp_chunk | compiled GiB | "
           "estimate GiB | fits | compile s |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
  for r in records:
    cells = [r["size"].upper(), str(r["chips"]), str(tuple(r["mesh"])), str(r["sequences_per_chip"]),
             str(r["microbatches"]), str(r["sequences_per_microbatch"]),
             *(str(r.get(name, 0)) for name in SETTINGS), f"{r['total'] / GIB:.2f}", f"{r['estimate'] / GIB:.2f}",
             f"{'yes' if r['fits'] else 'no'} ({r['hbm_gib']:g} GiB)", str(r["compile_s"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def summary(records: list[dict], one_sequence_target_gib: float = 4.0) -> str:
  """One line per point of the search: the fewest microbatches that fit, or the smallest total tried."""
  lines = []
  groups = {}
  for r in sorted(records, key=_order):
    groups.setdefault((r["role"], r["size"], r["chips"], tuple(r["mesh"]), r["hbm_gib"]), []).append(r)
  for (role, size, chips, mesh, hbm), rs in groups.items():
    where = (f"{size.upper()} on {chips} chips, mesh {mesh}, {rs[0]['sequences_per_chip']} sequence(s) "
             "per chip")
    if role == "baseline":
      r = rs[0]
      lines.append(f"* as the paper configs define the step ({where}, 1 microbatch, loss_chunk 0, "
                   f"loss_vocab_chunk 0, attention_chunk 0, mlp_chunk 0): "
                   f"{r['total'] / GIB:.2f} GiB compiled")
      continue
    if role == "one_sequence":
      r = rs[0]
      met = "met" if r["total"] <= one_sequence_target_gib * GIB else "not met"
      lines.append(f"* one {size.upper()} sequence per chip ({where}, {r['microbatches']} microbatch, "
                   f"loss_chunk {r['loss_chunk']}, loss_vocab_chunk {r.get('loss_vocab_chunk', 0)}, "
                   f"attention_chunk {r['attention_chunk']}, mlp_chunk {r.get('mlp_chunk', 0)}): "
                   f"{r['total'] / GIB:.2f} GiB compiled (target <= {one_sequence_target_gib:g} GiB: {met})")
      continue
    fit = [r for r in rs if r["fits"]]
    tried = ", ".join(str(r["microbatches"]) for r in rs)
    if fit:
      r = min(fit, key=lambda r: r["microbatches"])
      lines.append(f"* {where}: fits {hbm:g} GiB with {r['microbatches']} microbatch(es) "
                   f"({r['total'] / GIB:.2f} GiB compiled; counts tried: {tried})")
    else:
      r = min(rs, key=lambda r: r["total"])
      lines.append(f"* {where}: does not fit {hbm:g} GiB with any count tried ({tried}); the least is "
                   f"{r['total'] / GIB:.2f} GiB with {r['microbatches']} microbatch(es)")
  return "\n".join(lines)


# -- the TPU compiler (--platform=tpu) --------------------------------------------------------------------
#
# A point: {"role", "size", "chips", "topology", "variant", "overrides"} (a config as shipped, with ModelConfig
# overrides for the pallas point), or {"role": "job", "job": <a run's config.json>, "topology", "settings"}.
# Each is compiled in a process of its own (a crash or a timeout costs one point) with what libtpu needs in
# its environment (famjax.parallel.topology.compile_env()), never in this one.

TARGET_GIB = 14.0  # what the paper points must stay under on a 16 GiB v5e: the rest is the runtime's
TPU_ROLES = ("paper", "one_sequence", "pallas", "baseline", "job")


def shipped_job(size: str, variant: str = "fam", **model) -> JobConfig:
  """configs/fam_<size>.py:<variant> as shipped (its mesh, batch and memory settings), with `model`
  (ModelConfig fields) changed."""
  from configs import paper
  c = paper.get_config(size, variant).to_dict()
  c["model"].update(model)
  return job_config(c)


def job_of(point: dict) -> JobConfig:
  """The JobConfig a TPU point compiles: a shipped config, or a run's job with the point's settings."""
  if "job" in point:
    c = json.loads(json.dumps(point["job"]))
    for name, value in point.get("settings", {}).items():
      (c["model"] if name in ("attention_chunk", "mlp_chunk", "attention_impl") else c)[name] = value
    return job_config(c)
  return shipped_job(point["size"], point.get("variant", "fam"), **point.get("overrides", {}))


def settings_of(job: JobConfig) -> dict:
  """What of a job decides its memory: the memory-saving settings, microbatches, the attention kernel."""
  return {"microbatches": job.train.microbatches, "loss_chunk": job.train.loss_chunk,
          "loss_vocab_chunk": job.train.loss_vocab_chunk, "attention_chunk": job.model.attention_chunk,
          "mlp_chunk": job.model.mlp_chunk, "attention_impl": job.model.attention_impl}


def tpu_record(point: dict) -> dict:
  """Compile one point for its TPU topology (in this process: a child's); the record of --out."""
  from famjax.parallel import topology
  from famjax.training import aot
  job = job_of(point)
  devices = topology.devices(point["topology"])
  mesh = job.mesh.resolve(len(devices))
  record = {key: point.get(key) for key in ("role", "size", "chips", "topology", "variant")}
  record.update(platform="tpu", as_shipped=point["role"] in ("paper", "one_sequence") and not point.get(
      "overrides"), settings=settings_of(job), mesh=list(mesh), batch_size=job.train.batch_size,
      seq_len=job.train.seq_len, sequences_per_chip=job.train.batch_size // (mesh[0] * mesh[1]))
  step = aot.compile_step(job, devices)
  record.update(aot.report(step))
  if point.get("hlo_dir") and step.compiled is not None:  # the optimised HLO, to read what the tables count
    import gzip  # pylint: disable=import-outside-toplevel
    os.makedirs(point["hlo_dir"], exist_ok=True)
    name = f"{point['role']}_{point.get('size') or 'job'}_{point['topology'].replace(':', '_')}.hlo.gz"
    with gzip.open(os.path.join(point["hlo_dir"], name), "wt") as f:
      f.write(step.compiled.as_text())
  record["total_gib"] = round(record["total"] / GIB, 3)
  try:
    record["estimate"] = int(estimate(job, mesh)["total"])
  except ValueError:  # a job the formula does not model (remat other than full)
    record["estimate"] = None
  return record


def _tpu_child(points: list[dict]) -> None:
  for point in points:
    print("RECORD " + json.dumps(tpu_record(point)), flush=True)


def _cpu_child(points: list[dict]) -> None:
  """XLA:CPU's memory of the TPU points' jobs, on this process's CPU devices (--cpu_compare)."""
  import jax  # pylint: disable=import-outside-toplevel
  for point in points:
    job = job_of(point)
    assert jax.device_count() == point["chips"], (jax.device_count(), point)
    print("RECORD " + json.dumps({**point, **compiled_bytes(job)}), flush=True)


def run_children(mode: str, groups: list[tuple[dict, list[dict]]], timeout_s: float) -> tuple[list, list]:
  """Runs `--_{mode}_child POINTS` once per (environment, points) group; (records, failure lines)."""
  results, failures = [], []
  flag = f"--_{mode}_child" if mode else "--_child"
  for env, points in groups:
    try:  # stdout: the records; stderr (progress, errors): this process's
      out = subprocess.run([sys.executable, os.path.abspath(__file__), flag, json.dumps(points)],
                           env={**os.environ, **env}, stdout=subprocess.PIPE, text=True, timeout=timeout_s)
      stdout, failed = out.stdout, out.returncode and f"exit status {out.returncode} (its error is above)"
    except subprocess.TimeoutExpired as e:
      stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
      failed = f"over --timeout_s={timeout_s:g}"
    got = [json.loads(line[len("RECORD "):]) for line in stdout.splitlines() if line.startswith("RECORD ")]
    results += got
    if failed:
      failures.append(f"{mode or 'cpu'} compile of {[p.get('size') or p.get('topology') for p in points]} "
                      f"({points[0].get('chips')} devices): {failed}, after {len(got)} record(s)")
  return results, failures


def compile_tpu(points: list[dict], timeout_s: float) -> tuple[list[dict], list[str]]:
  """Each point compiled by the TPU compiler in a process of its own; (records, failure lines)."""
  from famjax.parallel.topology import compile_env
  try:
    env = {**compile_env(), "JAX_PLATFORMS": "cpu"}
  except RuntimeError as e:
    _fail(str(e))
  records, failures = [], []
  for point in points:
    print(f"compiling {point.get('size') or 'the job'} ({point['role']}) for {point['topology']} ...",
          file=sys.stderr, flush=True)
    got, failed = run_children("tpu", [(env, [point])], timeout_s)
    records += got
    failures += failed
    for r in got:
      print(f"  {r['total_gib']:.2f} GiB per chip{'' if r['error'] is None else ' (does not fit)'} in "
            f"{r['compile_s']} s", file=sys.stderr, flush=True)
  return records, failures


def with_cpu_totals(records: list[dict], timeout_s: float) -> tuple[list[dict], list[str]]:
  """The TPU records with "cpu_total": the same job compiled on as many XLA:CPU devices (one process per
  device count, as --compile)."""
  # not the points that do not fit, nor the Pallas kernel (XLA:CPU would compile its interpreter)
  points = [{k: r[k] for k in ("role", "size", "chips", "topology", "variant")} for r in records
            if r.get("size") and r["role"] in ("paper", "one_sequence")]
  got, failures = run_children("cpu", cpu_groups(points), timeout_s)
  by_point = {(g["role"], g["size"], g["topology"]): g for g in got}
  out = []
  for r in records:
    cpu = by_point.get((r["role"], r.get("size"), r["topology"]))
    out.append({**r, "cpu_total": None if cpu is None else cpu["total"],
                "cpu_compile_s": None if cpu is None else cpu["compile_s"]})
  return out, failures


def tpu_points(args) -> list[dict]:
  """The points of a --platform=tpu run (the module docstring)."""
  from famjax.parallel.topology import slice_for
  points = []
  roles = [("paper", _pairs(args.compile_points, "--compile_points"), {}, "fam"),
           ("one_sequence", _pairs(args.one_sequence, "--one_sequence"), {}, "fam"),
           ("pallas", _pairs(args.pallas, "--pallas"), {}, "fam,pallas")]
  if args.baseline:
    roles.append(("baseline", _pairs(args.compile_points, "--compile_points"), {}, "fam,unchunked"))
  for role, pairs, overrides, variant in roles:
    for size, chips in pairs:
      try:
        name = slice_for(args.generation, chips)
      except ValueError as e:
        _fail(str(e))
      points.append({"role": role, "size": size, "chips": chips, "topology": name, "variant": variant,
                     "overrides": overrides, "hlo_dir": args.hlo_dir})
  return points


def job_search(args) -> list[dict]:
  """--job FILE: the job as it is, then (while it does not fit --hbm_gib) the memory-saving settings with 1,
  2, 4, ... microbatches; one record per compile."""
  from famjax.parallel.topology import parse
  with open(args.job) as f:
    raw = json.load(f)
  try:
    job = job_config(raw)
    tpu = parse(args.topology)
  except ValueError as e:
    _fail(str(e))
  mesh = job.mesh.resolve(tpu.chips)
  per_shard = job.train.batch_size // (mesh[0] * mesh[1])
  T = job.train.seq_len
  saving = {"loss_chunk": job.train.loss_chunk or max(d for d in divisors(T) if d <= DEFAULT_LOSS_CHUNK),
            "loss_vocab_chunk": job.train.loss_vocab_chunk or (
                DEFAULT_LOSS_VOCAB_CHUNK if job.model.vocab_size > DEFAULT_LOSS_VOCAB_CHUNK else 0),
            "attention_chunk": job.model.attention_chunk or (1 if job.model.uses_blocks else 0),
            "mlp_chunk": job.model.mlp_chunk or (T // 8 if T >= 8 * 256 else 0)}
  tries = [{}] + [{**saving, "microbatches": k} for k in divisors(per_shard)]
  records = []
  hbm = args.hbm_gib if args.hbm_gib else tpu.chip.hbm_bytes / GIB - 2
  for settings in tries:
    point = {"role": "job", "topology": args.topology, "job": raw, "settings": settings}
    got, failures = compile_tpu([point], args.timeout_s)
    if failures:
      _fail("; ".join(failures))
    records += got
    if got[0]["error"] is None and got[0]["total"] <= hbm * GIB:
      break
  return records


def _gib(n) -> str:
  return "-" if n is None else f"{n / GIB:.2f}"


def _settings_text(settings: dict) -> str:
  short = {"microbatches": "mb", "loss_chunk": "loss", "loss_vocab_chunk": "vocab",
           "attention_chunk": "attn", "mlp_chunk": "mlp", "attention_impl": ""}
  return " ".join(f"{short[k]} {v}" if short[k] else str(v) for k, v in settings.items())


def _tpu_order(r: dict):
  size = list(PAPER_CHIPS).index(r["size"]) if r.get("size") in PAPER_CHIPS else 9
  return TPU_ROLES.index(r["role"]), size, r.get("chips") or 0


def tpu_tables(records: list[dict]) -> str:
  """Markdown: memory per chip, what the step does per step, and the predicted step time."""
  records = sorted(records, key=_tpu_order)
  label = lambda r: (f"{(r.get('size') or 'job').upper()} {r['role']}" + (" (as shipped)" if r.get("as_shipped")  # noqa: E731
                                                                         else ""))
  lines = ["Memory per chip (GiB; TPU: the TPU compiler's memory_analysis, or the size it said it needed; "
           "XLA:CPU: the same step compiled on as many CPU devices; estimate: famjax.training.memory.estimate)",
           "", "| point | topology | mesh (data, fsdp, tensor) | sequences / chip | settings | arguments | "
           "temporaries | TPU total | fits | XLA:CPU | TPU - XLA:CPU | estimate | compile s |",
           "|---|---|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
  for r in records:
    if r["error"]:
      fits = "no (compiler: out of memory)"
    elif r.get("fits") is False:  # compiled, yet over the chip's HBM by its own memory_analysis
      fits = f"no (over {_gib(r['hbm_bytes_capacity'])} HBM)"
    else:
      fits = f"yes, <= {TARGET_GIB:g}" if r["total"] <= TARGET_GIB * GIB else f"yes, over {TARGET_GIB:g}"
    cpu = r.get("cpu_total")
    diff = "-" if cpu is None or r["error"] else f"{(r['total'] - cpu) / GIB:+.2f} ({r['total'] / cpu - 1:+.0%})"
    lines.append(f"| {label(r)} | {r['topology']} | {tuple(r['mesh'])} | {r['sequences_per_chip']} | "
                 f"{_settings_text(r['settings'])} | {_gib(r['arguments'])} | {_gib(r['temporaries'])} | "
                 f"{_gib(r['total'])} | {fits} | {_gib(cpu)} | {diff} | {_gib(r.get('estimate'))} | "
                 f"{r['compile_s']} |")
  done = [r for r in records if not r["error"]]
  lines += ["", "Per step and chip (cost_analysis: XLA's own count, every loop body once; the rest counted per "
            "loop trip: executed = the matmul FLOPs the step runs, model = famjax's model FLOPs; HBM: bytes read "
            "and written in HBM; collectives: count / GB of data)", "",
            "| point | cost_analysis TFLOP | executed TFLOP | model TFLOP | cost_analysis GB | HBM GB | "
            + " | ".join(hlo_kinds()) + " |", "|---|" + "---:|" * (5 + len(hlo_kinds()))]
  for r in done:
    c = r["collectives"]
    lines.append(f"| {label(r)} | {r['flops'] / 1e12:.1f} | {r['executed_flops'] / 1e12:.1f} | "
                 f"{r['model_flops'] / 1e12:.1f} | {r['bytes_accessed'] / 1e9:.1f} | {r['hbm_bytes'] / 1e9:.1f} | "
                 + " | ".join(f"{c[k]['count']} / {c[k]['bytes'] / 1e9:.1f}" for k in hlo_kinds()) + " |")
  lines += ["", "Predicted step time (famjax.training.roofline: compute = executed FLOPs / peak, memory = HBM "
            "bytes / HBM bandwidth, collectives = bytes each chip receives / half its bidirectional ICI "
            "bandwidth)", "",
            "| point | compute s | memory s | collectives s | step s, collectives serialised | MFU | step s, "
            "overlapped | MFU | limited by |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  from famjax.training.roofline import limits
  for r in done:
    p = r["roofline"]
    lines.append(f"| {label(r)} | {p['compute_s']:.2f} | {p['memory_s']:.2f} | {p['collectives_s']:.2f} | "
                 f"{p['step_s_serialised']:.2f} | {p['mfu_serialised']:.1%} | {p['step_s_overlapped']:.2f} | "
                 f"{p['mfu_overlapped']:.1%} | {limits(p)} |")
  return "\n".join(lines)


def hlo_kinds() -> tuple[str, ...]:
  from famjax.training.hlo import KINDS
  return KINDS


def tpu_summary(records: list[dict]) -> str:
  """One line per target of the issue this run measures."""
  lines = []
  for r in sorted(records, key=_tpu_order):
    what = f"{(r.get('size') or 'the job').upper()} on {r['topology']} ({r['role']})"
    if r["error"]:
      lines.append(f"* {what}: does not fit, the compiler needed {_gib(r['total'])} GiB per chip")
    elif r["role"] == "one_sequence":
      lines.append(f"* {what}: {_gib(r['total'])} GiB per chip (target <= 4: "
                   f"{'met' if r['total'] <= 4 * GIB else 'not met'})")
    elif r["role"] == "paper":
      p = r["roofline"]
      lines.append(f"* {what}, as shipped: {_gib(r['total'])} GiB per chip (target <= {TARGET_GIB:g}: "
                   f"{'met' if r['total'] <= TARGET_GIB * GIB else 'not met'}); predicted MFU "
                   f"{p['mfu_overlapped']:.1%} with the collectives overlapped, {p['mfu_serialised']:.1%} "
                   "serialised")
    elif r.get("fits") is False:
      lines.append(f"* {what}: does not fit, {_gib(r['total'])} GiB per chip by the compiler's memory_analysis "
                   f"(it compiled it) and {_gib(r['hbm_bytes_capacity'])} GiB of HBM")
    else:
      p = r["roofline"]
      lines.append(f"* {what}: {_gib(r['total'])} GiB per chip; predicted MFU {p['mfu_overlapped']:.1%} with "
                   f"the collectives overlapped, {p['mfu_serialised']:.1%} serialised")
  return "\n".join(lines)


# -- the command line ------------------------------------------------------------------------------------

def _fail(message: str):
  raise SystemExit(f"memory_fit.py: error: {message}")


def _pairs(text: str, option: str) -> list[tuple[str, int]]:
  out = []
  for item in filter(None, text.split(",")):
    size, _, chips = item.partition(":")
    if size not in PAPER_CHIPS or not chips.isdigit() or int(chips) < 1:
      _fail(f"{option}: {item!r} is not size:chips with size one of {sorted(PAPER_CHIPS)}")
    out.append((size, int(chips)))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", default="1b,8b,24b")
  parser.add_argument("--chips", default="8,16,32,64,128,256")
  parser.add_argument("--hbm_gib", type=float, default=None,
                      help="a chip's HBM in GiB (default: v5e's 16; --job: the chip's less 2)")
  parser.add_argument("--loss_chunk", type=int, default=DEFAULT_LOSS_CHUNK,
                      help=f"config.loss_chunk: tokens of logits at a time (0: all; must divide {SEQ_LEN})")
  parser.add_argument("--loss_vocab_chunk", type=int, default=DEFAULT_LOSS_VOCAB_CHUNK,
                      help="config.loss_vocab_chunk: vocabulary entries of logits at a time (0: all)")
  parser.add_argument("--attention_chunk", type=int, default=DEFAULT_ATTENTION_CHUNK,
                      help="config.model.attention_chunk: query blocks whose scores exist at once (0: all)")
  parser.add_argument("--mlp_chunk", type=int, default=DEFAULT_MLP_CHUNK,
                      help="config.model.mlp_chunk: tokens whose MLP activations exist at once (0: all)")
  parser.add_argument("--microbatches", type=int, default=0,
                      help="compile every point at this count instead of searching (0: search)")
  parser.add_argument("--compile", action="store_true",
                      help="search the points of --compile_points, compiled")
  parser.add_argument("--compile_points", default="1b:32,8b:64,24b:128",
                      help="size:chips pairs to search (on as many simulated CPU devices)")
  parser.add_argument("--one_sequence", default="1b:128",
                      help="size:chips pairs compiled at 1 microbatch, reported as 'one sequence per chip'")
  parser.add_argument("--baseline", action="store_true",
                      help="also compile the points of --compile_points and --one_sequence as the paper "
                      "configs define them (1 microbatch, loss_chunk 0, attention_chunk 0), side by side")
  parser.add_argument("--out", default=None, help="write the compiled records as JSON here")
  parser.add_argument("--load", default="", help="comma-separated JSON files of earlier --out records to "
                      "show (without compiling again)")
  parser.add_argument("--timeout_s", type=float, default=3600, help="per device count (cpu), per point (tpu)")
  parser.add_argument("--platform", choices=("cpu", "tpu"), default="cpu",
                      help="cpu: XLA:CPU on simulated devices (--compile); tpu: the TPU compiler for a TPU "
                      "topology (needs libtpu)")
  parser.add_argument("--generation", default="v5e", help="--platform=tpu: the TPU generation of the slices "
                      "(v5e, v5p, v6e); chips -> slice: famjax.parallel.topology.SHAPES")
  parser.add_argument("--pallas", default="1b:32", help="--platform=tpu: size:chips compiled as "
                      "configs/fam_<size>.py:fam,pallas (the Pallas attention kernel), beside the xla point")
  parser.add_argument("--cpu_compare", action=argparse.BooleanOptionalAction, default=True,
                      help="--platform=tpu: also compile every point on as many XLA:CPU devices")
  parser.add_argument("--job", default=None, help="--platform=tpu: a run's config.json; compiled for "
                      "--topology, then with the memory-saving settings and 1, 2, 4, ... microbatches until "
                      "it fits --hbm_gib (default there: the chip's HBM less 2 GiB)")
  parser.add_argument("--topology", default=None, help="--job: the TPU slice, e.g. v5e:8x8")
  parser.add_argument("--hlo_dir", default=None, help="--platform=tpu: also write each point's optimised HLO "
                      "here (gzipped text)")
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_tpu_child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_cpu_child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._child:
    _child(json.loads(args._child))
    return
  if args._tpu_child:
    _tpu_child(json.loads(args._tpu_child))
    return
  if args._cpu_child:
    _cpu_child(json.loads(args._cpu_child))
    return
  if args.platform == "tpu" or args.job:
    tpu_main(args)
    return

  if args.hbm_gib is None:
    args.hbm_gib = 16.0
  if not args.hbm_gib > 0:
    _fail(f"--hbm_gib={args.hbm_gib:g} must be > 0")
  if args.loss_chunk < 0 or (args.loss_chunk and SEQ_LEN % args.loss_chunk):
    _fail(f"--loss_chunk={args.loss_chunk} must be 0 or divide the sequence length {SEQ_LEN}")
  if args.loss_vocab_chunk < 0 or (args.loss_vocab_chunk and not args.loss_chunk):
    _fail(f"--loss_vocab_chunk={args.loss_vocab_chunk} must be >= 0, and needs --loss_chunk > 0")
  if args.attention_chunk < 0:
    _fail(f"--attention_chunk={args.attention_chunk} must be >= 0")
  if args.attention_chunk and not HAS_ATTENTION_CHUNK:
    _fail(f"--attention_chunk={args.attention_chunk}: this famjax's ModelConfig has no attention_chunk; "
          "give 0")
  if args.mlp_chunk < 0:
    _fail(f"--mlp_chunk={args.mlp_chunk} must be >= 0")
  if args.mlp_chunk and not HAS_MLP_CHUNK:
    _fail(f"--mlp_chunk={args.mlp_chunk}: this famjax's ModelConfig has no mlp_chunk; give 0")
  if args.microbatches < 0:
    _fail(f"--microbatches={args.microbatches} must be >= 1 (or 0: search)")
  searched = _pairs(args.compile_points, "--compile_points")
  single = _pairs(args.one_sequence, "--one_sequence")
  for size, chips in searched:
    b = sequences_per_shard(mesh_for(chips))
    if args.microbatches and b % args.microbatches:
      _fail(f"--microbatches={args.microbatches} does not divide the batch of {size} on {chips} chips "
            f"({GLOBAL_BATCH} sequences over data x fsdp = {GLOBAL_BATCH // b}: {b} per shard)")
  settings = dict(loss_chunk=args.loss_chunk, loss_vocab_chunk=args.loss_vocab_chunk,
                  attention_chunk=args.attention_chunk, mlp_chunk=args.mlp_chunk)
  print(f"settings: loss_chunk={args.loss_chunk}, loss_vocab_chunk={args.loss_vocab_chunk}, "
        f"attention_chunk={args.attention_chunk}"
        f"{'' if HAS_ATTENTION_CHUNK else ' (ModelConfig has no attention_chunk)'}, "
        f"mlp_chunk={args.mlp_chunk}{'' if HAS_MLP_CHUNK else ' (ModelConfig has no mlp_chunk)'}, "
        f"microbatches={args.microbatches or 'searched'}, hbm_gib={args.hbm_gib:g}; the paper's recipe: "
        f"global batch {GLOBAL_BATCH} x {SEQ_LEN} tokens, remat full, LoRA rank 64, bfloat16 compute\n")

  records = []
  for path in filter(None, args.load.split(",")):
    with open(path) as f:
      records += json.load(f)
  if args.compile:
    points = []
    roles = (("baseline", searched + single),) if args.baseline else ()
    for role, pairs in roles + (("paper", searched), ("one_sequence", single)):
      for size, chips in pairs:
        mesh = mesh_for(chips)
        b = sequences_per_shard(mesh)
        candidates = ([1] if role != "paper" else [args.microbatches] if args.microbatches
                      else divisors(b))
        point_settings = dict.fromkeys(SETTINGS, 0) if role == "baseline" else settings
        points.append({"role": role, "size": size, "chips": chips, "mesh": list(mesh),
                       "batch_size": GLOBAL_BATCH, "hbm_gib": args.hbm_gib, "candidates": candidates,
                       "stop_at_fit": role == "paper" and not args.microbatches, **point_settings})
    compiled, failures = compile_points(points, args.timeout_s)
    compiled = with_estimates(compiled)
    records += compiled
    write_records(args.out, compiled)
    if failures:
      _fail("; ".join(failures))
  searched_records = [r for r in records if "role" in r]
  if searched_records:
    searched_records = with_estimates(searched_records)
    print("compiled:\n\n" + search_table(searched_records) + "\n\n" + summary(searched_records) + "\n")
  print("estimate (chip columns: the fewest microbatches whose estimate fits; 'no': none does):\n")
  print(estimate_table(args.sizes.split(","), [int(n) for n in args.chips.split(",")], args.hbm_gib,
                       settings, records))


def write_records(path, records: list[dict]) -> None:
  """--out: the records as JSON (nothing without a path)."""
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(records, f, indent=1)


def tpu_main(args) -> None:
  """--platform=tpu: compile the points (or --job's search), write --out, print the tables."""
  if args.job and not args.topology:
    _fail("--job needs --topology (the TPU slice to compile it for, e.g. v5e:8x8)")
  if args.hbm_gib is not None and not args.hbm_gib > 0:
    _fail(f"--hbm_gib={args.hbm_gib:g} must be > 0")
  records = []
  for path in filter(None, args.load.split(",")):
    with open(path) as f:
      records += [r for r in json.load(f) if r.get("platform") == "tpu"]
  failures = []
  if args.job:
    records += job_search(args)
  elif args.compile or not records:
    compiled, failures = compile_tpu(tpu_points(args), args.timeout_s)
    if args.cpu_compare:
      compiled, more = with_cpu_totals(compiled, args.timeout_s)
      failures += more
    records += compiled
  write_records(args.out, records)
  if records:
    print(tpu_tables(records) + "\n\n" + tpu_summary(records))
  if failures:
    _fail("; ".join(failures))


if __name__ == "__main__":
  main()
