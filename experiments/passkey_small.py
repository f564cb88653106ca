"""The paper's PassKey result (spec §8) at small scale, in one command on 2 CPU cores.

  python experiments/passkey_small.py --out=workdirs/passkey_small

1. pretrains one small decoder (full attention) on dense digit copying: the shared starting point, as
   the paper starts every variant from the same pretrained model;
2. trains the variants of configs/passkey_small.py from it (FAM with Random State Passing from the first
   step, from half-way, and without; BSWA with 0, 1 and 2 memory segments), all the same size, steps and
   data, two jobs at a time;
3. evaluates them on PassKey (short format) from the training row's length up to 16x it, on the
   streaming path, in one `python -m famjax.eval` call: OUT/eval/results.{json,md} and OUT/eval/passkey.png
   (one line per model);
4. measures the FAM models' state (experiments/fam_state.py): OUT/eval/fam_state.md.

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
from configs.passkey_small import PRETRAIN, VARIANTS  # noqa: E402  (ml_collections only)

CONFIG = "configs/passkey_small.py"
LENGTHS = "256,512,1k,2k,4k"  # the training row (256 tokens) up to 16x it


def train_command(variant: str, out: Path, steps: int | None) -> list[str]:
  cmd = [sys.executable, "-m", "famjax.train", f"--config={CONFIG}:{variant}", f"--workdir={out / variant}"]
  if variant != PRETRAIN:
    cmd.append(f"--config.init_from={out / PRETRAIN}")
  return cmd + ([f"--config.steps={steps}"] if steps is not None else [])


def eval_command(out: Path, variants, lengths: str, examples: int) -> list[str]:
  return [sys.executable, "-m", "famjax.eval", *(f"--model={v}={out / v}" for v in variants),
          f"--passkey_lengths={lengths}", f"--passkey_examples={examples}", "--passkey_format=short",
          f"--out_dir={out / 'eval'}"]


def fam_state_command(out: Path, variants, examples: int) -> list[str]:
  return [sys.executable, str(ROOT / "experiments" / "fam_state.py"),
          *(f"--model={v}={out / v}" for v in variants), f"--examples={examples}",
          f"--out={out / 'eval' / 'fam_state.md'}"]


def run_parallel(commands: dict[str, list[str]], logs: dict[str, Path], jobs: int) -> dict[str, float]:
  """Runs the commands, at most `jobs` at once; returns wall seconds per name. The first failure stops
  the others and raises with the tail of its log."""
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  waiting, running, seconds = list(commands), {}, {}
  try:
    while waiting or running:
      while waiting and len(running) < jobs:
        name = waiting.pop(0)
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        print(f"+ {' '.join(commands[name])}  > {logs[name]}", flush=True)
        with open(logs[name], "a") as log:  # a resumed job adds to its log
          running[name] = (subprocess.Popen(commands[name], cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT), time.perf_counter())
      time.sleep(1.0)
      for name, (proc, t0) in list(running.items()):
        if proc.poll() is None:
          continue
        del running[name]
        seconds[name] = time.perf_counter() - t0
        if proc.returncode != 0:
          tail = "".join(logs[name].read_text().splitlines(keepends=True)[-20:])
          raise RuntimeError(f"{name} failed (exit {proc.returncode}); the end of {logs[name]}:\n{tail}")
        print(f"  {name} done in {seconds[name] / 60:.1f} min", flush=True)
  finally:
    for proc, _ in running.values():
      proc.terminate()
  return seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="workdirs/passkey_small", help="where the runs and results go")
  parser.add_argument("--steps", type=int, default=None, help="training steps per model (the config's)")
  parser.add_argument("--pretrain_steps", type=int, default=None, help="steps of the shared pretraining")
  parser.add_argument("--variants", default=",".join(VARIANTS), help="variants to train and evaluate")
  parser.add_argument("--lengths", default=LENGTHS, help="PassKey lengths to evaluate (tokens)")
  parser.add_argument("--examples", type=int, default=16, help="PassKey examples per length")
  parser.add_argument("--jobs", type=int, default=2, help="training jobs at once")
  args = parser.parse_args(argv)
  out = Path(args.out).absolute()
  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown or not variants:
    parser.error(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
  if args.jobs < 1:
    parser.error(f"--jobs must be >= 1, got {args.jobs}")

  # SIGTERM (a scheduler, `kill`) ends the running jobs too; each resumes from its checkpoint next time.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  t0 = time.perf_counter()
  try:
    seconds = run_parallel({PRETRAIN: train_command(PRETRAIN, out, args.pretrain_steps)},
                           {PRETRAIN: out / PRETRAIN / "train.log"}, 1)
    seconds.update(run_parallel({v: train_command(v, out, args.steps) for v in variants},
                                {v: out / v / "train.log" for v in variants}, args.jobs))
    seconds["eval"] = run_parallel({"eval": eval_command(out, variants, args.lengths, args.examples)},
                                   {"eval": out / "eval" / "eval.log"}, 1)["eval"]
    fam_variants = [v for v in variants if v.startswith("fam")]
    if fam_variants:
      seconds["fam_state"] = run_parallel({"fam_state": fam_state_command(out, fam_variants, args.examples)},
                                          {"fam_state": out / "eval" / "fam_state.log"}, 1)["fam_state"]
  except RuntimeError as e:
    print(f"passkey_small: {e}", file=sys.stderr)
    return 1
  seconds["total"] = time.perf_counter() - t0
  (out / "eval" / "seconds.json").write_text(json.dumps(seconds, indent=1))
  print((out / "eval" / "results.md").read_text())
  print(f"wall time {seconds['total'] / 60:.1f} min; results: {out / 'eval'} (results.md, results.json, "
        "passkey.png)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
