"""The recall suite at small scale, in one command on 2 CPU cores: multi-key PassKey and MQAR-like
associative recall (famjax.data.recall) for BSWA (0, 1, 2 memory segments), FAM, FAM with the write gate
and full attention, all the same size, steps and data.

  python experiments/recall_suite.py --out=workdirs/recall_suite [--lengths=512,2k,8k,32k]

1. trains the variants of configs/recall_small.py from scratch on `recall_small` (multikey_small and
   mqar_small, rows of 128 to 512 tokens), two jobs at a time (experiments/passkey_small.py's runner);
2. evaluates them with `python -m famjax.eval --recall_tasks=multikey,mqar` on the streaming path:
   OUT/eval/results.{json,md}; full attention, whose cache grows with the text, in its own call up to
   configs/recall_small.FULL_MAX_LENGTH: OUT/eval/full/;
3. prints one table, rows = models in the order of the paper's Table 11 (BSWA by memory segments, then
   FAM; then this suite's extra rows, FAM with the gate and full attention), columns = task x length,
   cells = exact match (%) over the questions, "-" where a model was not evaluated; also written to
   OUT/eval/recall_table.md.

Every step is an ordinary famjax command, printed before it runs (its output in the run's train.log or
OUT/eval/NAME.log). Run it again after a stop and it resumes from the checkpoints. No results of this
experiment have been measured yet (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]
from configs.recall_small import FULL_MAX_LENGTH, VARIANTS  # noqa: E402  (ml_collections only)
from famjax.evaluation.lengths import format_length, parse_lengths  # noqa: E402
from passkey_small import run_parallel  # noqa: E402  (experiments/passkey_small.py's job runner)

CONFIG = "configs/recall_small.py"
TASKS = ("multikey", "mqar")
LENGTHS = "512,2k,8k,32k"  # the longest training row (512 tokens) up to 64x it


def train_command(variant: str, workdir: Path, steps: int | None) -> list[str]:
  """`python -m famjax.train` of one variant."""
  cmd = [sys.executable, "-m", "famjax.train", f"--config={CONFIG}:{variant}", f"--workdir={workdir}"]
  return cmd + ([f"--config.steps={steps}"] if steps is not None else [])


def eval_command(models: dict[str, Path], lengths: list[int], examples: int, out_dir: Path) -> list[str]:
  """`python -m famjax.eval` of the models ({name: workdir}) on the recall tasks at `lengths`."""
  return [sys.executable, "-m", "famjax.eval", *(f"--model={n}={p}" for n, p in models.items()),
          f"--recall_tasks={','.join(TASKS)}", f"--recall_lengths={','.join(map(str, lengths))}",
          f"--recall_examples={examples}", f"--out_dir={out_dir}"]


def eval_commands(out: Path, variants, lengths: list[int], examples: int) -> dict[str, list[str]]:
  """{name: command}: "eval" for every variant but full (OUT/eval), "eval_full" for full at the lengths
  up to FULL_MAX_LENGTH (OUT/eval/full); a call with no model or no length is left out."""
  commands = {}
  windowed = {v: out / v for v in variants if v != "full"}
  if windowed:
    commands["eval"] = eval_command(windowed, lengths, examples, out / "eval")
  full_lengths = [n for n in lengths if n <= FULL_MAX_LENGTH]
  if "full" in variants and full_lengths:
    commands["eval_full"] = eval_command({"full": out / "full"}, full_lengths, examples,
                                         out / "eval" / "full")
  return commands


def table(results: list[dict], lengths: list[int]) -> str:
  """Markdown from famjax.eval results.json dicts: rows = models (VARIANTS' order, then any other, in
  the order found), columns = task x length, cells = exact match (%) over the questions."""
  cells: dict[str, dict[tuple[str, int], float]] = {}
  for result in results:
    for name, entry in result["models"].items():
      for row in entry.get("recall", []):
        cells.setdefault(name, {})[(row["task"], row["total_tokens"])] = row["exact_match"]
  names = [v for v in VARIANTS if v in cells] + [n for n in cells if n not in VARIANTS]
  columns = [(t, n) for t in TASKS for n in lengths]
  lines = ["| model | " + " | ".join(f"{t} {format_length(n)}" for t, n in columns) + " |",
           "|---|" + "---:|" * len(columns)]
  for name in names:
    values = [_percent(cells[name].get(c)) for c in columns]
    lines.append(f"| {name} | " + " | ".join(values) + " |")
  return "\n".join(lines)


def _percent(value: float | None) -> str:
  if value is None:
    return "-"
  return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="workdirs/recall_suite", help="where the runs and results go")
  parser.add_argument("--steps", type=int, default=None, help="training steps per model (the config's)")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="variants to train and evaluate")
  parser.add_argument("--lengths", default=LENGTHS, help="recall lengths to evaluate (tokens)")
  parser.add_argument("--examples", type=int, default=16, help="examples per task and length")
  parser.add_argument("--jobs", type=int, default=2, help="training jobs at once")
  args = parser.parse_args(argv)
  out = Path(args.out).absolute()
  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown or not variants:
    parser.error(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
  try:
    lengths = parse_lengths(args.lengths)
  except ValueError as e:
    parser.error(f"--lengths: {e}")
  if args.jobs < 1 or args.examples < 1:
    parser.error("--jobs and --examples must be >= 1")

  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # ends the running jobs too
  t0 = time.perf_counter()
  evals = eval_commands(out, variants, lengths, args.examples)
  try:
    run_parallel({v: train_command(v, out / v, args.steps) for v in variants},
                 {v: out / v / "train.log" for v in variants}, args.jobs)
    run_parallel(evals, {name: out / "eval" / f"{name}.log" for name in evals}, args.jobs)
  except RuntimeError as e:
    print(f"recall_suite: {e}", file=sys.stderr)
    return 1
  (out / "eval").mkdir(parents=True, exist_ok=True)
  dirs = {"eval": out / "eval", "eval_full": out / "eval" / "full"}
  results = [json.loads((dirs[name] / "results.json").read_text()) for name in evals]
  text = table(results, lengths)
  (out / "eval" / "recall_table.md").write_text(text + "\n")
  print(f"Recall exact match (%, {args.examples} examples per task and length)\n\n{text}\n")
  print(f"wall time {(time.perf_counter() - t0) / 60:.1f} min; results: {out / 'eval'} (recall_table.md, "
        "results.md, results.json; full attention's in full/)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
