"""Hugging Face safetensors checkpoints <-> famjax (spec ../../shared/docs/fam.md §1 and §4).

famjax's base decoder is HF Llama (spec §1): pre-norm RMSNorm, rotate-half RoPE, GQA without biases,
SwiGLU. So a Llama, Mistral or bias-free Qwen2 checkpoint loads with no new weights except the FAM prompt
(spec §4), and famjax's `full` attention reproduces the HF logits.

  from_hf(path, **overrides) -> Transformer
  to_hf(model, path, *, max_shard_size=None) -> path        (from_hf(to_hf(m, p)) reproduces m exactly)

Layouts. HF `nn.Linear` weights are [out, in] and compute x @ W.T; famjax stores x @ W layouts with the
input axes first (famjax.model.params), e.g. q [D, N, H] = W_q.T.reshape(D, N, H) and
o [N, H, D] = W_o.T.reshape(N, H, D). Per-layer tensors `model.layers.{i}.*` are stacked on a leading
layer axis. HF Llama already uses the rotate-half RoPE convention, so q and k need no permutation.
The whole name mapping is the two tables GLOBAL_WEIGHTS and LAYER_WEIGHTS (from LAYER_HF_NAMES) below.

Only safetensors are read: unpickling a downloaded `pytorch_model.bin` can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from famjax.model import ModelConfig, Transformer, param_shapes
from famjax.model.params import PROJECTIONS

# -- the tables ------------------------------------------------------------------------------------

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}
SUPPORTED_MODEL_TYPES = frozenset(SUPPORTED_ARCHITECTURES.values())

# famjax parameter -> (HF tensor name, input axes). `in_axes` is the number of leading famjax axes on the
# input side of an HF Linear (weight [prod(output axes), prod(input axes)]); None: the same layout in both
# (embedding tables, norm scales, the FAM prompt).
GLOBAL_WEIGHTS = {
    "embed": ("model.embed_tokens.weight", None),
    "final_norm": ("model.norm.weight", None),
    "lm_head": ("lm_head.weight", 1),          # famjax [D, V] <- HF [V, D]
    "fam_prompt": ("model.fam_prompt", None),  # famjax's only new weight, written by to_hf
}
LAYER_PREFIX = "model.layers.{i}."
LAYER_HF_NAMES = {  # famjax layer parameter -> HF name after LAYER_PREFIX
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",       # famjax [D, N, H] <- HF [N*H, D]
    "k": "self_attn.k_proj.weight",       # famjax [D, K, H] <- HF [K*H, D]
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",       # famjax [N, H, D] <- HF [D, N*H]
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",       # famjax [D, M] <- HF [M, D]
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",       # famjax [M, D] <- HF [D, M]
    # The FAM write gate (ModelConfig.fam_gate, a famjax extension): new weights, written by to_hf,
    # zero (every gate 1/2, as init_params) when a checkpoint has none.
    "fam_gate": "fam_gate",
    "fam_gate_bias": "fam_gate_bias",
    # A learned initial FAM per layer (ModelConfig.fam_init="prefix", a famjax ablation) [F, D]: written by
    # to_hf; when a checkpoint has none, every layer starts from the rows `initial_fam_prompt` picks.
    "fam_prefix": "fam_prefix",
}
# famjax layer parameter -> (HF name, input axes), as in GLOBAL_WEIGHTS. The input axes of the
# projections are famjax.model.params.PROJECTIONS; the norm scales (None) have the same layout in both.
LAYER_WEIGHTS = {param: (name, PROJECTIONS.get(param)) for param, name in LAYER_HF_NAMES.items()}
assert set(PROJECTIONS) <= set(LAYER_WEIGHTS), "every projection weight needs an HF name"
# Buffers some checkpoints carry that famjax recomputes; skipped silently.
_IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# HF config.json key -> ModelConfig field, for the keys with a one-to-one meaning.
CONFIG_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
    "intermediate_size": "mlp_dim", "rms_norm_eps": "rms_eps", "tie_word_embeddings": "tie_embeddings",
}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size")
# Defaults of keys an older config.json may omit (the same for Llama, Mistral and Qwen2 in transformers).
_HF_DEFAULTS = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10_000.0}
# ModelConfig fields with no HF meaning: to_hf records them in config.json under "famjax".
FAMJAX_FIELDS = ("attention", "block_size", "mem_segments", "fam_len", "embed_scale", "dtype",
                 "param_dtype", "remat", "init_std", "fam_gate",
                 # the ablations of docs/ablations.md
                 "window", "mem_stop_gradient", "fam_position", "fam_init", "fam_history")
_MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_FILE = "model-{i:05d}-of-{n:05d}.safetensors"
_SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


@dataclasses.dataclass(frozen=True)
class _Slot:
  """Where one HF tensor goes: famjax parameter `param` (layer `layer` of it, or the whole)."""
  param: str
  layer: int | None
  shape: tuple[int, ...]  # famjax shape (per layer for layer weights)
  in_axes: int | None

  @property
  def hf_shape(self) -> tuple[int, ...]:
    if self.in_axes is None:
      return self.shape
    return (math.prod(self.shape[self.in_axes:]), math.prod(self.shape[:self.in_axes]))

  def to_famjax(self, w: np.ndarray) -> np.ndarray:
    return w if self.in_axes is None else w.T.reshape(self.shape)

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    if self.in_axes is None:
      return w
    return w.reshape(math.prod(self.shape[:self.in_axes]), -1).T


def hf_tensor_slots(cfg: ModelConfig) -> dict[str, _Slot]:
  """HF tensor name -> _Slot for every parameter of `cfg` (fam_prompt included when cfg.has_fam)."""
  shapes = param_shapes(cfg)
  slots = {}
  for param, shape in shapes.items():
    if param != "layers":
      name, in_axes = GLOBAL_WEIGHTS[param]
      slots[name] = _Slot(param, None, tuple(shape), in_axes)
  for i in range(cfg.n_layers):
    for param, shape in shapes["layers"].items():
      name, in_axes = LAYER_WEIGHTS[param]
      slots[LAYER_PREFIX.format(i=i) + name] = _Slot(param, i, tuple(shape[1:]), in_axes)
  return slots


# -- config ----------------------------------------------------------------------------------------

def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """The ModelConfig of an HF config.json dict: HF fields, then its "famjax" entry, then `overrides`.

  Without a "famjax" entry or overrides the attention is "full" (what the checkpoint was trained with).
  Raises ValueError for an unknown override or an architecture/feature famjax does not implement.
  """
  unknown = sorted(set(overrides) - _MODEL_FIELDS)
  if unknown:
    raise ValueError(f"from_hf: unknown override(s) {unknown}; overrides must be ModelConfig fields "
                     f"({sorted(_MODEL_FIELDS)})")
  _check_architecture(hf)
  _check_features(hf)
  missing = [key for key in _REQUIRED_KEYS if hf.get(key) is None]
  if missing:
    raise ValueError(f"from_hf: config.json lacks {missing}")
  defaults = {**_HF_DEFAULTS, "num_key_value_heads": hf["num_attention_heads"]}
  hf = {**hf, **{key: value for key, value in defaults.items() if hf.get(key) is None}}
  fields: dict[str, Any] = {field: hf[key] for key, field in CONFIG_FIELDS.items() if hf.get(key) is not None}
  fields["rope_theta"] = float(_rope_theta(hf))
  fields["attention"] = "full"
  fields.update(_famjax_entry(hf))
  fields.update(overrides)
  cfg = ModelConfig(**fields)
  _warn_sliding_window(hf, cfg)
  return cfg


def hf_config(cfg: ModelConfig) -> dict:
  """The config.json of `cfg` as a Llama checkpoint, plus the "famjax" entry from_hf reads back."""
  dtype = cfg.param_dtype
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": int(cfg.vocab_size),
      "hidden_size": int(cfg.d_model),
      "intermediate_size": int(cfg.mlp_dim),
      "num_hidden_layers": int(cfg.n_layers),
      "num_attention_heads": int(cfg.n_heads),
      "num_key_value_heads": int(cfg.n_kv_heads),
      "head_dim": int(cfg.head_dim),
      "hidden_act": "silu",
      "rms_norm_eps": float(cfg.rms_eps),
      "rope_theta": float(cfg.rope_theta),  # older transformers read it here, transformers 5 below
      "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
      "attention_bias": False,
      "mlp_bias": False,
      "tie_word_embeddings": bool(cfg.tie_embeddings),
      "dtype": dtype,
      "torch_dtype": dtype,
      # No Llama equivalent (embed_scale, the attention pattern, famjax's dtypes and training settings):
      "famjax": {name: _json_value(getattr(cfg, name)) for name in FAMJAX_FIELDS},
  }


def _json_value(value):
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    return float(value)
  return value


def _check_architecture(hf: dict) -> None:
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  unknown_archs = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
  known = bool(archs or model_type is not None) and not unknown_archs and \
      (model_type is None or model_type in SUPPORTED_MODEL_TYPES)
  if not known:
    raise ValueError(
        f"from_hf: unsupported architecture {archs} (model_type {model_type!r}); famjax reads "
        f"{sorted(SUPPORTED_ARCHITECTURES)} (model_type {sorted(SUPPORTED_MODEL_TYPES)})")


def _check_features(hf: dict) -> None:
  """Refuse what famjax's decoder (spec §1) cannot compute."""
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ValueError(f"from_hf: config.json sets {key}=true; famjax's decoder has no biases (spec §1)")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"from_hf: hidden_act {act!r} is not supported; famjax's MLP is SwiGLU (silu)")
  for key in ("rope_parameters", "rope_scaling"):
    rope = hf.get(key)
    if rope is None:
      continue
    if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
      raise ValueError(f"from_hf: {key}={rope!r} is not a single RoPE setting; famjax implements plain "
                       "RoPE (rope_type 'default') for every layer")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"from_hf: {key} has rope_type {rope_type!r}; famjax implements plain RoPE only "
                       "(rope_type 'default'), so this model's positions would be encoded differently")


