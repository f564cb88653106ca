"""The validated configuration of a training job, built from an ml-collections ConfigDict at the edge.

One frozen dataclass per concern (the run, the optimizer, LoRA, the FAM training options, the mesh, and
the model's own ModelConfig); `job_config(config_dict)` builds them all and raises `ConfigError`, a
one-line message naming the offending field (`config.model.fam_len`, `config.optimizer.name`, ...), for an
unknown key, a value of the wrong type or an invalid value. Every field is documented in configs/base.py.
The `data` section is a DataSection: the fields the trainer reads, typed here, and the rest for the data
package, which validates the whole section at the edge (famjax/train_data.py) before anything compiles.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Mapping

from famjax.model import ModelConfig
from famjax.model.config import OFFLOAD_POLICIES
from famjax.model.params import PROJECTIONS
from famjax.parallel import MeshConfig

LORA_TARGETS = tuple(PROJECTIONS)  # every projection weight of famjax.model.params


class ConfigError(ValueError):
  """A user error in the configuration; its message is one line that names the field."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The run: how long, how big a batch, how often to log and save."""

  steps: int = 100
  batch_size: int = 8
  seq_len: int = 512
  checkpoint_every: int = 50
  keep_checkpoints: int = 3
  log_every: int = 10
  seed: int = 0
  init_from: str | None = None
  z_loss: float = 0.0
  tensorboard: bool = True
  # Gradient accumulation: the batch runs as this many microbatches inside the step, one after another
  # (the same update; activations of one microbatch at a time).
  microbatches: int = 1
  # Tokens of logits computed at a time in the loss (0: the whole [batch, seq_len, vocab] at once), and
  # with it the vocabulary entries at a time (0: all; famjax.training.loss.chunked_cross_entropy).
  loss_chunk: int = 0
  loss_vocab_chunk: int = 0
  # Evaluation during training (docs/training.md): every `eval_every` steps (0: off), the loss and
  # accuracy on `eval_steps` batches (0: none) of `eval_mixture`'s validation split ("": the training
  # mixture's),
  # and PassKey exact match at `eval_passkey_lengths` ("1k,4k"; "": none) on the streaming path.
  eval_every: int = 0
  eval_steps: int = 20
  eval_mixture: str = ""
  eval_passkey_lengths: str = ""
  eval_passkey_examples: int = 8
  eval_passkey_format: str = "paper"
  # A JAX profiler trace of steps START..STOP ("20,25"; "": none) in WORKDIR/tensorboard.
  profile_steps: str = ""

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "log_every", "keep_checkpoints", "eval_passkey_examples"):
      _check(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
    _check(self.eval_steps >= 0, "eval_steps", "must be >= 0 (0: no loss evaluation, PassKey only)",
           self.eval_steps)
    _check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)",
           self.checkpoint_every)
    _check(self.z_loss >= 0, "z_loss", "must be >= 0", self.z_loss)
    _check(self.microbatches >= 1 and self.batch_size % self.microbatches == 0, "microbatches",
           f"must be >= 1 and divide batch_size={self.batch_size}", self.microbatches)
    _check(self.loss_chunk >= 0 and (self.loss_chunk == 0 or self.seq_len % self.loss_chunk == 0),
           "loss_chunk", f"must be 0 or divide seq_len={self.seq_len}", self.loss_chunk)
    _check(self.loss_vocab_chunk >= 0 and (self.loss_vocab_chunk == 0 or self.loss_chunk > 0),
           "loss_vocab_chunk", "must be >= 0, and needs loss_chunk > 0 (the tiles are loss_chunk tokens x "
           "loss_vocab_chunk vocabulary entries)", self.loss_vocab_chunk)
    _check(self.eval_every >= 0, "eval_every", "must be >= 0 (0: no evaluation during training)",
           self.eval_every)
    self.profile_range  # pylint: disable=pointless-statement  # validates profile_steps

  @property
  def profile_range(self) -> tuple[int, int] | None:
    """(first, last) step of the profile (1-based, inclusive), or None."""
    if not self.profile_steps.strip():
      return None
    parts = self.profile_steps.split(",")
    ok = len(parts) == 2 and all(p.strip().isdigit() for p in parts)
    _check(ok, "profile_steps", "must be 'START,STOP' (two step numbers) or ''", self.profile_steps)
    first, last = (int(p) for p in parts)
    _check(1 <= first <= last <= self.steps, "profile_steps",
           f"must lie inside the run: 1 <= START <= STOP <= steps={self.steps}", self.profile_steps)
    return first, last

  @property
  def evaluates(self) -> bool:
    return self.eval_every > 0


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adafactor (the paper's recipe, spec §7) or AdamW, a learning-rate schedule and gradient clipping."""

  name: str = "adafactor"
  learning_rate: float = 1e-4
  schedule: str = "constant"
  warmup_steps: int = 0
  final_learning_rate_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  decay_rate: float = 0.99
  param_scale: bool = False
  update_clip: float = 1.0
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0

  def __post_init__(self):
    _check(self.name in ("adafactor", "adamw"), "name", "must be 'adafactor' or 'adamw'", self.name)
    _check(self.schedule in ("constant", "cosine"), "schedule", "must be 'constant' or 'cosine'",
           self.schedule)
    _check(self.learning_rate > 0, "learning_rate", "must be > 0", self.learning_rate)
    _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", self.warmup_steps)
    _check(0 <= self.final_learning_rate_ratio <= 1, "final_learning_rate_ratio", "must be in [0, 1]",
           self.final_learning_rate_ratio)
    _check(0 <= self.b1 < 1, "b1", "must be in [0, 1)", self.b1)
    _check(0 < self.b2 < 1, "b2", "must be in (0, 1)", self.b2)
    _check(0 < self.decay_rate < 1, "decay_rate", "must be in (0, 1)", self.decay_rate)
    _check(self.update_clip >= 0, "update_clip", "must be >= 0 (0: off)", self.update_clip)
    _check(self.eps > 0, "eps", "must be > 0", self.eps)
    _check(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
    _check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0: off)", self.max_grad_norm)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the projections in `targets`; rank 0 means full fine-tuning."""

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self):
    _check(self.rank >= 0, "rank", "must be >= 0 (0: full fine-tuning)", self.rank)
    _check(self.alpha > 0, "alpha", "must be > 0", self.alpha)
    targets = tuple(t.strip() for t in self.targets.split(",")) if isinstance(self.targets, str) \
        else tuple(self.targets)
    object.__setattr__(self, "targets", targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    _check(not bad, "targets", f"must be among {LORA_TARGETS}", list(targets))
    _check(self.rank == 0 or targets, "targets", "must not be empty when rank > 0", list(targets))

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class FamTrainingConfig:
  """The paper's training techniques for unbounded length (spec §6)."""

  rsp_prob: float = 0.0
  rpo: bool = False
  # RSP only from this step on. 0, as the paper, which fine-tunes a pretrained model; small models
  # trained from scratch have not learned with RSP from their first step (docs/passkey_small.md).
  rsp_start_step: int = 0

  def __post_init__(self):
    _check(0 <= self.rsp_prob <= 1, "rsp_prob", "must be in [0, 1]", self.rsp_prob)
    _check(self.rsp_start_step >= 0, "rsp_start_step", "must be >= 0", self.rsp_start_step)


@dataclasses.dataclass(frozen=True)
class DataSection:
  """The data section as famjax.training sees it. The trainer reads the typed fields; `options` holds
  the section's other fields (vocabulary, packing, weights, sources, ...), which famjax.data.DataConfig
  validates at the edge (famjax/train_data.py). The defaults are DataConfig's (a test checks)."""

  mixture: str = "famjax_demo"
  mask_between_examples: bool = False
  pack_align: int = 1
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _check(self.pack_align >= 1, "pack_align", "must be >= 1", self.pack_align)

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any]) -> "DataSection":
    typed = {f.name for f in dataclasses.fields(cls)} - {"options"}
    section = _build(cls, {k: v for k, v in raw.items() if k in typed}, "config.data")
    return dataclasses.replace(section, options={k: v for k, v in raw.items() if k not in typed})

  def to_dict(self) -> dict:
    """The section as in the config: the typed fields and the options, flat."""
    return {**self.options, "mixture": self.mixture, "mask_between_examples": self.mask_between_examples,
            "pack_align": self.pack_align}


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """Everything a training job needs, validated."""

  model: ModelConfig
  train: TrainConfig
  optimizer: OptimizerConfig
  lora: LoraConfig
  fam: FamTrainingConfig
  mesh: MeshConfig
  data: DataSection

  def to_dict(self) -> dict:
    """JSON-able, in the shape of the ConfigDict it came from (config.json in the workdir)."""
    out = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
    out.update(dataclasses.asdict(self.train))
    out["data"] = self.data.to_dict()
    return json.loads(json.dumps(out))  # tuples -> lists: equal to what config.json reads back


