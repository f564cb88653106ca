"""famjax.data: restoring the data position of a late step, and the pipeline's throughput against what
the demo's training step consumes. One run; the last line printed is a JSON object of the results.

  python benchmarks/bench_data.py --resume_step=50000 [--out bench_results/data.md] [--streaming]

1. The row store of `famjax_demo` at the paper's row (8704 tokens, the 256-token repeated segment),
   --store_rows rows, built into a temporary directory (or --store): build time and rate.
2. Resume at --resume_step with a --batch_size-row global batch: the time from "restore the data state
   of that step" (open the store, check it, seek) to the first batch in hand, with the store's pages
   dropped from the OS cache first (a cold read), for 1 host (the whole global batch) and for host 0 of
   8; next to today's streaming replay, measured (a fresh stream's first batch, and a restore that
   replays --replay_batches batches) and extrapolated linearly to the step.
3. Throughput: the store reader (prefetch=0, the producer's own rate) at that batch and at the demo's
   (configs/demo.py: 8 x 512); the streaming pipeline's rate at 128 x 8704 (from 2); and the tokens/s the
   demo's real training step consumes (configs/demo.py's model and batch, jitted, after a warm-up).
4. --streaming: also the streaming pipeline's tables of earlier versions of this benchmark (demo
   mixtures and 40 Flan-like JSONL tasks), --seconds each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

from famjax import data  # noqa: E402
from famjax.data import store as store_lib  # noqa: E402


def seconds(fn) -> tuple[float, object]:
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def resume_seconds(directory, config, batch_size, step, process_index=0, process_count=1) -> float:
  """Cold restore: the store's pages dropped, then open + check + seek + first batch."""
  store_lib.RowStore(directory).drop_page_cache()
  probe = store_lib.RowStore(directory)
  state = {"version": 2, "rows": step * batch_size, "fingerprint": probe.fingerprint,
           "store_rows": len(probe), "config": probe.config}

  def restore():
    rows = store_lib.RowStore(directory, config)
    with data.get_global_batches(rows, batch_size, process_index, process_count, state=state,
                                 prefetch=0) as it:
      return next(it)

  elapsed, batch = seconds(restore)
  assert batch["targets"].shape == (batch_size // process_count, config.seq_len)
  return elapsed


def replay(config, batch_size, batches, process_index=0, process_count=1) -> tuple[float, float]:
  """Today's streaming restore: (seconds to a fresh stream's first batch, seconds to the first batch
  after replaying `batches` batches)."""
  cfg = config.replace(prefetch=0)
  first, _ = seconds(lambda: _first(cfg, batch_size, None, process_index, process_count))
  state = {"version": 1, "batches": batches, "origin": 0, "seed": cfg.seed, "mixture": cfg.mixture,
           "split": "train",
           "config": data.pipeline._config_fingerprint(cfg),  # pylint: disable=protected-access
           "batch_size": batch_size, "process_index": process_index, "process_count": process_count,
           "num_epochs": None}
  replayed, _ = seconds(lambda: _first(cfg, batch_size, state, process_index, process_count))
  return first, replayed


def _first(cfg, batch_size, state, process_index, process_count):
  with data.get_batches(cfg, batch_size, process_index=process_index, process_count=process_count,
                        state=state) as it:
    return next(it)


def read_rate(rows: store_lib.RowStore, batch_size: int, duration: float) -> float:
  """Tokens/s the store reader hands out (prefetch=0: the caller's thread), after a warm-up batch."""
  with data.get_global_batches(rows, batch_size, prefetch=0) as it:
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
      next(it)
      n += 1
    elapsed = time.perf_counter() - t0
  return n * batch_size * rows.seq_len / elapsed


def demo_step_tokens_per_s(demo_rows: store_lib.RowStore, steps: int = 5) -> tuple[float, str]:
  """Tokens/s of configs/demo.py's real training step (its model, batch and optimizer), jitted."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import demo  # pylint: disable=import-outside-toplevel
  from famjax.train import build  # pylint: disable=import-outside-toplevel
  from famjax.training.trainer import Trainer  # pylint: disable=import-outside-toplevel
  job, _ = build(demo.get_config())
  trainer = Trainer(job)
  trainer.compile()
  state = trainer.initial_state()
  times = []
  with data.get_global_batches(demo_rows, job.train.batch_size) as it:
    for i in range(steps + 1):
      batch = trainer.global_batch(next(it))
      t0 = time.perf_counter()
      state, metrics = trainer.step(state, batch)
      jax.block_until_ready(metrics)
      if i:  # the first step is a warm-up
        times.append(time.perf_counter() - t0)
  tokens = job.train.batch_size * job.train.seq_len
  m = job.model
  what = (f"configs/demo.py: {m.attention}, d_model {m.d_model}, {m.n_layers} layers, batch "
          f"{job.train.batch_size} x {job.train.seq_len}, {jax.device_count()} CPU device")
  return tokens / float(np.median(times)), what


def streaming_tables(duration: float) -> list[str]:
  """The streaming pipeline's throughput (earlier versions of this benchmark)."""
  rows = []
  for mixture, seq_len, repeat, batch in (("famjax_demo_short", 512, 32, 16), ("famjax_demo", 2048, 64, 8),
                                          ("famjax_demo_long", 8704, 256, 4)):
    cfg = data.DataConfig(mixture=mixture, seq_len=seq_len, repeat_segment_len=repeat, prefetch=0)
    rows.append((mixture, seq_len, batch, _stream_rate(cfg, batch, duration)))
  with tempfile.TemporaryDirectory() as tmp:
    cfg = data.DataConfig(mixture="bench_flan40", sources=_write_flan_like(tmp), seq_len=8704, prefetch=0)
    result = _stream_rate(cfg, 8, duration)
    bad = sum(s.get("skipped_missing_field", 0) for s in result["sources"].values())
    rows.append((f"40 JSONL tasks ({bad} bad records skipped)", 8704, 8, result))
  lines = ["| stream | seq_len | rows/batch | first batch (s) | rows/s | tokens/s | fill | examples/s |",
           "|---|---|---|---|---|---|---|---|"]
  for name, seq_len, batch, r in rows:
    lines.append(f"| {name} | {seq_len} | {batch} | {r['first_batch_s']:.2f} | {r['rows_per_s']:.1f} "
                 f"| {r['tokens_per_s']:,.0f} | {r['fill']:.2f} | {r['examples_per_s']:,.0f} |")
  return lines


def _stream_rate(config, batch_size, duration) -> dict:
  with data.get_batches(config, batch_size=batch_size) as it:
    first, _ = seconds(lambda: next(it))
    examples_before = it.stats()["packing"]["examples"]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
      next(it)
      n += 1
    elapsed = time.perf_counter() - t0
    stats = it.stats()
  return {"first_batch_s": first, "rows_per_s": n * batch_size / elapsed,
          "tokens_per_s": n * batch_size * config.seq_len / elapsed, "fill": stats["packing"]["fill"],
          "examples_per_s": (stats["packing"]["examples"] - examples_before) / elapsed,
          "sources": stats["sources"]}


def _write_flan_like(directory: str, n_tasks: int = 40, n_records: int = 500, seed: int = 0):
  rng = np.random.default_rng(seed)
  words = "the a of to and in is it you that he was for on are with as his they be at one have".split()
  sources = []
  for t in range(n_tasks):
    path = os.path.join(directory, f"task{t:02d}.jsonl")
    with open(path, "w") as f:
      for i in range(n_records):
        n_in, n_out = int(rng.integers(10, 400)), int(rng.integers(1, 80))
        f.write(json.dumps({"inputs": f"Task {t}. " + " ".join(rng.choice(words, n_in)),
                            "targets": " ".join(rng.choice(words, n_out))}) + "\n")
        if i % 100 == 0:
          f.write('{"inputs": "a record without its answer"}\n')
    sources.append((f"t{t:02d}", path, float(rng.uniform(0.5, 2.0))))
  return tuple(sources)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--resume_step", type=int, default=50_000)
  parser.add_argument("--batch_size", type=int, default=128, help="global batch (rows)")
  parser.add_argument("--seq_len", type=int, default=8704)
  parser.add_argument("--store_rows", type=int, default=1024, help="rows of the famjax_demo store")
  parser.add_argument("--store", default="", help="store directory (default: a temporary one)")
  parser.add_argument("--demo_store_rows", type=int, default=4096, help="rows of the demo-shaped store")
  parser.add_argument("--replay_batches", type=int, default=3)
  parser.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
  parser.add_argument("--streaming", action="store_true", help="also the streaming pipeline's tables")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  B, L, step = args.batch_size, args.seq_len, args.resume_step

  tmp = tempfile.TemporaryDirectory()
  directory = args.store or os.path.join(tmp.name, "famjax_demo")
  config = data.DataConfig(mixture="famjax_demo", seq_len=L, repeat_segment_len=256,
                           store_rows=args.store_rows, store=directory)
  build_s, rows = seconds(lambda: store_lib.open_or_build(config, say=lambda _: None))
  size = sum(s["bytes"] for s in rows.shards)

  resume_1 = resume_seconds(directory, config, B, step)
  resume_8 = resume_seconds(directory, config, B, step, 0, 8)
  first_1, replayed_1 = replay(config, B, args.replay_batches)
  first_8, replayed_8 = replay(config, B, args.replay_batches, 0, 8)
  per_batch_1 = (replayed_1 - first_1) / args.replay_batches
  per_batch_8 = (replayed_8 - first_8) / args.replay_batches
  replay_1, replay_8 = first_1 + step * per_batch_1, first_8 + step * per_batch_8

  read_big = read_rate(rows, B, args.seconds)
  demo_config = data.DataConfig(mixture="famjax_demo", seq_len=512, repeat_segment_len=32,  # configs/demo.py
                                instruction_weight=0.1, store_rows=args.demo_store_rows,
                                store=os.path.join(tmp.name, "demo"))
  demo_build_s, demo_rows = seconds(lambda: store_lib.open_or_build(demo_config, say=lambda _: None))
  read_demo = read_rate(demo_rows, 8, args.seconds)
  step_rate, step_what = demo_step_tokens_per_s(demo_rows)

  lines = [f"famjax.data on {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), byte "
           f"vocabulary; global batch {B} x {L} (famjax_demo, 256-token repeated segment).", "",
           "| | seconds |", "|---|---|",
           f"| build the store: {len(rows)} rows, {len(rows.shards)} shard(s), {size / 2**20:.0f} MiB | "
           f"{build_s:.1f} ({len(rows) * L / build_s:,.0f} tokens/s) |",
           f"| **restore at step {step:,}** from the store, 1 host ({B} rows), cold cache | "
           f"**{resume_1:.3f}** |",
           f"| restore at step {step:,} from the store, host 0 of 8 ({B // 8} rows), cold cache | "
           f"{resume_8:.3f} |",
           f"| stream, 1 host: first batch / after replaying {args.replay_batches} batches | "
           f"{first_1:.1f} / {replayed_1:.1f} |",
           f"| stream, host 0 of 8: first batch / after replaying {args.replay_batches} batches | "
           f"{first_8:.1f} / {replayed_8:.1f} |",
           f"| **today's replay to step {step:,}, 1 host** (extrapolated: {per_batch_1:.2f} s per batch) | "
           f"**{replay_1:,.0f}** ({replay_1 / 3600:.1f} h) |",
           f"| today's replay to step {step:,}, each of 8 hosts (extrapolated: {per_batch_8:.2f} s per "
           f"batch) | {replay_8:,.0f} ({replay_8 / 3600:.1f} h) |", "",
           "| throughput | tokens/s |", "|---|---|",
           f"| store reader, {B} x {L} (1 host, prefetch=0) | {read_big:,.0f} |",
           f"| streaming pipeline, {B} x {L} (1 host, while replaying) | {B * L / per_batch_1:,.0f} |",
           f"| store reader, demo batch 8 x 512 (prefetch=0) | {read_demo:,.0f} |",
           f"| demo training step ({step_what}) | {step_rate:,.0f} |",
           "", f"A store of the demo's rows ({len(demo_rows)} rows of 512) built in {demo_build_s:.1f} s; "
           f"its reader supplies {read_demo / step_rate:,.0f}x what the demo step consumes."]
  if args.streaming:
    lines += ["", f"Streaming pipeline, prefetch=0, {args.seconds:.0f} s per row:", ""]
    lines += streaming_tables(args.seconds)
  text = "\n".join(lines)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")
  result = {"resume_step": step, "global_batch": B, "seq_len": L, "resume_seconds": round(resume_1, 4),
            "resume_seconds_host0_of_8": round(resume_8, 4),
            "replay_seconds_extrapolated": round(replay_1, 1),
            "replay_seconds_extrapolated_host0_of_8": round(replay_8, 1),
            "store_rows": len(rows), "store_build_seconds": round(build_s, 2),
            "store_read_tokens_per_s": round(read_big), "stream_tokens_per_s": round(B * L / per_batch_1),
            "demo_read_tokens_per_s": round(read_demo), "demo_step_tokens_per_s": round(step_rate),
            "throughput_ratio": round(read_demo / step_rate, 1)}
  tmp.cleanup()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
