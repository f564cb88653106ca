"""The block attention a bounded number of blocks at a time (`model.attention_chunk`) and the MLP a bounded
number of tokens at a time (`model.mlp_chunk`): memory and time; and the default path's step time before
and after the change that added them.

  python benchmarks/bench_attention.py [--steps 5] [--baseline 4c26bb0] [--tables baseline,scores,long,demo,mlp]

1. `--baseline REF` (a git commit; 4c26bb0 is the last one without attention_chunk and attention_impl):
   the demo config and the d768 config of benchmarks/bench_train.py, both with the defaults
   (attention_chunk 0, attention_impl "xla"), REF's code against this tree's.
2. attention_chunk 0, 1, 2, 4: the demo model (d256 x 4 layers, 4 heads of 64) at block 128, 3 memory
   blocks, FAM 8, 1 x 2048 tokens (16 blocks per sequence), remat full, as the paper's configs train.
   Per block, its scores (block x heads floats per key) are only twice its keys (heads x head dim).
3. the same at the paper's block structure, block 1024, 3 memory blocks, FAM 64, 1 x 8192 tokens (8
   blocks), as the 8k rows of benchmarks/bench_train.py: scores 16 times the keys (the paper's 1B: 8).
4. the demo config itself (block 64, 1 memory block, 8 x 512 tokens: 8 blocks of small scores), 0 vs 2.
5. mlp_chunk 0, 512, 2048 at the shape of 3 with attention_chunk 1 (the MLP's [8192, 1024] activations
   then outweigh one block's scores), and 0 vs 256 at the d768 config (4 x 1024 tokens, MLP 3072).

Every row is a train step of its own worker process (its code tree, one CPU device, synthetic batches),
compiled ahead of time: a hash of its compiled program (without source locations: equal hashes, the
same program), the step's memory from XLA's memory_analysis (temporaries, and arguments + outputs -
donated + temporaries, the line famjax.train prints at compile), and the median of `--steps` step
times. The rows of a table step interleaved, one step of each in turn (in alternating order), after a
warm-up step each, so that other load on the machine falls on all alike; the time ratio is to the
table's first row.
docs/training.md ("Attention scores a group of blocks at a time, the MLP a group of tokens at a time") holds
a run's tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

D768 = {"model.d_model": 768, "model.n_heads": 12, "model.n_kv_heads": 12, "model.mlp_dim": 3072,
        "seq_len": 1024, "batch_size": 4}  # bench_train.py's "small" row
SCORES = {"model.block_size": 128, "model.mem_segments": 3, "seq_len": 2048, "batch_size": 1,
          "model.remat": "full"}
LONG = {"model.block_size": 1024, "model.mem_segments": 3, "model.fam_len": 64, "seq_len": 8192,
        "batch_size": 1, "model.remat": "full"}  # bench_train.py's 8k rows: the paper's block structure


def worker(root: str, changes: dict) -> None:
  """Compile the step of demo + `changes` with the code in `root`; print its memory as one JSON line, then
  time one step for every line read from stdin."""
  sys.path.insert(0, root)
  import jax  # pylint: disable=import-outside-toplevel

  from configs import demo  # pylint: disable=import-outside-toplevel
  from famjax.training.config import job_config  # pylint: disable=import-outside-toplevel
  from famjax.training.synthetic import SyntheticBatches  # pylint: disable=import-outside-toplevel
  from famjax.training.trainer import Trainer  # pylint: disable=import-outside-toplevel

  import famjax  # pylint: disable=import-outside-toplevel
  assert os.path.dirname(os.path.dirname(famjax.__file__)) == root, famjax.__file__

  c = demo.get_config().to_dict()
  c["data"]["mixture"] = "synthetic"
  for key, value in changes.items():
    *path, last = key.split(".")
    section = c
    for p in path:
      section = section[p]
    section[last] = value
  trainer = Trainer(job_config(c, vocab_size=259))
  trainer.compile()
  m = trainer.programs.compiled_step.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  print(json.dumps({"temp": m.temp_size_in_bytes, "total": total,
                    "program": program_hash(trainer.programs.compiled_step.as_text())}), flush=True)
  state = trainer.initial_state()
  batches = SyntheticBatches(trainer.job.train.batch_size, trainer.job.train.seq_len)
  for _ in sys.stdin:
    batch = trainer.global_batch(next(batches))
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    print(time.perf_counter() - t0, flush=True)


def program_hash(hlo: str) -> str:
  """A short hash of a compiled program's instructions, without the source locations: equal hashes, the
  same program (how the default path is compared with the baseline's, besides its time)."""
  instruction = re.compile(r"^\s*(ROOT )?%?[\w.\-]+ = |^(ENTRY )?%?[\w.\-]+ .*\{$")
  lines = [re.sub(r", (metadata|frontend_attributes)=\{[^}]*\}|stack_frame_id=\d+", "", line)
           for line in hlo.splitlines() if instruction.match(line)]
  return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:10]


