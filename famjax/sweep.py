"""Sweeps: expand a grid of configs into one training run per point, each in its own workdir.

  python -m famjax.sweep --sweep=configs/sweeps/table11.py --workdir=DIR [--dry_run] [--launcher=...]
                         [--parallel=N] [--only=fam,bswa_m3] [-- --config.key=value ...]
  python -m famjax.sweep --sweep=configs/sweeps/table11.py --workdir=DIR --report

A sweep file defines get_sweep() -> {"config": "configs/x.py", "overrides": {...}, "points": [{"name",
"variant", "overrides"}, ...]}. Point `name` runs
  python -m famjax.train --config=<config>:<variant> --workdir=DIR/<name> --config.<key>=<value> ... <extra>
with the sweep's overrides, then the point's, then the extra flags after `--`. Every point's config is
validated before the first run starts. --dry_run prints the commands; --launcher=local (default) runs
them here; any other --launcher is a command prefix, e.g. the scale-out launchers:
  --launcher="python launch/local.py --num_processes 2 --devices_per_process 4 --"
  --launcher="python launch/tpu_pod.py --name NAME --zone ZONE --"
Rerunning a sweep resumes every point from its workdir (finished points return at once).

Runs: the local launcher runs --parallel=N points at once (default 1: one after another, each run's output
on the console too); a --launcher prefix launches every point at once (or --parallel=N at a time), since
such launchers submit or run the job elsewhere (--parallel=1 for a prefix that runs on one fixed
machine or slice); `{name}` in the prefix becomes the point's name (one slice or job per point).
Each point's output goes to DIR/<name>/train.log (appended, one header line per launch) and its state
to DIR/<name>/sweep_status.json: {"name", "command", "launcher", "host", "pid", "started", "finished",
"seconds", "returncode"} (finished and returncode null while it runs).

Results: --report (and the end of every sweep run) reads every point's DIR/<name>/metrics.jsonl,
config.json, sweep_status.json and train.log into DIR/sweep.md (one row per point, like the paper's
Table 11), DIR/sweep.json (the same rows) and DIR/sweep.png (eval loss against step per point; train
loss when no point has evaluated). A point is "not started" (no workdir), "running" (started, no exit
status yet; or submitted by a launcher that returned before the run reached its steps), "failed"
(non-zero exit: the last line of its log is shown) or "done".
"""

from __future__ import annotations

import concurrent.futures
import datetime
import importlib.util
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from absl import app, flags

from famjax.sweep_report import LOG, STATUS, last_line, point_workdir, report, write_json

_SWEEP = flags.DEFINE_string("sweep", None, "sweep file (configs/sweeps/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "parent directory: each point trains in WORKDIR/<name>")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print every command, run nothing")
_LAUNCHER = flags.DEFINE_string("launcher", "local", "'local', or a command prefix that launches a run")
_ONLY = flags.DEFINE_list("only", [], "run only these points (names)")
_PARALLEL = flags.DEFINE_integer("parallel", None, "points run at once (default: 1 with the local "
                                 "launcher, all of them with a --launcher prefix)")
_REPORT = flags.DEFINE_bool("report", False, "only gather the points' results into WORKDIR/sweep.md, "
                            "sweep.json and sweep.png")



