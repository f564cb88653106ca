"""Will it fit? Per-device memory of the training step of the paper's configs, and the fewest microbatches
that fit a chip's HBM.

  python benchmarks/memory_fit.py                        # the estimate table (no compiling), markdown
  python benchmarks/memory_fit.py --compile              # plus the microbatch search, compiled
  python benchmarks/memory_fit.py --compile --out bench_results/memory_fit.json
  python benchmarks/memory_fit.py --load bench_results/memory_fit.json   # the tables from saved compiles
  python benchmarks/memory_fit.py --compile --baseline  # and the step as the paper configs define it

Two numbers per point, both from famjax.training.memory (its docstring says what each counts):

* compiled: `compiled_bytes()`, the step compiled ahead of time on simulated CPU devices
  (XLA_FLAGS=--xla_force_host_platform_device_count=N, one subprocess per device count), XLA's
  memory_analysis() at the config's full depth, nothing allocated.
* estimate: `estimate()`, a formula, no compiling; tests/test_memory_fit.py checks it against compiles of
  small configs it was not fitted to.

The search (--compile): for each point of --compile_points (the paper's: 1B on 32 chips, 8B on 64, 24B on
128; the global batch of 128 sequences of 8704 tokens split over data x fsdp by mesh_for), the step is
compiled with 1, 2, 4, ... microbatches (the divisors of the sequences per data shard, in increasing
order) until one fits --hbm_gib; every count tried is a record of --out. The memory-saving settings a user
would turn on with it are options (--loss_chunk, --loss_vocab_chunk, --attention_chunk, --mlp_chunk; printed
first).
--one_sequence adds the step of one sequence per chip (1B on 128 chips, 1 microbatch); --baseline the same
points as the paper configs define the step (1 microbatch, no loss or attention chunks); --microbatches K
compiles every point at K instead of searching.
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
  c = paper.get_config(size).to_dict()
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
  results, failures = [], []
  for devices in sorted({p["chips"] for p in points}):
    group = [p for p in points if p["chips"] == devices]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    # stdout: the records; stderr (progress, errors): this process's
    try:
      out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(group)],
                           env=env, stdout=subprocess.PIPE, text=True, timeout=timeout_s)
      stdout, failed = out.stdout, out.returncode and f"exit status {out.returncode} (its error is above)"
    except subprocess.TimeoutExpired as e:
      stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
      failed = f"over --timeout_s={timeout_s:g}"
    got = [json.loads(line[len("RECORD "):]) for line in stdout.splitlines() if line.startswith("RECORD ")]
    results += got
    if failed:
      failures.append(f"compiling on {devices} devices: {failed}, after {len(got)} record(s)")
  return results, failures


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
  parser.add_argument("--hbm_gib", type=float, default=16.0, help="a chip's HBM in GiB (default: v5e's 16)")
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
  parser.add_argument("--timeout_s", type=float, default=3600, help="per device count")
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._child:
    _child(json.loads(args._child))
    return

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
    if args.out:
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as f:
        json.dump(compiled, f, indent=1)
    if failures:
      _fail("; ".join(failures))
  searched_records = [r for r in records if "role" in r]
  if searched_records:
    searched_records = with_estimates(searched_records)
    print("compiled:\n\n" + search_table(searched_records) + "\n\n" + summary(searched_records) + "\n")
  print("estimate (chip columns: the fewest microbatches whose estimate fits; 'no': none does):\n")
  print(estimate_table(args.sizes.split(","), [int(n) for n in args.chips.split(",")], args.hbm_gib,
                       settings, records))


if __name__ == "__main__":
  main()