_SECTIONS = {"model": ModelConfig, "optimizer": OptimizerConfig, "lora": LoraConfig,
             "fam": FamTrainingConfig, "mesh": MeshConfig}
_DEFAULTS = {**_SECTIONS, "data": DataSection}  # the defaults of fields an older config.json lacks


def train_config(raw: Mapping[str, Any]) -> TrainConfig:
  """The run's TrainConfig alone, from the top-level fields of a config dict (the sections ignored)."""
  return _build(TrainConfig, {k: v for k, v in raw.items() if not isinstance(v, Mapping)}, "config")


def model_config(raw: Mapping[str, Any]) -> ModelConfig:
  """A ModelConfig from a model section, type-checked; ConfigError naming config.model.<field>."""
  return _build(ModelConfig, raw, "config.model")


def job_config(config: Mapping[str, Any], vocab_size: int | None = None,
               train: TrainConfig | None = None, data: DataSection | None = None) -> JobConfig:
  """Validated JobConfig from a ConfigDict (or plain dict) in the layout of configs/base.py.

  `vocab_size`: the data vocabulary's size, taken when model.vocab_size is 0 and checked against it
  otherwise. `train`, `data`: the run's TrainConfig and DataSection when the caller has built them
  already (train_config, DataSection.from_dict).
  Raises ConfigError naming the field.
  """
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
  known = train_fields | set(_SECTIONS) | {"data"}
  for key in raw:
    if key not in known:
      raise ConfigError(f"config.{key}: unknown field (known: {sorted(known)})")
  for key in set(_SECTIONS) | {"data"}:
    if not isinstance(raw.get(key, {}), Mapping):
      raise ConfigError(f"config.{key}: must be a section (a ConfigDict), got {raw[key]!r}")
  if train is None:
    train = _build(TrainConfig, {k: v for k, v in raw.items() if k in train_fields}, "config")
  model_raw = dict(raw.get("model", {}))
  vocab = model_raw.get("vocab_size", ModelConfig.vocab_size)
  if vocab == 0 and vocab_size is not None:
    model_raw["vocab_size"] = int(vocab_size)
  sections = {name: _build(cls, raw.get(name, {}), f"config.{name}") for name, cls in _SECTIONS.items()
              if name != "model"}
  model = _build(ModelConfig, model_raw, "config.model")
  if vocab_size is not None and vocab != 0 and model.vocab_size < vocab_size:
    raise ConfigError(f"config.model.vocab_size={model.vocab_size} is smaller than the data vocabulary "
                      f"({vocab_size} ids); set it to 0 to take the vocabulary's size")
  if data is None:
    data = DataSection.from_dict(raw.get("data", {}))
  if data.mask_between_examples and model.has_fam and data.pack_align % model.block_size:
    raise ConfigError(f"config.data.pack_align={data.pack_align} must be a multiple of "
                      f"model.block_size={model.block_size} when mask_between_examples is on with FAM: "
                      "each packed example restarts the FAM at a block boundary")
  return JobConfig(model=model, train=train, data=data, **sections)


