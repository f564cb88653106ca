"""The paper's PassKey result (spec §8) at small scale, in one command on 2 CPU cores.

  python experiments/passkey_small.py --out=workdirs/passkey_small [--seeds=3]

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

Seeds. `--seeds=1` (the default) trains one model per variant with the config's seed, in OUT/VARIANT,
named VARIANT in the results. `--seeds=N` trains each variant N times, `--config.seed=s` for s = 0 ... N-1
(the seed of the initialisation and of the data order), in OUT/VARIANT/seed{s}, named VARIANT_s{s} in
OUT/eval/results.json (famjax.eval's, one entry per run). OUT/eval/results.md then starts with the
variants' mean (min-max) over the seeds per length (`seed_table`; in bold a variant whose range lies
above every other's) before famjax.eval's per-run tables, OUT/eval/passkey.png shows each variant's mean
with its min-max band (famjax.eval's one line per run moves to passkey_runs.png), and the same for
OUT/eval/repeated/.

Every step is an ordinary famjax command (printed before it runs; its output goes to the run's
train.log) so each can be rerun or inspected alone. Run it again after a stop and it resumes: training
jobs restart from their last checkpoint and finished ones only check that they are finished.
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


def run_name(variant: str, seed: int, seeds: int) -> str:
  """A run's model name in the results: the variant's with one seed, VARIANT_s{seed} with several."""
  return variant if seeds == 1 else f"{variant}_s{seed}"


def run_dir(out: Path, variant: str, seed: int, seeds: int) -> Path:
  """A run's workdir: OUT/VARIANT with one seed, OUT/VARIANT/seed{seed} with several."""
  return out / variant if seeds == 1 else out / variant / f"seed{seed}"


def runs(out: Path, variants, seeds: int) -> dict[str, tuple[str, int, Path]]:
  """{run name: (variant, seed, workdir)}, variant by variant, seeds in order."""
  return {run_name(v, s, seeds): (v, s, run_dir(out, v, s, seeds)) for v in variants for s in range(seeds)}


def train_command(variant: str, workdir: Path, steps: int | None, seed: int | None = None) -> list[str]:
  """`python -m famjax.train` of one run; `seed` None keeps the config's seed (no flag)."""
  cmd = [sys.executable, "-m", "famjax.train", f"--config={CONFIG}:{variant}", f"--workdir={workdir}"]
  cmd += [f"--config.steps={steps}"] if steps is not None else []
  return cmd + ([f"--config.seed={seed}"] if seed is not None else [])


def train_commands(out: Path, variants, steps: int | None, seeds: int) -> dict[str, list[str]]:
  """{run name: its training command}: with one seed today's (no --config.seed), with several every run
  gets --config.seed=s explicitly (seed 0 included)."""
  return {name: train_command(v, workdir, steps, None if seeds == 1 else s)
          for name, (v, s, workdir) in runs(out, variants, seeds).items()}


def eval_command(models: dict[str, Path], lengths: str, examples: int, fmt: str, out_dir: Path) -> list[str]:
  """`python -m famjax.eval` of the models ({name: workdir}) on PassKey with `fmt` filler."""
  return [sys.executable, "-m", "famjax.eval", *(f"--model={n}={p}" for n, p in models.items()),
          f"--passkey_lengths={lengths}", f"--passkey_examples={examples}", f"--passkey_format={fmt}",
          f"--out_dir={out_dir}"]


def fam_state_command(out: Path, models: dict[str, Path], examples: int, fmt: str) -> list[str]:
  """experiments/fam_state.py on the models ({name: workdir}); writes OUT/eval/fam_state_{fmt}.md."""
  return [sys.executable, str(ROOT / "experiments" / "fam_state.py"),
          *(f"--model={n}={p}" for n, p in models.items()), f"--examples={examples}", f"--format={fmt}",
          f"--out={out / 'eval' / f'fam_state_{fmt}.md'}"]