def load_sweep(path) -> dict:
  """get_sweep() of a sweep file, checked: a config file, and points with unique names."""
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"--sweep: no such file {path}")
  spec = importlib.util.spec_from_file_location(f"famjax_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = module.get_sweep()
  if not isinstance(sweep.get("config"), str) or not sweep.get("points"):
    raise ValueError(f"{path}: get_sweep() must return {{'config': 'configs/x.py', 'points': [...]}}")
  names = [p.get("name") for p in sweep["points"]]
  if any(not isinstance(n, str) or not n or "/" in n for n in names) or len(set(names)) != len(names):
    raise ValueError(f"{path}: every point needs a unique name without '/', got {names}")
  return sweep


def _flag_value(value) -> str:
  if isinstance(value, (list, tuple)):
    return ",".join(map(str, value))
  return str(value)


def commands(sweep: dict, workdir, extra=(), only=()) -> list[tuple[str, list[str]]]:
  """(name, argv) of every point's `python -m famjax.train` run."""
  out = []
  for point in sweep["points"]:
    if only and point["name"] not in only:
      continue
    config = sweep["config"] + (f":{point['variant']}" if point.get("variant") else "")
    overrides = {**sweep.get("overrides", {}), **point.get("overrides", {})}
    argv = ["python", "-m", "famjax.train", f"--config={config}",
            f"--workdir={point_workdir(workdir, point['name'])}"]
    argv += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
    out.append((point["name"], argv + list(extra)))
  return out


def validate(sweep: dict, root: Path, extra=()) -> None:
  """Every point's command line parsed as famjax.train parses it (its overrides and the `extra` flags:
  an unknown flag or field, a value of the wrong type) and its config built and checked (not its data),
  so a mistake fails before the first run starts; ValueError naming the point and the flag."""
  sys.path.insert(0, str(root))
  from famjax import train  # pylint: disable=import-outside-toplevel
  from famjax.training.config import check_evaluation, job_config  # pylint: disable=import-outside-toplevel
  config_file = str(root / sweep["config"])
  for name, argv in commands({**sweep, "config": config_file}, root / "sweep_check", extra):
    argv = ["famjax.train", *argv[3:]]  # from python -m famjax.train ...
    flag_values = flags.FlagValues()
    holders = train.define_flags(flag_values, argv)
    try:
      train.parse_argv(argv, flag_values)
      check_evaluation(job_config(holders.config.value, vocab_size=1).train)
    except ValueError as e:  # ConfigError
      raise ValueError(f"point {name}: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Running the points


def _local(workdir) -> bool:
  return "://" not in str(workdir)


def run_point(name: str, argv: list[str], workdir, launcher: str = "", echo: bool = False) -> int:
  """Run one point's command to its end: its output (stdout and stderr) appended to DIR/<name>/train.log
  (and to the console when `echo`), its exit status in DIR/<name>/sweep_status.json. With a URL
  workdir nothing is written here: the output goes to the console, each line prefixed with the name."""
  pdir = Path(point_workdir(workdir, name)) if _local(workdir) else None
  status = {"name": name, "command": argv, "launcher": launcher, "host": socket.gethostname(),
            "pid": None, "started": time.time(), "finished": None, "seconds": None, "returncode": None}
  log = None
  if pdir is not None:
    pdir.mkdir(parents=True, exist_ok=True)
    log = open(pdir / LOG, "ab")  # pylint: disable=consider-using-with
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    log.write(f"# famjax.sweep {stamp}: {shlex.join(argv)}\n".encode())
    log.flush()
  prefix = b"" if pdir is not None else f"[{name}] ".encode()
  try:
    pipe = echo or log is None
    try:
      proc = subprocess.Popen(argv, stdout=subprocess.PIPE if pipe else log, stderr=subprocess.STDOUT)
    except OSError as e:  # the launcher's program does not exist
      message = f"famjax.sweep: cannot run {argv[0]}: {e.strerror or e}\n".encode()
      for sink in ([log] if log else []) + ([sys.stdout.buffer] if pipe else []):
        sink.write(message)
        sink.flush()
      returncode = 127
    else:
      status["pid"] = proc.pid
      if pdir is not None:
        write_json(pdir / STATUS, status)
      if pipe:
        for line in iter(proc.stdout.readline, b""):
          if log is not None:
            log.write(line)
            log.flush()
          if echo or log is None:
            sys.stdout.buffer.write(prefix + line)
            sys.stdout.buffer.flush()
      returncode = proc.wait()
  finally:
    if log is not None:
      log.close()
  status.update(finished=time.time(), returncode=returncode)
  status["seconds"] = round(status["finished"] - status["started"], 1)
  if pdir is not None:
    write_json(pdir / STATUS, status)
  return returncode


def run_all(runs: list[tuple[str, list[str]]], workdir, launcher: str = "", parallel: int = 1) -> list[str]:
  """Run the points, `parallel` at a time; the names of those that failed. One at a time, each run's
  output is on the console too; several at once, the console says when each starts and ends."""
  echo = parallel == 1
  lock = threading.Lock()

  def say(text):
    with lock:
      print(text, flush=True)

  def one(i, name, argv):
    where = (f" (log: {Path(point_workdir(workdir, name)) / LOG})" if _local(workdir) and not echo else "")
    say(f"[sweep {i + 1}/{len(runs)}] {name}: {shlex.join(argv)}{where}")
    start = time.monotonic()
    returncode = run_point(name, argv, workdir, launcher=launcher, echo=echo)
    if not echo:
      outcome = "done" if returncode == 0 else f"failed (exit {returncode})"
      tail = ""
      if returncode and _local(workdir):
        tail = f": {last_line(Path(point_workdir(workdir, name)) / LOG)}"
      say(f"[sweep] {name}: {outcome} after {time.monotonic() - start:.0f}s{tail}")
    return returncode

  pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
  try:
    futures = [pool.submit(one, i, name, argv) for i, (name, argv) in enumerate(runs)]
    failed = [name for (name, _), f in zip(runs, futures) if f.result()]
  except KeyboardInterrupt:  # Ctrl-C reached the running points too; start no more
    pool.shutdown(wait=False, cancel_futures=True)
    raise
  pool.shutdown()
  return failed


# ---------------------------------------------------------------------------------------------------
# Gathering the results


def main(argv) -> None:
  extra = argv[1:]
  workdir = _WORKDIR.value
  if not _SWEEP.value or not workdir:
    sys.exit("famjax.sweep: error: --sweep and --workdir are required")
  if _PARALLEL.value is not None and _PARALLEL.value < 1:
    sys.exit(f"famjax.sweep: error: --parallel={_PARALLEL.value}: must be >= 1 (points run at once)")
  if _REPORT.value and not _local(workdir):
    sys.exit(f"famjax.sweep: error: --report: {workdir} is not a local directory (mount it, or copy the "
             "points' workdirs here)")
  try:
    sweep = load_sweep(_SWEEP.value)
    unknown = set(_ONLY.value) - {p["name"] for p in sweep["points"]}
    if unknown:
      raise ValueError(f"--only: no point(s) {sorted(unknown)}")
    if not _REPORT.value:
      validate(sweep, Path.cwd(), extra)
  except (ValueError, KeyError, AttributeError, ImportError, TypeError) as e:
    sys.exit(f"famjax.sweep: error: {' '.join(str(e).split())}")
  if _REPORT.value:
    _print_report(sweep, workdir)
    return
  launcher = "" if _LAUNCHER.value == "local" else _LAUNCHER.value
  runs = []
  for name, argv in commands(sweep, workdir, extra, _ONLY.value):
    prefix = [a.replace("{name}", name) for a in shlex.split(launcher)]
    runs.append((name, prefix + argv))
  if _DRY_RUN.value:
    for _, argv in runs:
      print(shlex.join(argv))
    return
  if not launcher:  # run here with this interpreter
    runs = [(name, [sys.executable] + argv[1:]) for name, argv in runs]
  parallel = _PARALLEL.value or (max(len(runs), 1) if launcher else 1)
  failed = run_all(runs, workdir, launcher=launcher, parallel=min(parallel, max(len(runs), 1)))
  print(f"sweep done: {len(runs) - len(failed)} of {len(runs)} runs succeeded"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
  if _local(workdir):
    _print_report(sweep, workdir)
  if failed:
    sys.exit(1)


def _print_report(sweep: dict, workdir) -> None:
  written, rows = report(sweep, _SWEEP.value, workdir)
  counts = {}
  for row in rows:
    counts[row["status"]] = counts.get(row["status"], 0) + 1
  print(f"sweep results ({', '.join(f'{n} {s}' for s, n in counts.items())}): "
        + ", ".join(map(str, written)), flush=True)


if __name__ == "__main__":
  app.run(main)
