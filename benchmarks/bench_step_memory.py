"""What gradient accumulation and the chunked loss cost and save: the demo's train step, compiled.

  python benchmarks/bench_step_memory.py [--steps 5] [--tables microbatches,loss]

For each row: the step's memory per device from XLA's memory_analysis (arguments + outputs - donated +
temporaries, the line famjax.train prints at compile) and the median time of `--steps` steps, the rows
of one table run interleaved (one step of each in turn) so that the machine's load falls on all alike;
the ratio is to the table's first row. The demo config (configs/demo.py: batch 8 x 512, one device) on
synthetic batches; the chunked-loss table also at a 32768-token vocabulary, where the logits matter, with
the loss in tiles of 128 tokens x a quarter of the vocabulary (loss_vocab_chunk).
The tables of docs/training.md ("Gradient accumulation", "The loss a chunk at a time") come from here.
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


def trainer(**fields) -> Trainer:
  c = demo.get_config().to_dict()
  c["data"]["mixture"] = "synthetic"
  vocab = fields.pop("vocab_size", None)
  if vocab:
    c["model"]["vocab_size"] = vocab
  c.update(fields)
  t = Trainer(job_config(c, vocab_size=256))
  t.compile()
  return t


def table(title: str, rows: dict, steps: int) -> None:
  """rows: label -> Trainer. Prints memory and the median interleaved step time of each."""
  runs = {label: [t, t.initial_state(), SyntheticBatches(t.job.train.batch_size, t.job.train.seq_len, 0)]
          for label, t in rows.items()}
  times = {label: [] for label in rows}
  for i in range(steps + 1):  # the first step of each row is a warm-up
    for label, run in runs.items():
      t, state, it = run
      batch = t.global_batch(next(it))
      t0 = time.perf_counter()
      state, metrics = t.step(state, batch)
      jax.block_until_ready(metrics)
      run[1] = state
      if i:
        times[label].append(time.perf_counter() - t0)
  median = {label: statistics.median(v) for label, v in times.items()}
  first = next(iter(median.values()))
  print(f"\n{title}\n\n| run | step memory | s/step | time ratio |\n|---|---:|---:|---:|")
  for label, t in rows.items():
    memory = t.memory_summary().split(": ", 1)[1].split(" = ")[0]
    print(f"| {label} | {memory} | {median[label]:.3f} | {median[label] / first:.3f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--tables", default="microbatches,loss", help="which tables: microbatches, loss")
  args = parser.parse_args()
  tables = args.tables.split(",")
  if "microbatches" in tables:
    table("gradient accumulation (demo, batch 8 x 512)",
          {f"microbatches={k}": trainer(microbatches=k) for k in (1, 2, 4, 8)}, args.steps)
  if "loss" in tables:
    for vocab in (259, 32768):
      tile = -(-vocab // 4)
      table(f"chunked loss (demo, vocabulary {vocab})",
            {"loss_chunk=0": trainer(vocab_size=vocab),
             "loss_chunk=128": trainer(loss_chunk=128, vocab_size=vocab),
             f"loss_chunk=128, loss_vocab_chunk={tile}": trainer(loss_chunk=128, loss_vocab_chunk=tile,
                                                                  vocab_size=vocab)}, args.steps)


if __name__ == "__main__":
  main()