class Row:
  """A worker process: start() spawns it; ready() waits for its compiled step's memory; step() times one."""

  def __init__(self, label: str, root: str, changes: dict):
    self.label, self.root, self.changes, self.times = label, root, changes, []

  def start(self) -> "Row":
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": self.root}
    env.pop("XLA_FLAGS", None)
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([self.root, self.changes])],
        cwd=self.root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return self

  def ready(self) -> None:
    self.memory = json.loads(self._line())

  def step(self, record: bool) -> None:
    self.proc.stdin.write("step\n")
    self.proc.stdin.flush()
    seconds = float(self._line())
    if record:
      self.times.append(seconds)

  def stop(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()

  def _line(self) -> str:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the worker of {self.label!r} ended (exit {self.proc.wait()})")
    return line


def table(title: str, rows: list[Row], steps: int) -> str:
  """Compile the rows one after another, step them interleaved; the markdown table."""
  for row in rows:
    row.start().ready()
  for i in range(steps + 1):  # the first step of each row is a warm-up
    for row in rows if i % 2 else rows[::-1]:  # alternating order: neither row always comes first
      row.step(record=i > 0)
  for row in rows:
    row.stop()
  gib = lambda n: f"{n / 2**30:.3g} GiB"  # noqa: E731
  first = statistics.median(rows[0].times)
  lines = [f"\n{title}\n", "| run | program | temporaries | step memory | s/step (median) | time ratio |",
           "|---|---|---:|---:|---:|---:|"]
  for row in rows:
    median = statistics.median(row.times)
    lines.append(f"| {row.label} | {row.memory['program']} | {gib(row.memory['temp'])} | "
                 f"{gib(row.memory['total'])} | "
                 f"{median:.3f} | {median / first:.3f} |")
  text = "\n".join(lines)
  print(text, flush=True)
  return text


def checkout(ref: str, into: str) -> str:
  """The tracked files of commit `ref` in the directory `into` (git archive; the repository untouched)."""
  archive = os.path.join(into, "tree.tar")
  subprocess.run(["git", "archive", "--format=tar", "-o", archive, ref], cwd=ROOT, check=True)
  root = os.path.join(into, "tree")
  with tarfile.open(archive) as tar:
    tar.extractall(root)
  return root


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--baseline", default="", help="a git commit to compare the default path with")
  parser.add_argument("--tables", default="baseline,scores,long,demo,mlp", help="which tables (1-5 above)")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(*json.loads(args.worker))
    return
  tables = args.tables.split(",")
  if args.baseline and "baseline" in tables:
    with tempfile.TemporaryDirectory() as tmp:
      base = checkout(args.baseline, tmp)
      for name, changes in (("demo", {}), ("d768", D768)):
        table(f"{name} config, defaults: {args.baseline} vs this tree",
              [Row(f"{name}, {args.baseline}", base, changes), Row(f"{name}, this tree", ROOT, changes)],
              args.steps)
  if "scores" in tables:
    table("attention_chunk: demo model, block 128, mem 3, FAM 8, 1 x 2048 tokens, remat full",
          [Row(f"attention_chunk={k}", ROOT, {**SCORES, "model.attention_chunk": k}) for k in (0, 1, 2, 4)],
          args.steps)
  if "long" in tables:
    table("attention_chunk: demo model, block 1024, mem 3, FAM 64, 1 x 8192 tokens, remat full",
          [Row(f"attention_chunk={k}", ROOT, {**LONG, "model.attention_chunk": k}) for k in (0, 1, 2, 4)],
          args.steps)
  if "demo" in tables:
    table("attention_chunk: the demo config (block 64, mem 1, 8 x 512 tokens, remat none)",
          [Row(f"attention_chunk={k}", ROOT, {"model.attention_chunk": k}) for k in (0, 2)], args.steps)
  if "mlp" in tables:
    table("mlp_chunk: demo model, block 1024, mem 3, FAM 64, 1 x 8192 tokens, remat full, attention_chunk 1",
          [Row(f"mlp_chunk={k}", ROOT, {**LONG, "model.attention_chunk": 1, "model.mlp_chunk": k})
           for k in (0, 512, 2048)], args.steps)
    table("mlp_chunk: d768 x 4 layers, 4 x 1024 tokens",
          [Row(f"mlp_chunk={k}", ROOT, {**D768, "model.mlp_chunk": k}) for k in (0, 256)], args.steps)


if __name__ == "__main__":
  main()
