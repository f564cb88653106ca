"""A trained run's weights, LoRA merged: sharded on the job's mesh (--mode=eval), or as a Hugging Face
directory (--mode=export).

  step, params = restore_params(job, workdir)     # merged, placed as the trainer shards parameters
  export_hf(job, workdir, out_dir)                # Hugging Face safetensors (famjax.to_hf)

Both first check that `workdir` holds a run of `job` (the fields that may not change on resume). Reading
a run without its job config, on any process layout, is famjax.workdir.model.
"""

from __future__ import annotations

from pathlib import Path

import jax

from famjax.conversion import to_hf
from famjax.training.config import ConfigError, JobConfig, incompatible_fields
from famjax.training.trainer import Trainer
from famjax.workdir import WorkdirError, layout
from famjax.workdir import model as workdir_model
from famjax.workdir.checkpoint import Checkpointer


def check_run(job: JobConfig, workdir) -> None:
  """ConfigError unless `workdir` holds a run of `job`."""
  try:
    saved = layout.read_config(workdir)
  except WorkdirError as e:
    raise ConfigError(f"--workdir {e}") from None
  differences = incompatible_fields(saved, job.to_dict())
  if differences:
    raise ConfigError(f"--workdir {workdir} holds a run of another config ({'; '.join(differences[:4])})")


def restore_params(job: JobConfig, workdir, step: int | None = None) -> tuple[int, dict]:
  """(step, merged parameters on the job's mesh) of the newest good checkpoint in `workdir`, or of
  `step`."""
  check_run(job, workdir)
  workdir = Path(workdir)
  trainer = Trainer(job)
  ckpt = Checkpointer(workdir / layout.CHECKPOINTS, job.train.keep_checkpoints, async_save=False)
  try:
    if step is None:
      restored = ckpt.restore_latest(trainer.abstract_state)
    elif step not in ckpt.steps():
      raise ConfigError(f"--workdir {workdir}: no checkpoint of step {step} (there are: {ckpt.steps()})")
    else:
      restored = (step,) + ckpt.restore(step, trainer.abstract_state)
  finally:
    ckpt.close()
  if restored is None:
    raise ConfigError(f"--workdir {workdir}: no checkpoint to read")
  step, state = restored[0], restored[1]
  merge = jax.jit(lambda s: s.params(job.lora), out_shardings=trainer.param_shardings)
  return step, merge(state)


def export_hf(job: JobConfig, workdir, out_dir) -> Path:
  """Write the merged weights of the newest checkpoint as a Hugging Face Llama directory (with the FAM
  prompt and settings)."""
  check_run(job, workdir)
  try:
    model, _ = workdir_model.load_model(workdir)
  except WorkdirError as e:
    raise ConfigError(f"--workdir {e}") from None
  return Path(to_hf(model, out_dir))