def _rope_theta(hf: dict) -> float:
  """transformers 5 keeps the base in rope_parameters; older configs at the top level."""
  rope = hf.get("rope_parameters") or {}
  return rope.get("rope_theta", hf["rope_theta"])


def _famjax_entry(hf: dict) -> dict:
  entry = dict(hf.get("famjax") or {})
  unknown = sorted(set(entry) - set(FAMJAX_FIELDS))
  if unknown:
    warnings.warn(f"from_hf: ignoring unknown fields {unknown} of the config's famjax entry", stacklevel=3)
  return {k: v for k, v in entry.items() if k in FAMJAX_FIELDS}


def _warn_sliding_window(hf: dict, cfg: ModelConfig) -> None:
  window = hf.get("sliding_window")
  sliding_layers = "sliding_attention" in (hf.get("layer_types") or [])
  enabled = hf.get("use_sliding_window", True)  # Qwen2 has the switch; Mistral uses the window if set
  if ((window is not None and enabled) or sliding_layers) and cfg.attention != "swa":
    warnings.warn(
        f"from_hf: the checkpoint was configured with sliding_window={window}; famjax loads the model with "
        f"attention={cfg.attention!r} (choose attention='swa', window={window} for a token-level sliding "
        "window on every layer, or bswa/fam, with overrides)", stacklevel=3)


