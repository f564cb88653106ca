"""What the attention patterns and the ablation switches cost: the train step of each, side by side.

  python benchmarks/bench_ablations.py [--steps 5] [--seq_len 4096]

The demo model (configs/demo.py: d256 x 4 layers) at block 256, 3 memory blocks, FAM 16, one sequence of
`--seq_len` tokens, remat full, on synthetic batches: bswa, fam with every switch at its default, fam with
each switch of docs/ablations.md set, and token-level sliding window attention (swa) with the reach of
the bswa row, window = (mem_segments + 1) x block_size tokens (a bswa token sees 3 to 4 blocks back).
Each row's step is compiled in this process; the rows step interleaved, one step of each in turn after a
warm-up step each, so that the machine's load falls on all alike; the median of `--steps` steps, and
the ratio to bswa's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from configs import demo  # noqa: E402
from famjax.training.config import job_config  # noqa: E402
from famjax.training.synthetic import SyntheticBatches  # noqa: E402
from famjax.training.trainer import Trainer  # noqa: E402

BLOCK, MEMORY, FAM = 256, 3, 16


def job(variant: str, seq_len: int, **model):
  c = demo.get_config(variant).to_dict()
  c["data"]["mixture"] = "synthetic"
  c.update(batch_size=1, seq_len=seq_len, tensorboard=False)
  c["model"].update(block_size=BLOCK, mem_segments=MEMORY, remat="full")
  if variant == "fam":
    c["model"]["fam_len"] = FAM
  c["model"].update(model)
  return job_config(c, vocab_size=259)


def rows(seq_len: int) -> dict:
  return {
      "bswa": job("bswa", seq_len),
      "fam (defaults)": job("fam", seq_len),
      "fam, mem_stop_gradient": job("fam", seq_len, mem_stop_gradient=True),
      "fam, fam_position=between": job("fam", seq_len, fam_position="between"),
      "fam, fam_init=prefix": job("fam", seq_len, fam_init="prefix"),
      "fam, fam_history=2": job("fam", seq_len, fam_history=2),
      f"swa, window {(MEMORY + 1) * BLOCK}": job("bswa", seq_len, attention="swa",
                                                  window=(MEMORY + 1) * BLOCK, mem_segments=0),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--seq_len", type=int, default=4096)
  args = parser.parse_args(argv)
  runs = {}
  for label, j in rows(args.seq_len).items():
    trainer = Trainer(j)
    trainer.compile()
    it = SyntheticBatches(1, args.seq_len, seed=0)
    runs[label] = [trainer, trainer.initial_state(), it, []]
  for i in range(args.steps + 1):
    for label, run in runs.items():
      trainer, state, it, times = run
      batch = trainer.global_batch(next(it))
      t0 = time.perf_counter()
      state, metrics = trainer.step(state, batch)
      jax.block_until_ready(metrics)
      run[1] = state
      if i:  # step 0 is the warm-up
        times.append(time.perf_counter() - t0)
  median = {label: statistics.median(run[3]) for label, run in runs.items()}
  print(f"demo width, block {BLOCK}, {MEMORY} memory blocks, FAM {FAM}, 1 x {args.seq_len} tokens, remat full, "
        f"median of {args.steps} interleaved steps\n")
  print("| row | s/step | vs bswa |\n|---|---:|---:|")
  for label, seconds in median.items():
    print(f"| {label} | {seconds:.3f} | {seconds / median['bswa']:.3f} |")


if __name__ == "__main__":
  main()
