"""`init_from`: start a run from pretrained weights, a Hugging Face directory or a famjax checkpoint.

Only the parameters are taken (a fresh optimizer, step 0, new RSP state). The model's shapes (vocab,
widths, depth, heads, RoPE base, norms, tied embeddings) come from the source; the attention pattern
(attention, block_size, mem_segments, fam_len), dtypes and remat come from the job's config, which is
how a full-attention checkpoint becomes a FAM model (spec §4: the FAM prompt is the only new weight).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from famjax.conversion import from_hf
from famjax.conversion.hf import config_from_hf, initial_fam_prompt
from famjax.model import ModelConfig
from famjax.training import lora
from famjax.training.checkpoint import load_raw
from famjax.training.config import ConfigError, LoraConfig, _build

# What the job decides; everything else about the model comes from the source.
JOB_FIELDS = ("attention", "block_size", "mem_segments", "fam_len", "dtype", "param_dtype", "remat")


def is_famjax_checkpoint(path: Path) -> bool:
  return (path / "checkpoints").is_dir() or (path / "state").is_dir() or path.name == "checkpoints"


def _job_overrides(job_model: ModelConfig) -> dict:
  return {name: getattr(job_model, name) for name in JOB_FIELDS}


def source_model_config(path, job_model: ModelConfig) -> ModelConfig:
  """The model config of a run initialised from `path` (reads configs only, no weights)."""
  path = Path(path)
  if not path.exists():
    raise ConfigError(f"config.init_from: {path} does not exist")
  try:
    if is_famjax_checkpoint(path):
      _, source = _source_config(path)
      fields = {**source, **_job_overrides(job_model)}
      return _build(ModelConfig, fields, "config.model")
    config_file = path / "config.json"
    if not config_file.is_file():
      raise ConfigError(f"config.init_from: {path} is neither a famjax checkpoint nor a Hugging Face "
                        "directory (no config.json)")
    return config_from_hf(json.loads(config_file.read_text()), **_job_overrides(job_model))
  except (ValueError, OSError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"config.init_from: {str(e).splitlines()[0]}") from None


def _source_config(path: Path) -> tuple[dict, dict]:
  """(the source job's config dict, its model section) of a famjax checkpoint or workdir."""
  path = path.absolute()
  for candidate in (path / "config.json", path.parent / "config.json", path.parent.parent / "config.json"):
    if candidate.is_file() and "model" in (config := json.loads(candidate.read_text())):
      return config, config["model"]
  _, config = load_raw(path)
  return config, config["model"]


def load_params(path, model_cfg: ModelConfig) -> dict:
  """The parameter dict of `model_cfg` (see source_model_config) from `path`, in its param_dtype."""
  path = Path(path)
  if not is_famjax_checkpoint(path):
    return from_hf(path, **_job_overrides(model_cfg)).params_dict()
  state, config = load_raw(path)
  source_lora = LoraConfig(**{**config.get("lora", {}), "targets": tuple(config.get("lora", {}).get(
      "targets", ()))})
  params = lora.combine(state["trainable"], state.get("frozen") or {}, source_lora)
  params = jax.tree.map(lambda x: jnp.asarray(x, model_cfg.storage_dtype), params)
  want = (model_cfg.fam_len, model_cfg.d_model)
  if not (model_cfg.has_fam and "fam_prompt" in params and params["fam_prompt"].shape == want):
    params.pop("fam_prompt", None)  # none in the source, or one of another length: start a new one
    if model_cfg.has_fam:
      prompt = initial_fam_prompt(np.asarray(params["embed"]), model_cfg.fam_len, model_cfg.embed_scale)
      params["fam_prompt"] = jnp.asarray(prompt, model_cfg.storage_dtype)
  return params