# -- reading ---------------------------------------------------------------------------------------

class _Checkpoint:
  """The tensors of a safetensors checkpoint (single file or sharded), read lazily as NumPy arrays."""

  def __init__(self, files: dict[str, Path], handles: dict[Path, Any]):
    self.files = files
    self._handles = handles

  @property
  def names(self) -> set[str]:
    return set(self.files)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    handle = self._handles[self.files[name]]
    try:
      return handle.get_tensor(name)
    except (TypeError, ValueError):
      # Older safetensors cannot give bfloat16 (or other non-NumPy dtypes) as NumPy: go through JAX.
      with safe_open(self.files[name], framework="flax") as f:
        return np.asarray(jax.device_get(f.get_tensor(name)))


def _tensor_files(path: Path) -> dict[str, Path]:
  """Tensor name -> safetensors file, from the index of a sharded checkpoint or the single file."""
  index = path / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    for fname in sorted(set(weight_map.values())):
      if not (path / fname).is_file():
        raise FileNotFoundError(f"{index} names shard {fname}, which is not in {path}")
    return {name: path / fname for name, fname in weight_map.items()}
  single = path / SINGLE_FILE
  if single.is_file():
    with safe_open(single, framework="numpy") as f:
      return {name: single for name in f.keys()}
  pickled = sorted(p.name for p in path.glob("pytorch_model*.bin"))
  if pickled:
    raise ValueError(
        f"from_hf: {path} holds only PyTorch pickle weights ({', '.join(pickled[:3])}). famjax reads "
        "safetensors only, because unpickling a downloaded file can run arbitrary code. Convert it once "
        "where you trust the file, e.g. `safetensors.torch.save_file(torch.load(f, weights_only=True), "
        f"'{SINGLE_FILE}')` or transformers' save_pretrained(out_dir, safe_serialization=True).")
  raise FileNotFoundError(f"from_hf: {path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


@contextlib.contextmanager
def _open_checkpoint(path: Path) -> Iterator[_Checkpoint]:
  files = _tensor_files(path)
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(f, framework="numpy")) for f in sorted(set(files.values()))}
    yield _Checkpoint(files, handles)


