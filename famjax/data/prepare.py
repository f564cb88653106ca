"""Build (or check) the row store of a training config, ahead of training.

  python -m famjax.data.prepare --config=configs/demo.py [--config.seq_len=2048 ...]
  python -m famjax.data.prepare --config=... --verify     # check every shard's sha256
  python -m famjax.data.prepare --config=... --rebuild    # start over (after changing source files)

The config is the training config file (the same --config and --config.* overrides as famjax.train):
its data section with the top-level seq_len and seed, and for an endless (generated) mixture steps x
batch_size, the rows the run reads (a larger store is kept). The store goes to config.data.store, or to the
default directory ($FAMJAX_DATA_STORES, else ~/.cache/famjax/stores, one folder per config
fingerprint), where `python -m famjax.train` with the same config finds it. The build prints a line per
shard and resumes where an interrupted one stopped. Prints the store's directory last.
"""

from __future__ import annotations

import os
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
_STORE = flags.DEFINE_string("store", None, "the store directory (default: config.data.store, else the "
                             "default directory)")
_VERIFY = flags.DEFINE_bool("verify", False, "check an existing store's files against their sha256")
_REBUILD = flags.DEFINE_bool("rebuild", False, "build again from scratch")
_ROWS_PER_SHARD = flags.DEFINE_integer("rows_per_shard", None, "rows per shard file (default: ~64 MiB)")


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
  from famjax.data import store  # pylint: disable=import-outside-toplevel
  from famjax.data.config import STREAM  # pylint: disable=import-outside-toplevel
  raw = _CONFIG.value.to_dict()
  if raw.get("data", {}).get("mixture") == "synthetic":
    print("famjax.data.prepare: data.mixture='synthetic' is generated in the trainer; nothing to prepare")
    return
  try:
    config = data_config(raw)
    if config.store == STREAM and _STORE.value is None:
      raise ValueError("config.data.store='stream' reads no store; give --store=DIR or another data.store")
    if config.store == STREAM:
      config = config.replace(store="")
    directory = Path(_STORE.value) if _STORE.value else store.directory_of(config)
    if _VERIFY.value:
      rows = store.RowStore(directory, config)
      rows.verify(say=print)
      print(f"famjax.data.prepare: {len(rows)} rows verified")
    else:
      store.build(config, directory, min_rows=raw["steps"] * raw["batch_size"],  # what the run reads
                  rows_per_shard=_ROWS_PER_SHARD.value, rebuild=_REBUILD.value)
  except (TypeError, ValueError, OSError) as e:
    print(f"famjax.data.prepare: error: {str(e).splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
  print(directory.absolute())


def run() -> None:
  _config_package_on_path(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