def check_evaluation(train: TrainConfig) -> None:
  """ConfigError naming the first evaluation field that would do nothing in this run: an eval_* field
  set (not its default) when nothing evaluates during training (eval_every=0), eval_mixture when no loss
  is evaluated (eval_steps=0), the PassKey settings without PassKey lengths, and eval_every > 0 with
  nothing to evaluate. famjax.train and famjax.sweep call it on the user's config before anything
  compiles; job_config does not, so a saved config.json still loads as it was written."""
  default = TrainConfig()

  def is_set(name):
    return getattr(train, name) != getattr(default, name)

  if not train.evaluates:
    for name in ("eval_steps", "eval_mixture", "eval_passkey_lengths", "eval_passkey_examples",
                 "eval_passkey_format"):
      if is_set(name):
        raise ConfigError(f"config.{name}={getattr(train, name)!r} has no effect with eval_every=0 "
                          "(nothing evaluates during training): set config.eval_every, or leave it out")
    return
  if not train.eval_steps and not train.eval_passkey_lengths:
    raise ConfigError(f"config.eval_every={train.eval_every} evaluates nothing: eval_steps=0 (no loss) "
                      "and eval_passkey_lengths='' (no PassKey); set one of them, or eval_every=0")
  if not train.eval_steps and is_set("eval_mixture"):
    raise ConfigError(f"config.eval_mixture={train.eval_mixture!r} has no effect with eval_steps=0 (no "
                      "loss evaluation, PassKey only)")
  if not train.eval_passkey_lengths:
    for name in ("eval_passkey_examples", "eval_passkey_format"):
      if is_set(name):
        raise ConfigError(f"config.{name}={getattr(train, name)!r} has no effect without "
                          "eval_passkey_lengths (no PassKey evaluation)")