def seed_summary(results: dict, groups: dict[str, list[str]]) -> dict[str, list[dict]]:
  """PassKey exact match over seeds, per variant and length.

  `results` is famjax.eval's results.json ({"models": {run: {"passkey": [rows]}}}), `groups` the runs of
  each variant ({variant: [run names]}). Returns {variant: [{"total_tokens", "filler_tokens", "mean",
  "min", "max", "seeds"}]}, lengths ascending; "seeds" counts the runs with that length. A variant with
  no run in `results` is left out.
  """
  summary = {}
  for variant, names in groups.items():
    by_length: dict[int, tuple[int, list[float]]] = {}
    for name in names:
      for row in results["models"].get(name, {}).get("passkey", []):
        by_length.setdefault(row["total_tokens"], (row["filler_tokens"], []))[1].append(row["exact_match"])
    if by_length:
      summary[variant] = [{"total_tokens": total, "filler_tokens": filler, "mean": sum(v) / len(v),
                           "min": min(v), "max": max(v), "seeds": len(v)}
                          for total, (filler, v) in sorted(by_length.items())]
  return summary


def ranges_overlap(a: dict, b: dict) -> bool:
  """Whether two summary rows' min-max ranges over seeds overlap (touching counts). Only rows whose
  ranges do not overlap show a difference the seeds support; anything else is not claimed."""
  return a["min"] <= b["max"] and b["min"] <= a["max"]


def clearly_best(rows: dict[str, dict]) -> set[str]:
  """The variants ({variant: summary row at one length}) whose range lies above every other's: at most
  one, none when any range overlaps the top one's or there is a single variant."""
  if len(rows) < 2:
    return set()
  top = max(rows, key=lambda v: rows[v]["min"])
  others = [r for v, r in rows.items() if v != top]
  return {top} if all(rows[top]["min"] > r["max"] for r in others) else set()


def seed_table(summary: dict[str, list[dict]]) -> str:
  """Markdown: rows = lengths, columns = variants, cells = "mean (min-max)" exact match (%) over seeds;
  in bold the clearly best variant of a length (`clearly_best`)."""
  variants = list(summary)
  by_length: dict[int, dict[str, dict]] = {}
  for variant in variants:
    for row in summary[variant]:
      by_length.setdefault(row["total_tokens"], {})[variant] = row
  lines = ["| tokens | filler tokens | " + " | ".join(variants) + " |",
           "|---|---:|" + "---:|" * len(variants)]
  for total in sorted(by_length):
    rows = by_length[total]
    best = clearly_best(rows)
    cells = []
    for variant in variants:
      row = rows.get(variant)
      cell = "-" if row is None else (f"{_percent(row['mean'])} ({_percent(row['min'])}-"
                                      f"{_percent(row['max'])})")
      cells.append(f"**{cell}**" if variant in best else cell)
    filler = next(iter(rows.values()))["filler_tokens"]
    lines.append(f"| {_length(total)} | {filler:,} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_seeds(summary: dict[str, list[dict]], path: Path) -> Path:
  """PassKey exact match against length (log2): each variant's mean over seeds, its min-max shaded."""
  # The object-oriented API (no pyplot), as famjax.evaluation.report: no display, no global state.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  fig = Figure(figsize=(7, 4.2), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ticks = set()
  for variant, rows in summary.items():
    x = [r["total_tokens"] for r in rows]
    seeds = max(r["seeds"] for r in rows)
    (line,) = ax.plot(x, [r["mean"] for r in rows], marker="o", label=f"{variant} ({seeds} seeds)")
    ax.fill_between(x, [r["min"] for r in rows], [r["max"] for r in rows], color=line.get_color(),
                    alpha=0.2, linewidth=0)
    ticks.update(x)
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted(ticks), [_length(t) for t in sorted(ticks)])
  ax.minorticks_off()
  ax.set_ylim(-5, 105)
  ax.set_xlabel("tokens (log2)")
  ax.set_ylabel("PassKey exact match (%)")
  ax.set_title("PassKey retrieval: mean and min-max over seeds")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  return path


