"""A trained run's weights for inference: LoRA merged into the base, as a Transformer or an HF directory.

  params = restore_params(job, workdir)[1]       # plain parameter dict, adapters merged
  model = load_model(job, workdir)                # famjax.Transformer
  export_hf(job, workdir, out_dir)                # Hugging Face safetensors (famjax.to_hf)
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from famjax.conversion import to_hf
from famjax.model import Transformer
from famjax.training.checkpoint import Checkpointer
from famjax.training.config import ConfigError, JobConfig, incompatible_fields
from famjax.training.trainer import Trainer


def restore_params(job: JobConfig, workdir, step: int | None = None) -> tuple[int, dict]:
  """(step, merged parameters) of the newest good checkpoint of the run in `workdir`, or of `step`."""
  workdir = Path(workdir)
  config_path = workdir / "config.json"
  if not config_path.exists():
    raise ConfigError(f"--workdir {workdir}: no run there (no config.json)")
  differences = incompatible_fields(json.loads(config_path.read_text()), job.to_dict())
  if differences:
    raise ConfigError(f"--workdir {workdir} holds a run of another config ({'; '.join(differences[:4])})")
  trainer = Trainer(job)
  ckpt = Checkpointer(workdir / "checkpoints", job.train.keep_checkpoints, async_save=False)
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


def load_model(job: JobConfig, workdir) -> Transformer:
  return Transformer(job.model, params=restore_params(job, workdir)[1])


def export_hf(job: JobConfig, workdir, out_dir) -> Path:
  """Write the merged weights as a Hugging Face Llama directory (with the FAM prompt and settings)."""
  return Path(to_hf(load_model(job, workdir), out_dir))
