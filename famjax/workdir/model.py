"""A trained run as a model: the parameters of one checkpoint, LoRA merged, on this host.

  step, params, config = restore_params("workdirs/demo")          # newest checkpoint that restores
  step, params, config = restore_params("workdirs/demo", step=500) # or WORKDIR/checkpoints/500
  model, step = load_model("workdirs/demo")                        # famjax.Transformer

Reads the checkpoint as saved (no TrainState structure, no mesh), so any process layout and any
number of devices can read any run: evaluation, generation, init_from and export use it. Resuming a
run on its mesh (sharded, with the optimizer state) is famjax.training's Checkpointer.restore.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax

from famjax.model import ModelConfig, Transformer
from famjax.model.lora import merge_trained
from famjax.workdir import layout
from famjax.workdir.checkpoint import load_raw
from famjax.workdir.layout import WorkdirError


def restore_params(path, step: int | None = None) -> tuple[int, dict, dict]:
  """(step, merged parameters, the run's config dict) of a workdir, its checkpoints/ directory or one
  step's directory. `step` None: the one `path` names, else the newest that restores (a damaged one is
  skipped with a warning; nothing is moved). WorkdirError naming the path when there is none."""
  directory, named = layout.checkpoint_dir(path)
  step = named if step is None else step
  available = layout.steps(directory)
  if not available:
    raise WorkdirError(f"{path}: no checkpoint to read (no step directory in {directory})")
  if step is not None and step not in available:
    raise WorkdirError(f"{path}: no checkpoint of step {step} (there are: {available})")
  for candidate in ([step] if step is not None else available[::-1]):
    try:
      state, config = load_raw(directory / str(candidate))
    except Exception as e:  # pylint: disable=broad-except  # any damage: an older step, if allowed
      if step is not None or candidate == available[0]:
        raise WorkdirError(f"{directory / str(candidate)}: unreadable checkpoint "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
      warnings.warn(f"checkpoint {directory / str(candidate)} could not be read ({type(e).__name__}); "
                    "trying the previous one", RuntimeWarning, stacklevel=2)
      continue
    return candidate, merged_params(state, config), config
  raise AssertionError("unreachable")


def merged_params(state: dict, config: dict) -> dict:
  """The model's parameter dict of a restored TrainState (famjax.training.state), adapters merged."""
  lora = config.get("lora") or {}
  rank = int(lora.get("rank", 0))
  if not rank:
    return state["trainable"]
  return merge_trained(state["trainable"], state.get("frozen") or {}, float(lora.get("alpha", 16.0)) / rank)


def model_config(config: dict) -> ModelConfig:
  """The ModelConfig of a run's config dict (its "model" section)."""
  if not layout.is_run_config(config):
    raise WorkdirError("not a famjax run's config (no 'model' section)")
  try:
    return ModelConfig(**config["model"])
  except (TypeError, ValueError) as e:
    raise WorkdirError(f"its model section is invalid ({str(e).splitlines()[0]})") from None


def load_model(path, step: int | None = None) -> tuple[Transformer, int]:
  """(famjax.Transformer, step) of a run, see restore_params."""
  step, params, config = restore_params(path, step)
  try:
    cfg = model_config(config)
  except WorkdirError as e:
    raise WorkdirError(f"{Path(path)}: {e}") from None
  return Transformer(_runnable_here(cfg), params=params), step


def _runnable_here(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with the reference attention kernel ("xla", the same function) when the run's own
  (attention_impl "cudnn": GPU only) cannot run on this host, so a run trained on a GPU can be evaluated
  anywhere. A training job refuses instead (famjax.training.config.check_platform)."""
  if cfg.attention_impl == "cudnn" and jax.default_backend() != "gpu":
    warnings.warn(f"the run's model.attention_impl={cfg.attention_impl!r} needs a GPU; this host "
                  f"({jax.default_backend()}) computes the same attention with 'xla'", RuntimeWarning,
                  stacklevel=3)
    return cfg.replace(attention_impl="xla")
  return cfg