def _few(names, k: int = 5) -> str:
  names = sorted(names)
  more = f" and {len(names) - k} more" if len(names) > k else ""
  return ", ".join(names[:k]) + more


def _check_tensor_names(ckpt: _Checkpoint, slots: dict[str, _Slot]) -> None:
  """Biases, missing, unexpected and misshaped tensors, all from the headers, before reading data."""
  names = {n for n in ckpt.names if not _IGNORED_TENSORS.search(n)}
  biases = [n for n in names if n.endswith(".bias")]
  if biases:
    raise ValueError(
        f"from_hf: the checkpoint has bias tensors ({_few(biases)}); famjax's decoder has no biases "
        "(spec §1), so it supports Qwen2-style checkpoints only without the q/k/v biases")
  missing = [n for n in slots if n not in names]
  if missing:
    s = slots[missing[0]]
    where = s.param if s.layer is None else f"layers/{s.param} of layer {s.layer}"
    raise ValueError(f"from_hf: the checkpoint has no tensor {missing[0]!r} (famjax {where})"
                     + (f", and {len(missing) - 1} more are missing" if len(missing) > 1 else ""))
  extra = names - set(slots)
  if extra:
    raise ValueError(f"from_hf: unexpected tensors in the checkpoint for this config: {_few(extra)}")
  for name, slot in slots.items():
    got = ckpt.shape(name)
    if got != slot.hf_shape:
      raise ValueError(f"from_hf: tensor {name!r} has shape {got}, expected {slot.hf_shape}")


def initial_fam_prompt(embed: np.ndarray, fam_len: int, embed_scale: bool) -> np.ndarray:
  """The FAM prompt of a checkpoint that has none (spec §4), float32 [F, D].

  The rows of the token embedding at `fam_len` token ids drawn with a fixed seed,
  `np.random.default_rng(0).choice(V, size=F, replace=F > V)`, times sqrt(D) when `embed_scale`: the
  prompt starts on the distribution of the inputs it stands in for, and the same checkpoint always gives
  the same prompt.
  """
  V, D = embed.shape
  ids = np.random.default_rng(0).choice(V, size=fam_len, replace=fam_len > V)
  rows = np.asarray(embed[ids], np.float32)
  return rows * np.float32(math.sqrt(D)) if embed_scale else rows


def _optional(slots: dict, ckpt: _Checkpoint, param: str, what: str) -> tuple[dict, bool, set]:
  """Keeps in `slots` the tensors of famjax parameters named `param...` only if the checkpoint has all of
  them (a ValueError if it has some). Returns those slots, whether the checkpoint has them, and the
  checkpoint's tensors of that kind not in `slots` (of a config that lacks them)."""
  group = {name: slots.pop(name) for name in list(slots) if slots[name].param.startswith(param)}
  stored = [name for name in group if name in ckpt.names]
  if stored and len(stored) < len(group):
    raise ValueError(f"from_hf: the checkpoint has some but not all of {what} (missing e.g. "
                     f"{next(n for n in group if n not in ckpt.names)!r})")
  if stored:
    slots.update(group)
  return group, bool(stored), {name for name in ckpt.names if f".{param}" in name} - set(slots)


