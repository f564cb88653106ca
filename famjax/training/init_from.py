"""`init_from`: start a run from pretrained weights, a Hugging Face directory or a famjax checkpoint.

Only the parameters are taken (a fresh optimizer, step 0, new RSP state). The model's shapes (vocab,
widths, depth, heads, RoPE base, norms, tied embeddings) come from the source; the attention pattern
(attention, block_size, mem_segments, fam_len), dtypes, remat and how attention and the MLP run
(attention_chunk, mlp_chunk, attention_impl) come from the job's config, which is how a full-attention
checkpoint becomes a FAM model (spec §4: the FAM prompt is the only new weight).
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
from famjax.training.config import ConfigError, model_config
from famjax.workdir import WorkdirError, layout
from famjax.workdir import model as workdir_model

# What the job decides; everything else about the model comes from the source.
JOB_FIELDS = ("attention", "block_size", "mem_segments", "fam_len", "dtype", "param_dtype", "remat",
              "attention_chunk", "mlp_chunk", "attention_impl")


def is_famjax_checkpoint(path: Path) -> bool:
  """A workdir, its checkpoints/ directory, or one step's directory."""
  return (path / layout.CHECKPOINTS).is_dir() or (path / "state").is_dir() or path.name == layout.CHECKPOINTS


def _job_overrides(job_model: ModelConfig) -> dict:
  return {name: getattr(job_model, name) for name in JOB_FIELDS}


def source_model_config(path, job_model: ModelConfig) -> ModelConfig:
  """The model config of a run initialised from `path` (reads configs only, no weights)."""
  path = Path(path)
  if not path.exists():
    raise ConfigError(f"config.init_from: {path} does not exist")
  try:
    if is_famjax_checkpoint(path):
      fields = {**_source_model_section(path), **_job_overrides(job_model)}
      return model_config(fields)
    config_file = path / "config.json"
    if not config_file.is_file():
      raise ConfigError(f"config.init_from: {path} is neither a famjax checkpoint nor a Hugging Face "
                        "directory (no config.json)")
    return config_from_hf(json.loads(config_file.read_text()), **_job_overrides(job_model))
  except (ValueError, OSError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"config.init_from: {str(e).splitlines()[0]}") from None


def _source_model_section(path: Path) -> dict:
  """The model section of a famjax run's config (its config.json, else the newest checkpoint's)."""
  path = path.absolute()
  for candidate in (path, path.parent, path.parent.parent):
    try:
      config = layout.read_config(candidate)
    except WorkdirError:
      continue
    if layout.is_run_config(config):
      return config["model"]
  return workdir_model.restore_params(path)[2]["model"]


def load_params(path, model_cfg: ModelConfig) -> dict:
  """The parameter dict of `model_cfg` (see source_model_config) from `path`, in its param_dtype."""
  path = Path(path)
  if not is_famjax_checkpoint(path):
    return from_hf(path, **_job_overrides(model_cfg)).params_dict()
  try:
    params = workdir_model.restore_params(path)[1]
  except WorkdirError as e:
    raise ConfigError(f"config.init_from: {e}") from None
  params = jax.tree.map(lambda x: jnp.asarray(x, model_cfg.storage_dtype), params)
  want = (model_cfg.fam_len, model_cfg.d_model)
  prompt_init = model_cfg.has_fam and model_cfg.fam_init == "prompt"
  if not (prompt_init and "fam_prompt" in params and params["fam_prompt"].shape == want):
    params.pop("fam_prompt", None)  # none in the source, or one of another length: start a new one
    if prompt_init:
      prompt = initial_fam_prompt(np.asarray(params["embed"]), model_cfg.fam_len, model_cfg.embed_scale)
      params["fam_prompt"] = jnp.asarray(prompt, model_cfg.storage_dtype)
  # The fam_init="prefix" ablation: a per-layer initial FAM, started like the prompt when the source has
  # none of this shape.
  layers = dict(params["layers"])
  prefix_init = model_cfg.has_fam and model_cfg.fam_init == "prefix"
  if not (prefix_init and "fam_prefix" in layers and layers["fam_prefix"].shape == (model_cfg.n_layers,) + want):
    layers.pop("fam_prefix", None)
    if prefix_init:
      rows = initial_fam_prompt(np.asarray(params["embed"]), model_cfg.fam_len, model_cfg.embed_scale)
      layers["fam_prefix"] = jnp.asarray(np.broadcast_to(rows, (model_cfg.n_layers,) + rows.shape),
                                         model_cfg.storage_dtype)
  params["layers"] = layers
  return params
