"""The errors of the data store (famjax.data.store): each message names the file or the field, and says
what to do."""

PREPARE = "python -m famjax.data.prepare --config=<your config>"



class StoreNotFoundError(FileNotFoundError):
  """No published store where one was expected (build one: famjax.data.prepare, or open_or_build)."""


class StoreMismatchError(ValueError):
  """The store (or a saved position) comes from another config; the message names the field."""


class StoreCorruptError(ValueError):
  """A store file is truncated, missing or does not match its checksums; the message names it."""


class StoreChangedError(RuntimeError):
  """A store file was deleted or replaced while a run was reading it; the message names it. The run
  stops rather than mix rows of two builds."""


class StoreWriteError(OSError):
  """Writing a store failed (a full disk, a lost connection); nothing was published and the message
  names the file. A rerun keeps what was finished and redoes the rest."""