def _load_params(ckpt: _Checkpoint, cfg: ModelConfig) -> dict:
  slots = hf_tensor_slots(cfg)
  prompt_name = GLOBAL_WEIGHTS["fam_prompt"][0]
  slots.pop(prompt_name, None)  # optional: handled below
  extras = {prompt_name}
  # optional famjax tensors: read when the checkpoint has all of them, else filled below; those of a
  # config that lacks them are ignored
  gate, gate_stored, gate_extras = _optional(slots, ckpt, "fam_gate", "the FAM write gate's tensors")
  prefix, prefix_stored, prefix_extras = _optional(slots, ckpt, "fam_prefix",
                                                   "the FAM prefix of every layer")
  extras |= gate_extras | prefix_extras
  embed_name, head_name = GLOBAL_WEIGHTS["embed"][0], GLOBAL_WEIGHTS["lm_head"][0]
  if cfg.tie_embeddings and head_name in ckpt.names:
    if not np.array_equal(ckpt.read(head_name), ckpt.read(embed_name)):
      raise ValueError(f"from_hf: the config ties the embeddings but {head_name} differs from {embed_name}; "
                       "load with tie_embeddings=False")
    extras.add(head_name)  # a tied copy saved anyway
  _check_tensor_names(_without(ckpt, extras), slots)

  dtype = cfg.storage_dtype
  params: dict[str, Any] = {"layers": {}}
  layers: dict[str, list] = {}
  for name, slot in slots.items():
    w = slot.to_famjax(ckpt.read(name)).astype(dtype)
    if slot.layer is None:
      params[slot.param] = w
    else:
      layers.setdefault(slot.param, [None] * cfg.n_layers)[slot.layer] = w
  params["layers"] = {param: np.stack(ws) for param, ws in layers.items()}
  if gate and not gate_stored:  # a checkpoint without the gate: zero, every gate 1/2 (as init_params)
    params["layers"].update({slot.param: np.zeros((cfg.n_layers,) + slot.shape, dtype)
                             for slot in gate.values()})
  if prefix and not prefix_stored:  # every layer from the prompt's initial rows (fam_init="prefix")
    rows = initial_fam_prompt(params["embed"], cfg.fam_len, cfg.embed_scale).astype(dtype)
    params["layers"]["fam_prefix"] = np.broadcast_to(rows, (cfg.n_layers,) + rows.shape).copy()
  if cfg.has_fam and cfg.fam_init == "prompt":
    params["fam_prompt"] = _fam_prompt(ckpt, cfg, params["embed"], prompt_name)
  return jax.tree.map(jnp.asarray, params)


def _without(ckpt: _Checkpoint, names: set[str]) -> _Checkpoint:
  return _Checkpoint({n: f for n, f in ckpt.files.items() if n not in names}, ckpt._handles)


def _fam_prompt(ckpt: _Checkpoint, cfg: ModelConfig, embed: np.ndarray, name: str) -> np.ndarray:
  want = (cfg.fam_len, cfg.d_model)
  if name not in ckpt.names:
    return initial_fam_prompt(embed, cfg.fam_len, cfg.embed_scale).astype(cfg.storage_dtype)
  got = ckpt.shape(name)
  if got != want:
    raise ValueError(f"from_hf: the checkpoint's {name} has shape {got} (fam_len {got[0]}), but the config "
                     f"asks for fam_len={cfg.fam_len} (shape {want}); load with fam_len={got[0]}")
  return ckpt.read(name).astype(cfg.storage_dtype)