def check_platform(model: ModelConfig, backend: str) -> None:
  """ConfigError when the model asks for what `backend` ("cpu", "gpu", "tpu": jax.default_backend())
  cannot run: the cuDNN attention off GPU, the Pallas attention on GPU (a TPU kernel; CPU runs it in
  Pallas' interpret mode, which the tests use), a host-offload remat policy on CPU (whose host memory is its
  device memory: JAX drops the transfers there, so the policy would keep everything on the device).
  ModelConfig itself is platform-independent; the job calls this before it compiles."""
  if model.attention_impl == "cudnn" and backend != "gpu":
    raise ConfigError(f"config.model.attention_impl='cudnn' needs a GPU (this job runs on {backend}); "
                      "use 'xla'")
  if model.attention_impl == "pallas" and backend == "gpu":
    raise ConfigError("config.model.attention_impl='pallas' is a TPU kernel (this job runs on gpu, where it "
                      "would run in Pallas' interpret mode); use 'cudnn' or 'xla'")
  if model.remat in OFFLOAD_POLICIES and backend not in ("gpu", "tpu"):
    raise ConfigError(f"config.model.remat={model.remat!r} offloads to host memory, which only GPU and TPU "
                      f"have (this job runs on {backend}); use 'full' or 'save_qkv_proj'")


# Fields a resumed run may change; any other difference from the workdir's config.json is refused.
RESUMABLE_FIELDS = frozenset({
    "steps", "checkpoint_every", "keep_checkpoints", "log_every", "tensorboard", "init_from", "mesh",
    "model.remat", "model.attention_chunk", "model.mlp_chunk", "model.attention_impl", "microbatches", "loss_chunk",
    "loss_vocab_chunk", "eval_every", "eval_steps", "eval_mixture", "eval_passkey_lengths", "eval_passkey_examples",
    "eval_passkey_format", "profile_steps",
})


def incompatible_fields(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields that differ between two JobConfig.to_dict()s and may not change.

  A field the saved config lacks (a run from before the field existed) matches its default value."""
  out = []
  for key in sorted(set(saved) | set(current)):
    name = prefix + key
    if name in RESUMABLE_FIELDS:
      continue
    a, b = saved.get(key, _default_of(name)), current.get(key, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += incompatible_fields(a, b, name + ".")
    elif a != b:
      out.append(f"{name} ({a!r} -> {b!r})")
  return out


def _default_of(name: str):
  """The default of a typed field named `name` ("steps", "fam.rsp_prob"), else "<absent>"."""
  section, _, field = name.rpartition(".")
  cls = _DEFAULTS.get(section) if section else TrainConfig
  fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
  if field not in fields or fields[field].default is dataclasses.MISSING:
    return "<absent>"
  return json.loads(json.dumps(fields[field].default))


# -- building and type checking ---------------------------------------------------------------------

def _check(ok: bool, field: str, message: str, value) -> None:
  if not ok:
    raise ValueError(f"{field}={value!r} {message}")


def _build(cls, raw: Mapping[str, Any], prefix: str):
  """cls(**raw) with unknown keys, wrong types and invalid values reported as ConfigError(prefix.field)."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, value in raw.items():
    if key not in fields:
      raise ConfigError(f"{prefix}.{key}: unknown field (known: {sorted(fields)})")
    kwargs[key] = _typed(f"{prefix}.{key}", value, hints[key])
  try:
    return cls(**kwargs)
  except ValueError as e:
    message = str(e).split("\n")[0]
    # ModelConfig names fields as "ModelConfig.x", the others as "x=..."; say where it lives.
    message = message.replace(f"{cls.__name__}.", f"{prefix}.")
    section = prefix.rsplit(".", 1)[-1]
    if message.startswith((section + ".", section + ":")) and prefix != "config":
      message = f"{prefix.rsplit('.', 1)[0]}.{message}"
    elif not message.startswith(prefix):
      message = f"{prefix}.{message}"
    raise ConfigError(message) from None


def _typed(name: str, value, hint):
  """value, checked (and for floats and tuples, converted) against the annotation `hint`."""
  if hint is Any:
    return value
  options = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
      typing.get_origin(hint) is typing.Union else (hint,)
  if value is None:
    if type(None) in options:
      return None
    raise ConfigError(f"{name}: must not be None")
  for option in options:
    if option is bool and isinstance(value, bool):
      return value
    if option is int and isinstance(value, int) and not isinstance(value, bool):
      return value
    if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if option is str and isinstance(value, str):
      return value
    if typing.get_origin(option) is tuple:
      if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
      if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
  wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
  raise ConfigError(f"{name}: expected {wanted}, got {type(value).__name__} {value!r}")
