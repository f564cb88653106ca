"""The data edge of famjax.train: the data section validated by famjax.data, and the batches the
training loop reads (famjax.data's pipeline, or the synthetic stream for data.mixture="synthetic").

famjax.training never imports famjax.data; this module joins them. famjax.data (and so TensorFlow) is
imported only for a real mixture, so a synthetic run needs neither.

  data = TrainData(job.data, job.train)      # DataConfig built and the mixture registered, or ConfigError
  data.vocab_size                            # ids of the data vocabulary
  it = data.batches(position)                # this host's iterator, from a checkpoint's position
  it = data.eval_batches()                   # held-out batches for evaluation during training
"""

from __future__ import annotations

import jax

from famjax.training.config import ConfigError, DataSection, TrainConfig
from famjax.training.synthetic import VOCAB_SIZE, SyntheticBatches

SYNTHETIC = "synthetic"


def _config_error(e: Exception) -> ConfigError:
  """famjax.data's messages name `DataConfig.<field>`; in a job's config that field is config.data.<field>."""
  message = str(e).splitlines()[0].replace("DataConfig.__init__() ", "").replace("DataConfig.", "config.data.")
  return ConfigError(message if message.startswith("config.data") else f"config.data: {message}")


class TrainData:
  """The job's data: validated up front (an unknown mixture or field fails before compiling), then
  per-host batch iterators for the loop (`batches(position)`; `.state()` on them for checkpoints)."""

  def __init__(self, section: DataSection, train: TrainConfig):
    self.section, self.train = section, train
    self.synthetic = section.mixture == SYNTHETIC
    self.config = self.eval_config = None
    if self.synthetic:
      self.vocab_size = VOCAB_SIZE
      return
    from famjax.data import DataConfig, get_vocabulary, tasks  # pylint: disable=import-outside-toplevel
    try:
      self.config = DataConfig(**section.to_dict(), seq_len=train.seq_len, seed=train.seed)
      tasks.ensure_registered(self.config)
      self.vocab_size = get_vocabulary(self.config).vocab_size
    except (TypeError, ValueError, OSError) as e:  # TypeError: a field DataConfig lacks; OSError: a file
      raise _config_error(e) from None
    if train.evaluates and train.eval_steps:
      self.eval_config = self._eval_config(train.eval_mixture or section.mixture)

  def _eval_config(self, mixture: str):
    """The DataConfig of the evaluation source, checked to have a validation split."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    import seqio  # pylint: disable=import-outside-toplevel
    from famjax.data import tasks  # pylint: disable=import-outside-toplevel
    config = dataclasses.replace(self.config, mixture=mixture, sources=() if mixture != self.config.mixture
                                 else self.config.sources)
    try:
      name = tasks.ensure_registered(config)
    except ValueError as e:
      raise ConfigError(f"config.eval_mixture={mixture!r}: {str(e).splitlines()[0]}") from None
    splits = seqio.get_mixture_or_task(name).splits
    if "validation" not in splits:
      raise ConfigError(f"config.eval_mixture={mixture!r} has no validation split (its splits: "
                        f"{sorted(splits)}); name a task or mixture that has one, or set "
                        "config.eval_steps=0 (PassKey only)")
    return config

  def batches(self, position: dict | None, split: str = "train", num_epochs: int | None = None):
    """This host's batches of `split`, continuing from `position` (None: the start)."""
    if self.synthetic:  # the validation stream: other draws of the same task
      seed = self.train.seed + (0 if split == "train" else 1_000_003)
      return SyntheticBatches(self.train.batch_size, self.train.seq_len, seed, jax.process_index(),
                              jax.process_count(), state=position)
    from famjax.data import get_batches  # pylint: disable=import-outside-toplevel
    return get_batches(self.config, self.train.batch_size, split=split,
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       seed=self.train.seed, state=position, num_epochs=num_epochs)

  def eval_batches(self):
    """A fresh iterator of this host's evaluation batches: the same batches every time (the validation
    split of the evaluation source, repeated if it is short)."""
    if self.synthetic:
      return self.batches(None, split="validation")
    from famjax.data import get_batches  # pylint: disable=import-outside-toplevel
    return get_batches(self.eval_config, self.train.batch_size, split="validation",
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       seed=self.train.seed, state=None)
