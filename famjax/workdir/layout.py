"""The layout of a workdir, its config.json, its checkpoint steps, and refusing to mix two runs in one.

  WORKDIR/config.json              the JobConfig of the run (written on the first start)
  WORKDIR/checkpoints/<step>/      Orbax checkpoints (famjax.workdir.checkpoint)
  WORKDIR/checkpoints_corrupt/     checkpoints that failed to restore, set aside
  WORKDIR/metrics.jsonl            one record per logged step
  WORKDIR/tensorboard/             TensorBoard event files
  WORKDIR/previous_<time>/         an earlier run moved aside by --restart
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

CONFIG, CHECKPOINTS, CORRUPT = "config.json", "checkpoints", "checkpoints_corrupt"
METRICS, TENSORBOARD = "metrics.jsonl", "tensorboard"
RUN_FILES = (CONFIG, CHECKPOINTS, CORRUPT, METRICS, TENSORBOARD)


class WorkdirError(ValueError):
  """A workdir or checkpoint path that cannot be used; the message is one line naming the path."""


def read_config(workdir) -> dict:
  """The run's config.json as a dict (WorkdirError when missing or unreadable)."""
  path = Path(workdir) / CONFIG
  if not path.is_file():
    raise WorkdirError(f"{workdir}: no run there (no {CONFIG})")
  try:
    config = json.loads(path.read_text())
  except (ValueError, OSError) as e:
    raise WorkdirError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
  if not isinstance(config, dict):
    raise WorkdirError(f"{path}: not a JSON object")
  return config


def is_run_config(config) -> bool:
  """A famjax run's config.json (it has a "model" section), not a Hugging Face model's."""
  return isinstance(config, dict) and isinstance(config.get("model"), dict)


def steps(directory) -> list[int]:
  """The checkpoint steps (directory names) under a workdir or its checkpoints/ directory, sorted."""
  directory = Path(directory)
  if (directory / CHECKPOINTS).is_dir():
    directory = directory / CHECKPOINTS
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def split_step(path) -> tuple[Path, int | None]:
  """(workdir, step) for WORKDIR/checkpoints/STEP; (path, None) for anything else."""
  path = Path(path).absolute()
  if path.name.isdigit() and path.parent.name == CHECKPOINTS:
    return path.parent.parent, int(path.name)
  return path, None


def checkpoint_dir(path) -> tuple[Path, int | None]:
  """(checkpoints directory, step or None) of a workdir, its checkpoints/ directory, or one step's
  directory (one holding `state/`)."""
  path = Path(path).absolute()
  if (path / CHECKPOINTS).is_dir():
    return path / CHECKPOINTS, None
  if path.name.isdigit() and (path / "state").is_dir():
    return path.parent, int(path.name)
  return path, None


def prepare(workdir: Path, job_dict: dict, restart: bool, differences: Callable[[dict, dict], list[str]],
            write: bool = True) -> str | None:
  """Create `workdir` and record the config; returns a note for the user, or None.

  A workdir that holds a run whose config differs (`differences(saved, job_dict)`: the fields that may
  not change on resume) is refused with WorkdirError, unless `restart`: then the old run's files are
  moved to WORKDIR/previous_<time>/ and a new run starts. Only the process with `write` (process 0 of
  a multi-host job) changes files.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  config_path = workdir / CONFIG
  note = None
  if config_path.exists():
    try:
      saved = json.loads(config_path.read_text())
    except ValueError:
      saved = {"<unreadable config.json>": True}
    found = differences(saved, job_dict)
    if found and not restart:
      raise WorkdirError(
          f"workdir {workdir} holds a run with a different config ({'; '.join(found[:4])}"
          f"{' ...' if len(found) > 4 else ''}); use another --workdir, or pass --restart to "
          "start over (the old run is moved to WORKDIR/previous_<time>/)")
    if (found or restart) and write:
      note = f"--restart: moved the previous run to {set_aside(workdir)}"
  if write:  # atomically: the other processes of the job read it at the same time
    tmp = config_path.with_name(f".{CONFIG}.tmp")
    tmp.write_text(json.dumps(job_dict, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, config_path)
  return note


def set_aside(workdir: Path) -> Path:
  target = workdir / f"previous_{time.strftime('%Y%m%d-%H%M%S')}"
  target.mkdir()
  for name in RUN_FILES:
    if (workdir / name).exists():
      shutil.move(str(workdir / name), target / name)
  return target
