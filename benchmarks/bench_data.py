"""famjax.data at pod scale: tokenizing with Apache Beam, the packing plan of the paper's run, the Grain
reader at the paper's batch, a restore at step 50,000, and the bytes on disk. One run; the last line
printed is a JSON object of the results (also written to --out).

  python benchmarks/bench_data.py --out=bench_results/data.json        # the full run (docs/data.md)
  python benchmarks/bench_data.py --out=/tmp/smoke.json --examples=4000 --file_mb=0.2 \\
      --plan_rows=20000 --read_batches=2 --skip_demo_step               # a smoke run (a minute or two)

The mixture is Flan-shaped, with the byte vocabulary: 4 JSONL tasks of different sizes (5, 15, 30 and
50% of --examples) and shapes (long chain-of-thought prompts and answers; long prompts, short answers;
medium; short), mixed at rates proportional to their sizes, in files of about --file_mb MB (each file
one tokenization unit), with one malformed record in 500 (counted and skipped).

1. tokenize_tokens_per_s: the Beam pipeline (DirectRunner, multi_processing), each build into a store
   of its own and in a child process held to its cores (os.sched_setaffinity, inherited by the Beam
   workers): 1 worker on 1 core and 2 workers on 2 cores (worker scaling: one core per worker, as a
   cluster gives them), tokens over the pipeline's wall time, start-up included (and, as
   tokenize_span_tokens_per_s, over the span from the first unit's start to the last one's end);
   tokenize_cores_busy: the CPU seconds of the driver and its workers over the wall time. And
   tokenize_one_worker_two_cores: 1 worker free to use both cores (TensorFlow's
   pipeline threads run beside the worker's Python thread), against which 2 workers gain less.
   examples_identical: every unit's examples_sha256 equal in the three builds.
2. plan_seconds_paper, plan_peak_gib: the packing plan of the paper's run over those examples:
   --plan_rows rows (6.4M = 50,000 steps x 128) of 8704 tokens with the 256-token repeated segment,
   computed by a child process that only opens the store and plans; its peak resident memory (the whole
   process: TensorFlow and seqio included) and the increase over what it held before planning.
3. reader_tokens_per_s: one host reading global batches of 128 x 8704 through Grain, after a warm-up
   batch, --read_batches batches from a late step: with DataConfig's default prefetch (2 batches ahead,
   2 threads) and with prefetch 0 (on the caller's thread).
4. resume_seconds: a restore at step 50,000 (the position saved after step 49,999; the batch of step
   50,000 is the one read): open the store (manifests, the plan's arrays; nothing tokenized or planned),
   seek, and the first batch in hand, with the store's files dropped from the OS page cache first, as
   host 0 of 1 (128 rows) and host 0 of 8 (16 rows).
5. bytes_per_token: the example files (ArrayRecord, zstd) and their lengths, per token; and the plan's
   bytes (index arrays).
6. demo_step_tokens_per_s: configs/demo.py's real training step (its model and batch, jitted, median of
   5 after a warm-up), for the reader's ratio; demo_build_seconds: the demo's first build (tokenization
   and plan, in the process, as `make demo` does) into an empty store, in a fresh process after its
   imports.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

# name, share of the examples, prompt characters (lognormal median), answer characters
TASKS = (("cot", 0.05, 1500, 300), ("niv2", 0.15, 800, 20), ("t0", 0.30, 400, 40), ("flan", 0.50, 250, 60))
WORDS = ("the of and to in is was that for on with as by at from his her they this had not are but one all "
         "were when we there can an your which their said if do will each about how up out them then she "
         "many some so these would other into has more two like him see time could no make than first been "
         "its who now people my made over did down only way find use may water long little very after words "
         "called just where most know get through back much before go good new write our used me man too "
         "any day same right look think also around another came come work three word must because does "
         "part even place well such here take why things help put years different away again off "
         "went").split()


def write_mixture(directory: str, examples: int, file_bytes: int, seed: int = 0) -> tuple:
  """The Flan-shaped JSONL tasks (see the module docstring), each in files of about `file_bytes`;
  returns DataConfig.sources."""
  rng = np.random.default_rng(seed)
  words = np.array(WORDS)
  sources = []
  for name, share, prompt_chars, answer_chars in TASKS:
    n = max(1, int(round(examples * share)))
    files, out = 0, None
    for i in range(n):
      if out is None or out.tell() >= file_bytes:
        if out is not None:
          out.close()
        out = open(os.path.join(directory, f"{name}-{files:04d}.jsonl"), "w")
        files += 1
      if i % 500 == 499:
        out.write('{"inputs": "a record without its answer"}\n')
        continue
      p = max(4, int(rng.lognormal(np.log(prompt_chars), 0.6)) // 5)
      a = max(1, int(rng.lognormal(np.log(answer_chars), 0.6)) // 5)
      out.write(json.dumps({"inputs": f"{name} {i}: " + " ".join(words[rng.integers(0, len(words), p)]),
                            "targets": " ".join(words[rng.integers(0, len(words), a)])}) + "\n")
    out.close()
    sources.append((name, os.path.join(directory, f"{name}-*.jsonl"), float(n)))
  return tuple(sources)


def config(sources, root, **changes):
  from famjax import data  # pylint: disable=import-outside-toplevel
  fields = dict(mixture="bench_flan", sources=sources, seq_len=8704, repeat_segment_len=256, store=root)
  fields.update(changes)
  return data.DataConfig(**fields)


def _time(stamp: str) -> float:
  return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def tokenize(sources, root: str, workers: int, cores: list[int]) -> dict:
  """One Beam build (DirectRunner, multi_processing, `workers` processes) into `root`, in a child process
  held to `cores` (os.sched_setaffinity; the Beam workers it starts inherit it)."""
  return child_process("--tokenize_child", json.dumps({"sources": sources, "root": root, "workers": workers,
                                                        "cores": cores}), "TOKENIZE")


def tokenize_child(args) -> None:
  """In a child process: the Beam build of `tokenize`; prints wall, span, tokens, hashes and the CPU
  seconds of this process and its children (the driver and the Beam workers)."""
  from famjax.data import flan, store, tokenize as tokenize_lib  # pylint: disable=import-outside-toplevel
  flan.UNIT_BYTES = 1  # every input file its own unit, as in main
  request = json.loads(args.tokenize_child)
  os.sched_setaffinity(0, request["cores"])
  sources, root, workers = tuple(tuple(s) for s in request["sources"]), request["root"], request["workers"]
  cfg = config(sources, root)
  options = ["--runner=DirectRunner", f"--direct_num_workers={workers}",
             "--direct_running_mode=multi_processing", "--default_sdk_harness_log_level=ERROR"]
  _, _, requests = store._requests(cfg, root)  # pylint: disable=protected-access
  cpu0 = _cpu_seconds()
  t0 = time.perf_counter()
  built = tokenize_lib.ensure(cfg, requests, beam_options=options, say=lambda _: None)
  wall = time.perf_counter() - t0
  cpu = _cpu_seconds() - cpu0
  summaries = []
  for r in requests:
    build, units = built[r.task]
    directory = f"{r.directory}/{build}"
    summaries += [json.load(open(f"{directory}/unit-{k:05d}.json")) for k in range(units)]
  tokens = sum(s["tokens"] for s in summaries)
  span = max(_time(s["finished"]) for s in summaries) - min(_time(s["started"]) for s in summaries)
  print("TOKENIZE " + json.dumps({
      "wall": wall, "span": span, "tokens": tokens, "examples": sum(s["examples"] for s in summaries),
      "units": len(summaries), "hashes": [s["examples_sha256"] for s in summaries], "cpu": cpu,
      "workers": workers, "cores": request["cores"]}))


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process and its waited-for children."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def plan_child(args) -> None:
  """In a child process: open the (tokenized) store and compute the plan; print seconds and memory."""
  from famjax.data import store  # pylint: disable=import-outside-toplevel
  sources = tuple(tuple(s) for s in json.loads(args.plan_child))
  cfg = config(sources, args.root)
  rss_before = _rss_gib()
  t0 = time.perf_counter()
  rows = store.open_or_build(cfg, rows=args.plan_rows, say=lambda _: None)
  seconds = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print("PLAN " + json.dumps({"seconds": seconds, "peak_gib": peak, "before_gib": rss_before,
                              "pieces": rows.manifest["pieces"],
                              "fill": rows.manifest["stats"]["packing"]["fill"],
                              "plan_seconds": rows.manifest["seconds"]}))


def _rss_gib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def drop_page_cache(paths) -> None:
  """Asks the OS to forget the cached pages of a store's files (a cold read)."""
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def read_rate(rows, batch_size: int, batches: int, prefetch: int, start_step: int) -> float:
  from famjax import data  # pylint: disable=import-outside-toplevel
  with data.get_global_batches(rows, batch_size, prefetch=prefetch) as probe:
    state = dict(probe.state(), rows=start_step * batch_size)
  with data.get_global_batches(rows, batch_size, state=state, prefetch=prefetch) as it:
    next(it)  # warm-up: files opened, threads started
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    elapsed = time.perf_counter() - t0
  return batches * batch_size * rows.config["seq_len"] / elapsed