def from_hf(path, **overrides) -> Transformer:
  """A famjax Transformer from a Hugging Face safetensors checkpoint directory.

  Reads config.json and `model.safetensors` (or the shards of `model.safetensors.index.json`) of a
  LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM without biases. Weights are converted to the
  config's param_dtype (default float32, whatever the checkpoint's dtype).

  Args:
    path: the checkpoint directory.
    **overrides: ModelConfig fields that replace what the checkpoint implies, e.g. attention="fam",
      block_size=..., mem_segments=..., fam_len=..., dtype=..., param_dtype=.... The attention is "full"
      unless an override (or the "famjax" entry that to_hf writes into config.json) says otherwise.

  The FAM prompt (spec §4) is the only weight an HF checkpoint lacks. A tensor `model.fam_prompt` [F, D]
  (written by to_hf) is used when F equals fam_len (else ValueError). Otherwise it is initialised from the
  token embedding, see `initial_fam_prompt`: F embedding rows at token ids from
  np.random.default_rng(0), times sqrt(d_model) when embed_scale. A stored prompt is ignored when the
  config has no FAM.

  Raises:
    FileNotFoundError: no such directory, no config.json, no safetensors weights.
    ValueError: an unknown override; an unsupported architecture or feature (biases, RoPE scaling, a
      non-silu MLP); PyTorch pickle weights only; a missing, unexpected or misshaped tensor.
  Warns when the checkpoint was configured with a sliding window (Mistral): famjax loads it with the
  attention you choose.
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"from_hf: no checkpoint directory {path}")
  config_file = path / CONFIG_NAME
  if not config_file.is_file():
    raise FileNotFoundError(f"from_hf: {config_file} does not exist")
  cfg = config_from_hf(json.loads(config_file.read_text()), **overrides)
  with _open_checkpoint(path) as ckpt:
    params = _load_params(ckpt, cfg)
  return Transformer(cfg, params=params)


# -- writing ---------------------------------------------------------------------------------------

def hf_tensors(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """HF tensor name -> array for a famjax parameter dict (arrays kept in their dtype)."""
  out = {}
  for name, slot in hf_tensor_slots(cfg).items():
    w = params[slot.param] if slot.layer is None else params["layers"][slot.param][slot.layer]
    out[name] = np.ascontiguousarray(slot.to_hf(np.asarray(w)))
  return out


def _parse_size(size) -> int | None:
  """Bytes from an int or a string like "50KB" / "5GB" (powers of 1000) or "10MiB" (powers of 1024)."""
  if size is None:
    return None
  if isinstance(size, str):
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.IGNORECASE)
    if not m:
      raise ValueError(f"to_hf: max_shard_size {size!r} is not a size like 5GB or 500MiB")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0]) if unit != "B" else 0
    size = int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** power)
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
    raise ValueError(f"to_hf: max_shard_size must be a positive number of bytes, got {size!r}")
  return int(size)


def _plan_shards(tensors: dict[str, np.ndarray], limit: int | None) -> list[dict[str, np.ndarray]]:
  """Greedy, in order: a new shard when the next tensor would exceed `limit` (a bigger tensor alone)."""
  shards, current, used = [], {}, 0
  for name, w in tensors.items():
    if current and limit is not None and used + w.nbytes > limit:
      shards.append(current)
      current, used = {}, 0
    current[name] = w
    used += w.nbytes
  shards.append(current)
  return shards


def _remove_old_weights(path: Path) -> None:
  """Delete safetensors weights of an earlier save, so a stale index or shard cannot be read back."""
  for p in path.iterdir():
    if p.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_PATTERN.match(p.name):
      p.unlink()


def to_hf(model: Transformer, path, *, max_shard_size=None) -> Path:
  """Writes `model` as a Llama-layout HF checkpoint directory and returns its path.

  config.json: LlamaForCausalLM fields (rope_theta both at the top level and in rope_parameters, dtype =
  param_dtype) plus a "famjax" entry with the ModelConfig fields HF has no place for (attention,
  block_size, mem_segments, fam_len, embed_scale, dtype, param_dtype, remat, init_std), so that
  from_hf(path) reproduces the same ModelConfig and bitwise the same parameters. The FAM prompt is stored
  as `model.fam_prompt`. transformers reads the directory as a Llama with full attention (ignoring the
  prompt); with embed_scale=True its logits differ from famjax's, as Llama has no embedding scale.

  Weights go to model.safetensors, or to shards model-0000i-of-0000n.safetensors with
  model.safetensors.index.json when they exceed `max_shard_size` (bytes, or a string like "5GB").
  Earlier safetensors weights in `path` are removed first.
  """
  cfg = model.config
  limit = _parse_size(max_shard_size)
  tensors = hf_tensors(model.params_dict(), cfg)
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  _remove_old_weights(path)
  (path / CONFIG_NAME).write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
  shards = _plan_shards(tensors, limit)
  metadata = {"format": "pt"}  # what transformers expects in a torch-loadable safetensors header
  if len(shards) == 1:
    save_file(shards[0], path / SINGLE_FILE, metadata=metadata)
    return path
  weight_map = {}
  for i, shard in enumerate(shards, start=1):
    fname = _SHARD_FILE.format(i=i, n=len(shards))
    save_file(shard, path / fname, metadata=metadata)
    weight_map.update({name: fname for name in shard})
  index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())}, "weight_map": weight_map}
  (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  return path
