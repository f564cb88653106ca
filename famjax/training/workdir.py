"""The workdir of a run: what lives there, and refusing to mix two different runs in one.

  WORKDIR/config.json        the JobConfig of the run (written on the first start)
  WORKDIR/checkpoints/       Orbax checkpoints, see famjax.training.checkpoint
  WORKDIR/metrics.jsonl      one record per logged step
  WORKDIR/tensorboard/       TensorBoard event files
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from famjax.training.config import ConfigError, incompatible_fields

RUN_FILES = ("config.json", "checkpoints", "checkpoints_corrupt", "metrics.jsonl", "tensorboard")


def prepare(workdir: Path, job_dict: dict, restart: bool, write: bool = True) -> str | None:
  """Create `workdir` and record the config; returns a note for the user, or None.

  A workdir that holds a run whose config differs in a field that may not change on resume
  (config.RESUMABLE_FIELDS) is refused with ConfigError, unless `restart`: then the old run's files are
  moved to WORKDIR/previous_<time>/ and a new run starts. Only the process with `write` (process 0 of
  a multi-host job) changes files.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  config_path = workdir / "config.json"
  note = None
  if config_path.exists():
    try:
      saved = json.loads(config_path.read_text())
    except ValueError:
      saved = {"<unreadable config.json>": True}
    differences = incompatible_fields(saved, job_dict)
    if differences and not restart:
      raise ConfigError(
          f"workdir {workdir} holds a run with a different config ({'; '.join(differences[:4])}"
          f"{' ...' if len(differences) > 4 else ''}); use another --workdir, or pass --restart to "
          "start over (the old run is moved to WORKDIR/previous_<time>/)")
    if (differences or restart) and write:
      note = f"--restart: moved the previous run to {set_aside(workdir)}"
  if write:
    config_path.write_text(json.dumps(job_dict, indent=2, sort_keys=True) + "\n")
  return note


def set_aside(workdir: Path) -> Path:
  target = workdir / f"previous_{time.strftime('%Y%m%d-%H%M%S')}"
  target.mkdir()
  for name in RUN_FILES:
    if (workdir / name).exists():
      shutil.move(str(workdir / name), target / name)
  return target
