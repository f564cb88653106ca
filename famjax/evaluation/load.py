"""Which model a command line means, and loading it: a famjax workdir or a Hugging Face directory.

  source = describe("workdirs/demo")          # checks the path, reads config.json only (fast)
  model, info = load(source)                  # the newest checkpoint (LoRA merged), or from_hf
  vocab = load_vocabulary(source)             # the run's vocabulary (famjax.data, so TensorFlow)

A famjax workdir holds config.json (the run's JobConfig, with a "model" section) and checkpoints/<step>;
its vocabulary is the run's data vocabulary. A Hugging Face directory holds config.json with a
`model_type` and safetensors weights; it is read by famjax.from_hf with the attention overrides, and its
vocabulary is --vocabulary, else its tokenizer.model (SentencePiece), else the byte vocabulary when the
model has exactly its 259 ids. Every problem is a LoadError: one line that names the path.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

from famjax.conversion import from_hf
from famjax.model import Transformer
from famjax.workdir import WorkdirError, layout
from famjax.workdir import model as workdir_model

WORKDIR, HF = "famjax workdir", "Hugging Face directory"
HF_OVERRIDES = ("attention", "block_size", "mem_segments", "fam_len", "window")
BYTE_VOCABULARY, BYTE_VOCAB_SIZE = "byte", 259


class LoadError(ValueError):
  """A model path that cannot be used; the message is one line naming the path."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A model to evaluate: what is at `path`, and the vocabulary to read texts with."""

  name: str
  path: Path
  kind: str  # WORKDIR or HF
  vocabulary: str  # a famjax.data.get_vocabulary spec: "byte" or a SentencePiece .model path
  overrides: tuple[tuple[str, Any], ...] = ()  # ModelConfig fields for from_hf
  config: Optional[dict] = None  # the directory's config.json
  step: Optional[int] = None  # a workdir's checkpoint to read (None: the newest that restores)


def parse_model_flag(value: str) -> tuple[str, str]:
  """'fam=workdirs/fam' -> ('fam', 'workdirs/fam'); a bare path is named after its last component."""
  name, sep, path = value.partition("=")
  if not sep:
    name, path = Path(value.rstrip("/")).name, value
  if not name or not path:
    raise LoadError(f"--model={value}: expected NAME=PATH (or a PATH)")
  return name, path


def describe(path, name: Optional[str] = None, vocabulary: str = "",
             hf_overrides: Optional[dict] = None) -> ModelSource:
  """The ModelSource at `path`, checked without reading weights (LoadError naming the path).

  `hf_overrides` (attention, block_size, mem_segments, fam_len, window; None values are dropped) apply to a
  Hugging Face directory; a famjax workdir is always its run's model."""
  path = Path(path).expanduser().absolute()
  hf_overrides = {k: v for k, v in (hf_overrides or {}).items() if v is not None}
  unknown = sorted(set(hf_overrides) - set(HF_OVERRIDES))
  if unknown:
    raise LoadError(f"{path}: unknown model overrides {unknown} (known: {list(HF_OVERRIDES)})")
  if not path.exists():
    raise LoadError(f"{path}: no such directory")
  workdir, step = layout.split_step(path)  # WORKDIR/checkpoints/STEP: that checkpoint
  if step is not None and (workdir / layout.CONFIG).is_file():
    path = workdir
  else:
    step = None
  config_file = path / layout.CONFIG
  if not path.is_dir() or not config_file.is_file():
    raise LoadError(f"{path}: neither a famjax workdir nor a Hugging Face directory (no config.json)")
  try:
    config = json.loads(config_file.read_text())
  except (ValueError, OSError) as e:
    raise LoadError(f"{config_file}: unreadable ({e})") from None
  name = name or path.name
  if layout.is_run_config(config):
    return dataclasses.replace(_workdir_source(name, path, config, vocabulary), step=step)
  if isinstance(config, dict) and "model_type" in config:
    return ModelSource(name, path, HF, vocabulary or _hf_vocabulary(path, config),
                       tuple(sorted(hf_overrides.items())), config)
  raise LoadError(f"{path}: config.json is neither a famjax run's (no 'model' section) nor a Hugging "
                  "Face model's (no 'model_type')")


def _workdir_source(name, path: Path, config: dict, vocabulary: str) -> ModelSource:
  if not layout.steps(path):
    raise LoadError(f"{path}: no checkpoint to read (no step directory in {path / layout.CHECKPOINTS})")
  data = config.get("data") if isinstance(config.get("data"), dict) else {}
  return ModelSource(name, path, WORKDIR, vocabulary or data.get("vocabulary", BYTE_VOCABULARY),
                     (), config)


def _hf_vocabulary(path: Path, config: dict) -> str:
  if (path / "tokenizer.model").is_file():
    return str(path / "tokenizer.model")
  if config.get("vocab_size") == BYTE_VOCAB_SIZE:
    return BYTE_VOCABULARY
  raise LoadError(f"{path}: which vocabulary? There is no tokenizer.model (SentencePiece) and "
                  f"vocab_size {config.get('vocab_size')} is not the byte vocabulary's "
                  f"{BYTE_VOCAB_SIZE}; give --vocabulary")


def load(source: ModelSource) -> tuple[Transformer, dict]:
  """(model, info) with info = {name, path, kind, vocabulary, step (workdirs), model (its config)}."""
  if source.kind == WORKDIR:
    model, step = _load_workdir(source.path, source.step)
  else:
    model, step = _load_hf(source.path, dict(source.overrides)), None
  info = {"name": source.name, "path": str(source.path), "kind": source.kind,
          "vocabulary": source.vocabulary, "model": model.config.to_dict()}
  if step is not None:
    info["step"] = step
  return model, info


def _load_workdir(path: Path, step: Optional[int] = None) -> tuple[Transformer, int]:
  try:
    return workdir_model.load_model(path, step)
  except WorkdirError as e:
    raise LoadError(str(e).splitlines()[0]) from None


def _load_hf(path: Path, overrides: dict) -> Transformer:
  try:
    return from_hf(path, **overrides)
  except (OSError, ValueError) as e:
    raise LoadError(f"{path}: {str(e).splitlines()[0]}") from None


def load_vocabulary(source: ModelSource):
  """The seqio vocabulary of `source` (imports famjax.data, hence TensorFlow)."""
  from famjax.data import get_vocabulary  # pylint: disable=import-outside-toplevel
  try:
    return get_vocabulary(source.vocabulary)
  except (OSError, ValueError) as e:
    raise LoadError(f"{source.path}: vocabulary {source.vocabulary!r}: {str(e).splitlines()[0]}") from None


def check_vocabulary(model: Transformer, vocabulary, source: ModelSource) -> None:
  """LoadError when the vocabulary has ids the model cannot embed."""
  if vocabulary.vocab_size > model.config.vocab_size:
    raise LoadError(f"{source.path}: the model has {model.config.vocab_size} token ids but the "
                    f"vocabulary {source.vocabulary!r} has {vocabulary.vocab_size}; give the model's "
                    "vocabulary with --vocabulary")