def resume_seconds(cfg, plan_rows: int, batch_size: int, step: int, process_count: int) -> float:
  """Cold restore at `step` (see the module docstring) as host 0 of `process_count`."""
  from famjax import data  # pylint: disable=import-outside-toplevel
  from famjax.data import store  # pylint: disable=import-outside-toplevel
  probe = store.open_or_build(cfg, rows=plan_rows, say=lambda _: None)
  with data.get_global_batches(probe, batch_size) as it:
    state = dict(it.state(), rows=(step - 1) * batch_size)
  paths = [os.path.join(probe.directory, e["file"]) for e in probe.manifest["files"].values()]
  paths += [f for s in probe.stores for f in s.files]
  probe.close()
  del probe, it  # no mapping keeps the plan's pages
  gc.collect()
  drop_page_cache(paths)
  t0 = time.perf_counter()
  rows = store.open_or_build(cfg, rows=plan_rows, say=lambda _: None)
  with data.get_global_batches(rows, batch_size, 0, process_count, state=state, prefetch=0) as it:
    batch = next(it)
  elapsed = time.perf_counter() - t0
  assert batch["targets"].shape == (batch_size // process_count, cfg.seq_len)
  rows.close()
  return elapsed


def demo_child(args) -> None:
  """In a child process (as `make demo` starts): the demo's first data build into an empty store."""
  from configs import demo  # pylint: disable=import-outside-toplevel
  from famjax.data import store  # pylint: disable=import-outside-toplevel
  from famjax.train import build  # pylint: disable=import-outside-toplevel
  job, train_data = build(demo.get_config())
  cfg = train_data.config.replace(store=args.root)
  t0 = time.perf_counter()
  store.open_or_build(cfg, rows=job.train.steps * job.train.batch_size, say=lambda _: None)
  print("DEMO " + json.dumps({"seconds": time.perf_counter() - t0}))


def demo_step(root: str, steps: int = 5) -> tuple[float, str]:
  """Tokens/s of configs/demo.py's real training step (its model, batch and optimizer), jitted, reading
  the demo's store at `root`."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel
  from famjax import data  # pylint: disable=import-outside-toplevel
  from famjax.data import store  # pylint: disable=import-outside-toplevel
  from famjax.train import build  # pylint: disable=import-outside-toplevel
  from famjax.training.trainer import Trainer  # pylint: disable=import-outside-toplevel
  job, train_data = build(demo.get_config())
  rows = store.open_or_build(train_data.config.replace(store=root),
                             rows=job.train.steps * job.train.batch_size, say=lambda _: None)
  trainer = Trainer(job)
  trainer.compile()
  state = trainer.initial_state()
  times = []
  with data.get_global_batches(rows, job.train.batch_size) as it:
    for i in range(steps + 1):
      batch = trainer.global_batch(next(it))
      t0 = time.perf_counter()
      state, metrics = trainer.step(state, batch)
      jax.block_until_ready(metrics)
      if i:  # the first step is a warm-up
        times.append(time.perf_counter() - t0)
  m = job.model
  what = (f"configs/demo.py: {m.attention}, d_model {m.d_model}, {m.n_layers} layers, batch "
          f"{job.train.batch_size} x {job.train.seq_len}, {jax.device_count()} CPU device")
  return job.train.batch_size * job.train.seq_len / float(np.median(times)), what


def child(args, flag: str, value: str, key: str) -> dict:
  """Runs this script with `flag` (and the store and plan size) in a child process; returns what it
  printed after `key`."""
  return child_process(flag, value, key, "--root", args.root, "--plan_rows", str(args.plan_rows))


def child_process(flag: str, value: str, key: str, *more: str) -> dict:
  """Runs this script with `flag` `value` `more` in a child process; returns what it printed after `key`."""
  out = subprocess.run([sys.executable, os.path.abspath(__file__), flag, value, *more], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"})
  if out.returncode or f"{key} " not in out.stdout:
    raise SystemExit(f"the child process ({flag}) failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.split(f"{key} ", 1)[1].splitlines()[0])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--examples", type=int, default=240_000, help="examples of the mixture, in all")
  parser.add_argument("--file_mb", type=float, default=2.0, help="MB per input file (one unit each)")
  parser.add_argument("--plan_rows", type=int, default=6_400_000, help="rows of the plan (50,000 x 128)")
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--resume_step", type=int, default=50_000)
  parser.add_argument("--read_batches", type=int, default=20)
  parser.add_argument("--skip_demo_step", action="store_true")
  parser.add_argument("--dir", default="", help="where the data and stores go (default: a temporary dir)")
  parser.add_argument("--out", default="", help="the JSON of the results")
  parser.add_argument("--plan_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--tokenize_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--demo_child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--root", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.plan_child:
    plan_child(args)
    return
  if args.tokenize_child:
    tokenize_child(args)
    return
  if args.demo_child:
    demo_child(args)
    return

  from famjax.data import flan  # pylint: disable=import-outside-toplevel
  flan.UNIT_BYTES = 1  # every input file its own unit (the driver plans the units)
  tmp = tempfile.TemporaryDirectory()
  work = args.dir or tmp.name
  os.makedirs(os.path.join(work, "mixture"), exist_ok=True)
  t0 = time.perf_counter()
  sources = write_mixture(os.path.join(work, "mixture"), args.examples, int(args.file_mb * 2**20))
  print(f"mixture written in {time.perf_counter() - t0:.1f} s", flush=True)

  # Worker scaling: one worker held to one core, then two workers on two cores (one core each, as a
  # cluster gives its workers); and one worker free to use both cores, as `--workers=1` runs here.
  cores = sorted(os.sched_getaffinity(0))
  builds, shared = {}, None
  for workers, held in ((1, cores[:1]), (2, cores[:2]), (1, cores[:2])):
    b = tokenize(sources, os.path.join(work, f"stores{workers}_{len(held)}"), workers, held)
    print(f"tokenized with {workers} Beam worker(s) on {len(held)} core(s): {b['examples']:,} examples, "
          f"{b['tokens']:,} tokens in {b['units']} files, {b['wall']:.1f} s ({b['span']:.1f} s from the first "
          f"file to the last), {b['cpu'] / b['wall']:.2f} cores busy on average", flush=True)
    if workers == 1 and len(held) == 2:
      shared = b
    else:
      builds[workers] = b
  identical = builds[1]["hashes"] == builds[2]["hashes"] == shared["hashes"]

  root = args.root = os.path.join(work, "stores1_1")
  plan = child(args, "--plan_child", json.dumps(sources), "PLAN")
  print(f"plan of {args.plan_rows:,} rows: {plan['seconds']:.1f} s, peak {plan['peak_gib']:.2f} GiB",
        flush=True)

  from famjax.data import store  # pylint: disable=import-outside-toplevel
  cfg = config(sources, root)
  rows = store.open_or_build(cfg, rows=args.plan_rows, say=lambda _: None)
  late = max(0, min(args.resume_step - 1, len(rows) // args.batch_size - args.read_batches - 1))
  read_prefetch = read_rate(rows, args.batch_size, args.read_batches, prefetch=2, start_step=late)
  read_direct = read_rate(rows, args.batch_size, args.read_batches, prefetch=0, start_step=late)
  print(f"reader: {read_prefetch:,.0f} tokens/s (prefetch 2), {read_direct:,.0f} (prefetch 0)", flush=True)
  step = min(args.resume_step, len(rows) // args.batch_size)
  resume = {str(n): resume_seconds(cfg, args.plan_rows, args.batch_size, step, n) for n in (1, 8)}
  print(f"restore at step {step:,}: {resume}", flush=True)

  example_bytes = sum(s.manifest["bytes"] for s in rows.stores)
  tokens = sum(s.manifest["tokens"] for s in rows.stores)
  lengths_bytes = sum(os.path.getsize(os.path.join(s.build_dir, s.manifest["lengths"]["file"]))
                      for s in rows.stores)
  plan_bytes = sum(e["bytes"] for e in rows.manifest["files"].values())

  result = {
      "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
      "mixture": {"tasks": [s[0] for s in sources], "examples": builds[1]["examples"], "tokens": tokens,
                  "files": builds[1]["units"]},
      "tokenize_tokens_per_s": {str(w): round(b["tokens"] / b["wall"]) for w, b in builds.items()},
      "tokenize_span_tokens_per_s": {str(w): round(b["tokens"] / b["span"]) for w, b in builds.items()},
      "tokenize_speedup": round(builds[1]["wall"] / builds[2]["wall"], 2),
      "tokenize_cores_busy": {str(w): round(b["cpu"] / b["wall"], 2) for w, b in builds.items()},
      "tokenize_one_worker_two_cores": {"tokens_per_s": round(shared["tokens"] / shared["wall"]),
                                        "span_tokens_per_s": round(shared["tokens"] / shared["span"]),
                                        "cores_busy": round(shared["cpu"] / shared["wall"], 2),
                                        "speedup_of_two_workers": round(shared["wall"] / builds[2]["wall"], 2)},
      "examples_identical": identical,
      "plan_rows": args.plan_rows, "seq_len": 8704,
      "plan_seconds_paper": round(plan["seconds"], 1), "plan_peak_gib": round(plan["peak_gib"], 3),
      "plan_peak_gib_over_imports": round(plan["peak_gib"] - plan["before_gib"], 3),
      "plan_pieces": plan["pieces"], "plan_fill": plan["fill"],
      "reader_tokens_per_s": round(read_prefetch), "reader_tokens_per_s_prefetch0": round(read_direct),
      "resume_step": step, "resume_seconds": {k: round(v, 3) for k, v in resume.items()},
      "bytes_per_token": round((example_bytes + lengths_bytes) / tokens, 3),
      "bytes_per_token_examples": round(example_bytes / tokens, 3), "plan_bytes": plan_bytes,
  }
  rows.close()
  if not args.skip_demo_step:
    args.root = os.path.join(work, "demo_stores")
    demo_build = child(args, "--demo_child", "1", "DEMO")["seconds"]
    rate, what = demo_step(args.root)
    result.update(demo_step_tokens_per_s=round(rate), demo_step=what,
                  demo_build_seconds=round(demo_build, 2),
                  reader_over_demo_step=round(read_prefetch / rate, 1))
  tmp.cleanup()
  line = json.dumps(result)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  main()
