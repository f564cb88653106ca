"""Training throughput on this machine: tokens/s and MFU of the train step, and fam vs bswa vs full.

  python benchmarks/bench_train.py [--steps 5] [--out bench_results/train.md]

1. The demo config (configs/demo.py) and a small config (d768, 12 heads of 64, mlp 3072, 4 layers, the
   demo's block 64 / FAM 8: wide enough that matmuls dominate): tokens/s and MFU against this machine's
   measured float32 matmul peak (famjax.training.flops).
2. fam vs bswa vs full at 8k tokens per sequence (block 1024, 3 memory segments, FAM 64, as the paper's
   recipe, on the demo model's width): training tokens/s and the ratios.

Each row times whole train steps (forward, backward, optimizer update, RSP/RPO) after a warm-up step,
on synthetic batches (no input pipeline cost), and reports the median step. The CPU peak is the best of
several matmul measurements taken around the rows, so other load on the machine lowers the reported MFU
rather than raising it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from configs import demo  # noqa: E402
from famjax.training import flops  # noqa: E402
from famjax.training.config import job_config  # noqa: E402
from famjax.training.trainer import Trainer  # noqa: E402
from famjax.training.synthetic import SyntheticBatches  # noqa: E402


def job(variant="fam", **changes):
  c = demo.get_config(variant).to_dict()
  c["data"]["mixture"] = "synthetic"
  for key, value in changes.items():
    *path, last = key.split(".")
    section = c
    for p in path:
      section = section[p]
    section[last] = value
  return job_config(c, vocab_size=259)


ROWS = {
    "demo (fam, d256 x 4 layers, 8 x 512 tokens)": job(),
    "small (fam, d768 x 4 layers, 4 x 1024 tokens)": job(**{
        "model.d_model": 768, "model.n_heads": 12, "model.n_kv_heads": 12, "model.mlp_dim": 3072,
        "seq_len": 1024, "batch_size": 4}),
}
LONG = {"model.block_size": 1024, "model.mem_segments": 3, "seq_len": 8192, "batch_size": 1,
        "model.remat": "full"}
ATTENTION_ROWS = {
    "fam (block 1024, mem 3, F 64)": job("fam", **LONG, **{"model.fam_len": 64}),
    "bswa (block 1024, mem 3)": job("bswa", **LONG),
    "full": job("full", **LONG),
}


def time_steps(j, steps: int) -> tuple[float, float]:
  """(median seconds per step, compile seconds) of the job's train step."""
  trainer = Trainer(j)
  compile_s = trainer.compile()
  state = trainer.initial_state()
  it = SyntheticBatches(j.train.batch_size, j.train.seq_len)
  batch = trainer.global_batch(next(it))
  state, m = trainer.step(state, batch)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    batch = trainer.global_batch(next(it))
    t0 = time.perf_counter()
    state, m = trainer.step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return statistics.median(times), compile_s


def cpu_peak() -> float:
  """Best float32 matmul FLOP/s of a few sizes, a few times."""
  return max(flops.measure_cpu_peak(n, "float32", 5) for n in (1024, 2048, 1024, 2048))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--out", default=None, help="also write the markdown here")
  args = parser.parse_args()

  peaks = [cpu_peak()]
  lines = [f"famjax train step on {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPU cores, jax {jax.__version__}, {jax.devices()[0].device_kind}", ""]
  lines += ["| config | tokens/step | step (s) | tokens/s | model GFLOP/step | MFU |",
            "|---|---|---|---|---|---|"]
  results = []
  for name, j in ROWS.items():
    seconds, _ = time_steps(j, args.steps)
    peaks.append(cpu_peak())
    results.append((name, j, seconds))
  peak = max(peaks)
  for name, j, seconds in results:
    tokens = j.train.batch_size * j.train.seq_len
    f = flops.train_flops_per_step(j.model, j.train.batch_size, j.train.seq_len)
    lines.append(f"| {name} | {tokens} | {seconds:.3f} | {tokens / seconds:,.0f} | {f / 1e9:.1f} | "
                 f"{100 * flops.mfu(f, seconds, peak):.1f}% |")
  lines += ["", f"MFU against the measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s "
            f"(best of {len(peaks)} measurements; lowest {min(peaks) / 1e9:.1f})", ""]

  lines += ["8192 tokens per sequence, batch 1, the demo model's width (d256 x 4 layers), remat full:", "",
            "| attention | step (s) | tokens/s | vs bswa | model GFLOP/step | MFU |",
            "|---|---|---|---|---|---|"]
  timed = {name: time_steps(j, args.steps)[0] for name, j in ATTENTION_ROWS.items()}
  bswa = next(v for k, v in timed.items() if k.startswith("bswa"))
  for name, j in ATTENTION_ROWS.items():
    f = flops.train_flops_per_step(j.model, 1, 8192)
    lines.append(f"| {name} | {timed[name]:.3f} | {8192 / timed[name]:,.0f} | {bswa / timed[name]:.3f} | "
                 f"{f / 1e9:.1f} | {100 * flops.mfu(f, timed[name], peak):.1f}% |")
  text = "\n".join(lines)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