def write_seed_summary(eval_dir: Path, groups: dict[str, list[str]]) -> None:
  """Over famjax.eval's outputs in `eval_dir`: results.md gets the variants' mean (min-max) table before
  the per-run report, passkey.png the mean and min-max band per variant (the per-run plot is kept as
  passkey_runs.png). results.json stays famjax.eval's, per run."""
  results = json.loads((eval_dir / "results.json").read_text())
  summary = seed_summary(results, groups)
  if not summary:
    return
  seeds = max(len(names) for names in groups.values())
  examples = results.get("settings", {}).get("passkey_examples", "?")
  head = [f"# PassKey over {seeds} seeds", "",
          f"Exact match (%, {examples} examples per length): mean (min-max) over the seeds of each variant; "
          "in bold a variant whose range lies above every other's (ranges that overlap are no difference).",
          "", seed_table(summary), "", ""]
  md = eval_dir / "results.md"
  md.write_text("\n".join(head) + md.read_text())
  if (eval_dir / "passkey.png").exists():
    os.replace(eval_dir / "passkey.png", eval_dir / "passkey_runs.png")
  plot_seeds(summary, eval_dir / "passkey.png")


def _length(n: int) -> str:
  """2048 -> '2k' (exact binary multiples only), as famjax.evaluation.lengths, without importing famjax."""
  for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
    if n >= size and n % size == 0:
      return f"{n // size}{unit}"
  return str(n)


def _percent(value: float) -> str:
  return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


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
  parser.add_argument("--seeds", type=int, default=1,
                      help="runs per variant, --config.seed=0 ... N-1 in OUT/VARIANT/seed{s} (1: the "
                           "config's seed, in OUT/VARIANT)")
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
  if args.seeds < 1:
    parser.error(f"--seeds must be >= 1 (runs per variant), got {args.seeds}")

  # SIGTERM (a scheduler, `kill`) ends the running jobs too; each resumes from its checkpoint next time.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  t0 = time.perf_counter()
  all_runs = runs(out, variants, args.seeds)
  models = {name: workdir for name, (_, _, workdir) in all_runs.items()}
  fam_models = {name: workdir for name, (v, _, workdir) in all_runs.items() if v.startswith("fam")}
  groups = {v: [name for name, (rv, _, _) in all_runs.items() if rv == v] for v in variants}
  try:
    seconds = run_parallel(train_commands(out, variants, args.steps, args.seeds),
                           {name: workdir / "train.log" for name, workdir in models.items()}, args.jobs)
    evals = {"eval": eval_command(models, args.lengths, args.examples, FORMAT, out / "eval")}
    if fam_models:
      evals["eval_repeated"] = eval_command(fam_models, args.lengths, args.examples, REPEATED,
                                            out / "eval" / REPEATED)
      for fmt in (FORMAT, REPEATED):
        evals[f"fam_state_{fmt}"] = fam_state_command(out, fam_models, args.examples, fmt)
    seconds.update(run_parallel(evals, {name: out / "eval" / f"{name}.log" for name in evals}, args.jobs))
  except RuntimeError as e:
    print(f"passkey_small: {e}", file=sys.stderr)
    return 1
  if args.seeds > 1:
    write_seed_summary(out / "eval", groups)
    if fam_models:
      write_seed_summary(out / "eval" / REPEATED, groups)
  seconds["total"] = time.perf_counter() - t0
  (out / "eval" / "seconds.json").write_text(json.dumps(seconds, indent=1))
  print((out / "eval" / "results.md").read_text())
  if fam_models:
    print(f"repeated-phrase filler (trained on random filler):\n{(out / 'eval' / REPEATED / 'results.md').read_text()}")
  print(f"wall time {seconds['total'] / 60:.1f} min; results: {out / 'eval'} (results.md, results.json, "
        "passkey.png)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
