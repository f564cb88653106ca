"""Sweeps: expand a grid of configs into one training run per point, each in its own workdir.

  python -m famjax.sweep --sweep=configs/sweeps/table11.py --workdir=DIR [--dry_run] [--launcher=...]
                         [--only=fam,bswa_m3] [-- --config.key=value ...]

A sweep file defines get_sweep() -> {"config": "configs/x.py", "overrides": {...}, "points": [{"name",
"variant", "overrides"}, ...]}. Point `name` runs
  python -m famjax.train --config=<config>:<variant> --workdir=DIR/<name> --config.<key>=<value> ... <extra>
with the sweep's overrides, then the point's, then the extra flags after `--`. Every point's config is
validated before the first run starts. --dry_run prints the commands; --launcher=local (default) runs
them one after another here; any other --launcher is a command prefix, e.g. the scale-out launchers:
  --launcher="python launch/local.py --num_processes 2 --devices_per_process 4 --"
  --launcher="python launch/tpu_pod.py --name NAME --zone ZONE --"
Rerunning a sweep resumes every point from its workdir (finished points return at once).
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path

from absl import app, flags

_SWEEP = flags.DEFINE_string("sweep", None, "sweep file (configs/sweeps/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "parent directory: each point trains in WORKDIR/<name>")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print every command, run nothing")
_LAUNCHER = flags.DEFINE_string("launcher", "local", "'local', or a command prefix that launches a run")
_ONLY = flags.DEFINE_list("only", [], "run only these points (names)")


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
            f"--workdir={Path(workdir) / point['name']}"]
    argv += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
    out.append((point["name"], argv + list(extra)))
  return out


def validate(sweep: dict, root: Path) -> None:
  """Build every point's config (not its data) so a typo fails before the first run."""
  sys.path.insert(0, str(root))
  from famjax.training.config import job_config  # pylint: disable=import-outside-toplevel
  path = root / sweep["config"]
  spec = importlib.util.spec_from_file_location("famjax_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for point in sweep["points"]:
    config = module.get_config(point["variant"]) if point.get("variant") else module.get_config()
    for key, value in {**sweep.get("overrides", {}), **point.get("overrides", {})}.items():
      *path_, last = key.split(".")
      section = config
      for p in path_:
        section = section[p]
      if last not in section:
        raise ValueError(f"point {point['name']}: config.{key}: unknown field")
      section[last] = value
    job_config(config, data_vocab_size=lambda: 1)


def main(argv) -> None:
  extra = argv[1:]
  if not _SWEEP.value or not _WORKDIR.value:
    sys.exit("famjax.sweep: error: --sweep and --workdir are required")
  try:
    sweep = load_sweep(_SWEEP.value)
    unknown = set(_ONLY.value) - {p["name"] for p in sweep["points"]}
    if unknown:
      raise ValueError(f"--only: no point(s) {sorted(unknown)}")
    validate(sweep, Path.cwd())
  except (ValueError, KeyError, AttributeError, ImportError) as e:
    sys.exit(f"famjax.sweep: error: {' '.join(str(e).split())}")
  prefix = [] if _LAUNCHER.value == "local" else shlex.split(_LAUNCHER.value)
  runs = [(name, prefix + argv) for name, argv in commands(sweep, _WORKDIR.value, extra, _ONLY.value)]
  if _DRY_RUN.value:
    for _, argv in runs:
      print(shlex.join(argv))
    return
  failed = []
  for i, (name, argv) in enumerate(runs):
    print(f"[sweep {i + 1}/{len(runs)}] {name}: {shlex.join(argv)}", flush=True)
    if not prefix:  # run here with this interpreter
      argv = [sys.executable] + argv[1:]
    if subprocess.run(argv).returncode:
      failed.append(name)
  print(f"sweep done: {len(runs) - len(failed)} of {len(runs)} runs succeeded"
        + (f"; failed: {', '.join(failed)}" if failed else ""))
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
