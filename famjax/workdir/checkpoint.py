"""Checkpoints with Orbax: WORKDIR/checkpoints/<step>/{state, data, config}.

  state   the TrainState (parameters, optimizer state, step, RNG, RSP state), arrays saved sharded
  data    the data iterator's position (JSON), so a resumed run reads exactly the batches that follow
  config  the job's JobConfig.to_dict() (JSON), so a checkpoint alone says what it holds (init_from)

Saves are asynchronous (training continues while the files are written) and atomic: Orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoints as they were. On start, `restore_latest` takes the newest step that restores; one that fails
(a damaged file) is moved to WORKDIR/checkpoints_corrupt/ with a warning and the previous one is tried.
"""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from famjax.workdir.layout import CORRUPT

ITEMS = ("state", "data", "config")


class Checkpointer:
  """Saves and restores (TrainState, data position, config) under `directory`, keeping the last `keep`."""

  def __init__(self, directory, keep: int, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self.keep = keep
    self.async_save = async_save
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=self.async_save)
    return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def steps(self) -> list[int]:  # what Orbax considers complete (famjax.workdir.layout.steps: by name)
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    """Start saving (returns once the arrays are copied off the devices; the files follow)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config))
    self._manager.save(step, args=args, force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state):
    """(state, data_state, config) of `step`; arrays placed as the ShapeDtypeStructs' shardings say."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    return restored.state, restored.data, restored.config

  def restore_latest(self, abstract_state):
    """(step, state, data_state, config) of the newest checkpoint that restores, or None if none does."""
    for step in reversed(self.steps()):
      try:
        return (step,) + self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # any damage: fall back to an older step
        moved = self._set_aside(step)
        warnings.warn(f"checkpoint {self.directory / str(step)} could not be restored "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); moved to {moved}, "
                      f"trying the previous one", RuntimeWarning, stacklevel=2)
    return None

  def _set_aside(self, step: int) -> Path:
    target = self.directory.parent / CORRUPT / f"{step}.{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(self.directory / str(step)), target)
    self._manager.close()
    self._manager = self._open()
    return target

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings` (same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_raw(step_dir) -> tuple[dict, dict]:
  """(state as nested dicts of host arrays, config dict) of one checkpoint directory
  (WORKDIR/checkpoints/STEP), restored as saved, without knowing the TrainState's structure."""
  checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  restored = checkpointer.restore(Path(step_dir).absolute(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()))
  return restored.state, restored.config
