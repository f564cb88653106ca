"""The paper's PassKey result (spec §8) at small scale, in one command on 2 CPU cores.

  python experiments/passkey_small.py --out=workdirs/passkey_small

1. trains the variants of configs/passkey_small.py from scratch (FAM with the spec's defaults; FAM with
   the write gate, a famjax extension; BSWA with 0, 1 and 2 memory segments), all the same size (the
   gate adds 2 x 72 weights), steps and data (`passkey_random_small`: rows of 64 to 512 tokens,
   random-letter filler), two jobs at a time, each pinned to its own core;
2. evaluates them on PassKey (random filler) from the longest training row (512 tokens) to 64x it, 32
   examples per length at evenly spaced key depths, on the streaming path, in one `python -m famjax.eval`
   call: OUT/eval/results.{json,md} and OUT/eval/passkey.png (one line per model);
3. evaluates the FAM models on the repeated-phrase filler (the structure of the paper's filler):
   OUT/eval/repeated/;
4. measures the FAM models' state (experiments/fam_state.py) on random and repeated filler:
   OUT/eval/fam_state_{random,repeated}.md.

Every step is an ordinary famjax command (printed before it runs; its output goes to OUT/VARIANT/train.log)
so each can be rerun or inspected alone. Run it again after a stop and it resumes: training jobs restart
from their last checkpoint and finished ones only check that they are finished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from configs.passkey_small import EXTRA_VARIANTS, VARIANTS  # noqa: E402  (ml_collections only)

CONFIG = "configs/passkey_small.py"
LENGTHS = "512,1k,2k,4k,8k,16k,32k"  # the longest training row (512 tokens) up to 64x it
FORMAT = "random"  # the training data's filler; REPEATED is evaluated as its own row
REPEATED = "repeated"


def train_command(variant: str, out: Path, steps: int | None) -> list[str]:
  cmd = [sys.executable, "-m", "famjax.train", f"--config={CONFIG}:{variant}", f"--workdir={out / variant}"]
  return cmd + ([f"--config.steps={steps}"] if steps is not None else [])


def eval_command(out: Path, variants, lengths: str, examples: int, fmt: str, out_dir: Path) -> list[str]:
  return [sys.executable, "-m", "famjax.eval", *(f"--model={v}={out / v}" for v in variants),
          f"--passkey_lengths={lengths}", f"--passkey_examples={examples}", f"--passkey_format={fmt}",
          f"--out_dir={out_dir}"]


def fam_state_command(out: Path, variants, examples: int, fmt: str) -> list[str]:
  return [sys.executable, str(ROOT / "experiments" / "fam_state.py"),
          *(f"--model={v}={out / v}" for v in variants), f"--examples={examples}", f"--format={fmt}",
          f"--out={out / 'eval' / f'fam_state_{fmt}.md'}"]


def _cores() -> list[int]:
  return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def run_parallel(commands: dict[str, list[str]], logs: dict[str, Path], jobs: int) -> dict[str, float]:
  """Runs the commands, at most `jobs` at once; returns wall seconds per name. The first failure stops
  the others and raises with the tail of its log. With several jobs and at least as many cores, each job
  is pinned to cores of its own (two XLA processes sharing cores are slower than each on its own)."""
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  waiting, running, seconds = list(commands), {}, {}
  cores = _cores()
  pin = jobs > 1 and len(cores) >= jobs
  try:
    while waiting or running:
      while waiting and len(running) < jobs:
        name = waiting.pop(0)
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        slot = min(set(range(jobs)) - {r[2] for r in running.values()})
        mine = set(cores[slot::jobs]) if pin else None
        print(f"+ {' '.join(commands[name])}  > {logs[name]}" + (f"  (cores {sorted(mine)})" if pin else ""),
              flush=True)
        with open(logs[name], "a") as log:  # a resumed job adds to its log
          running[name] = (subprocess.Popen(commands[name], cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            preexec_fn=(lambda c=mine: os.sched_setaffinity(0, c)) if pin
                                            else None), time.perf_counter(), slot)
      time.sleep(1.0)
      for name, (proc, t0, _) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[name]
        seconds[name] = time.perf_counter() - t0
        if proc.returncode != 0:
          tail = "".join(logs[name].read_text().splitlines(keepends=True)[-20:])
          raise RuntimeError(f"{name} failed (exit {proc.returncode}); the end of {logs[name]}:\n{tail}")
        print(f"  {name} done in {seconds[name] / 60:.1f} min", flush=True)
  finally:
    for proc, _, _ in running.values():
      proc.terminate()
  return seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="workdirs/passkey_small", help="where the runs and results go")
  parser.add_argument("--steps", type=int, default=None, help="training steps per model (the config's)")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"variants to train and evaluate (also: {', '.join(EXTRA_VARIANTS)})")
  parser.add_argument("--lengths", default=LENGTHS, help="PassKey lengths to evaluate (tokens)")
  parser.add_argument("--examples", type=int, default=32, help="PassKey examples per length")
  parser.add_argument("--jobs", type=int, default=2, help="training jobs at once")
  args = parser.parse_args(argv)
  out = Path(args.out).absolute()
  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS + EXTRA_VARIANTS))
  if unknown or not variants:
    parser.error(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS + EXTRA_VARIANTS)})")
  if args.jobs < 1:
    parser.error(f"--jobs must be >= 1, got {args.jobs}")

  # SIGTERM (a scheduler, `kill`) ends the running jobs too; each resumes from its checkpoint next time.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  t0 = time.perf_counter()
  try:
    seconds = run_parallel({v: train_command(v, out, args.steps) for v in variants},
                           {v: out / v / "train.log" for v in variants}, args.jobs)
    evals = {"eval": eval_command(out, variants, args.lengths, args.examples, FORMAT, out / "eval")}
    fam_variants = [v for v in variants if v.startswith("fam")]
    if fam_variants:
      evals["eval_repeated"] = eval_command(out, fam_variants, args.lengths, args.examples, REPEATED,
                                            out / "eval" / REPEATED)
      for fmt in (FORMAT, REPEATED):
        evals[f"fam_state_{fmt}"] = fam_state_command(out, fam_variants, args.examples, fmt)
    seconds.update(run_parallel(evals, {name: out / "eval" / f"{name}.log" for name in evals}, args.jobs))
  except RuntimeError as e:
    print(f"passkey_small: {e}", file=sys.stderr)
    return 1
  seconds["total"] = time.perf_counter() - t0
  (out / "eval" / "seconds.json").write_text(json.dumps(seconds, indent=1))
  print((out / "eval" / "results.md").read_text())
  if fam_variants:
    print(f"repeated-phrase filler (trained on random filler):\n{(out / 'eval' / REPEATED / 'results.md').read_text()}")
  print(f"wall time {seconds['total'] / 60:.1f} min; results: {out / 'eval'} (results.md, results.json, "
        "passkey.png)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
