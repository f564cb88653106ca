"""Build (or check) the data store of a training config ahead of training: its tasks' examples tokenized
by an Apache Beam pipeline, then the packing plan of the rows the run reads.

  python -m famjax.data.prepare --config=configs/demo.py [--config.seq_len=2048 ...] [--workers=4]
  python -m famjax.data.prepare --config=... --beam_options="--runner=DataflowRunner --project=..."
  python -m famjax.data.prepare --config=... --verify     # every file against its sha256
  python -m famjax.data.prepare --config=... --rebuild    # tokenize again (after changing source files)

The config is the training config file (the same --config and --config.* overrides as famjax.train): its
data section with the top-level seq_len and seed, and steps x batch_size, the rows the run reads (a
longer plan is kept). --workers=N runs Beam's DirectRunner with N worker processes (1: in this process;
0: no Beam, the same code in this process); --beam_options hands Beam any runner's options instead
(docs/data.md: Dataflow, Flink, Spark). The store goes under config.data.store, else $FAMJAX_DATA_STORES,
else ~/.cache/famjax/stores, where `python -m famjax.train` with the same config finds it. An interrupted
build, rerun, redoes only its unfinished files. Prints the plan's directory last.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags


def _config_package_on_path(argv) -> None:
  """Config files import siblings as `from configs import base` (as in famjax.train)."""
  for arg in argv:
    if arg.startswith("--config="):
      path = Path(arg.split("=", 1)[1].split(":", 1)[0]).absolute()
      sys.path.insert(0, str(path.parent.parent))


_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file[:variant]",
                                          lock_config=True)
_WORKERS = flags.DEFINE_integer("workers", 1, "Beam DirectRunner worker processes (1: in this process; "
                                "0: no Beam)")
_BEAM_OPTIONS = flags.DEFINE_string("beam_options", None, "Beam pipeline options for another runner, "
                                    "e.g. \"--runner=DataflowRunner --project=P --region=R ...\"")
_MODULES = flags.DEFINE_multi_string("module_import", [], "modules that register seqio tasks of your own "
                                     "(imported here and by every Beam worker)")
_VERIFY = flags.DEFINE_bool("verify", False, "check the existing store's files against their sha256")
_REBUILD = flags.DEFINE_bool("rebuild", False, "tokenize again from scratch")


def data_config(raw: dict):
  """The DataConfig a training run of this config reads (famjax/train_data.py builds the same)."""
  from famjax.data import DataConfig  # pylint: disable=import-outside-toplevel
  section = dict(raw.get("data", {}))
  return DataConfig(**section, seq_len=raw["seq_len"], seed=raw["seed"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import importlib  # pylint: disable=import-outside-toplevel
  for module in _MODULES.value:
    importlib.import_module(module)
  from famjax.data import store  # pylint: disable=import-outside-toplevel
  from famjax.data.config import STREAM  # pylint: disable=import-outside-toplevel
  raw = _CONFIG.value.to_dict()
  if raw.get("data", {}).get("mixture") == "synthetic":
    print("famjax.data.prepare: data.mixture='synthetic' is generated in the trainer; nothing to prepare")
    return
  try:
    config = data_config(raw)
    if config.store == STREAM:
      raise ValueError("config.data.store='stream' reads no store; give another data.store")
    beam_options = shlex.split(_BEAM_OPTIONS.value) if _BEAM_OPTIONS.value is not None else None
    rows = store.open_or_build(config, rows=raw["steps"] * raw["batch_size"], workers=_WORKERS.value,
                               beam_options=beam_options, rebuild=_REBUILD.value,
                               modules=tuple(_MODULES.value))
    if _VERIFY.value:
      rows.verify(say=print)
      print(f"famjax.data.prepare: the plan and the examples it reads verified")
  except (TypeError, ValueError, OSError, RuntimeError) as e:
    print(f"famjax.data.prepare: error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  print(rows.directory)


def run() -> None:
  _config_package_on_path(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
