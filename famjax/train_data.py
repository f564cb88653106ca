"""The data edge of famjax.train: the data section validated by famjax.data, and the batches the
training loop reads (famjax.data's store or stream, or the synthetic stream for
data.mixture="synthetic").

famjax.training never imports famjax.data; this module joins them. famjax.data (and so TensorFlow) is
imported only for a real mixture, so a synthetic run needs neither.

  data = TrainData(job.data, job.train)      # DataConfig built and the mixture registered, or ConfigError
  data.vocab_size                            # ids of the data vocabulary
  it = data.batches(position)                # this host's iterator, from a checkpoint's position
  it = data.eval_batches()                   # held-out batches for evaluation during training

Training batches come from the config's data store (famjax.data.store: the tasks' examples tokenized
once and a packing plan over them; built here, in this process, the first time a run finds none, and
extended when a run reads further; `python -m famjax.data.prepare` builds it ahead, with Apache Beam) in
the global order (famjax.data.global_batches): a checkpoint's position is one global row count, so it
resumes at once on any number of processes. data.store="stream" reads the per-host stream instead, and
so does a run whose checkpoint holds a stream position (saved before the row store): it replays, on its
own layout. A position in the earlier .npy row store continues at the same row count of the plan (a
note says so).
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
    self.config = self.eval_config = self._store = None
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
    from famjax.data.config import STREAM  # pylint: disable=import-outside-toplevel
    stream_position = isinstance(position, dict) and "batches" in position
    if split == "train" and num_epochs is None and self.config.store != STREAM and not stream_position:
      return self._global_batches(position)
    if split == "train" and stream_position and self.config.store != STREAM:
      print(f"data: the checkpoint holds a stream position (batch {position['batches']}, saved before "
            "the row store): this run continues the stream, replaying it (same process layout only)")
    try:
      return get_batches(self.config, self.train.batch_size, split=split,
                         process_index=jax.process_index(), process_count=jax.process_count(),
                         seed=self.train.seed, state=position, num_epochs=num_epochs)
    except ValueError as e:
      if position is None:
        raise
      raise ConfigError(f"config.data: cannot continue from the checkpoint's data position: {e}") from None

  def _global_batches(self, position: dict | None):
    """The store's global order (tokenized and planned here if missing)."""
    from famjax.data import get_global_batches, store  # pylint: disable=import-outside-toplevel
    try:
      if self._store is None:  # the plan covers the rows this run reads
        self._store = store.open_or_build(self.config, rows=self.train.steps * self.train.batch_size)
      if isinstance(position, dict) and position.get("version") == 2:  # the earlier .npy row store
        position, note = store.continue_from_row_store(position, self._store)
        print(note)
    except (OSError, ValueError, RuntimeError) as e:  # a full disk, a missing source, a damaged store, ...
      raise _config_error(e) from None
    try:
      return get_global_batches(self._store, self.train.batch_size, jax.process_index(),
                                jax.process_count(), state=position, prefetch=self.config.prefetch)
    except ValueError as e:  # a position that is not this store's
      raise ConfigError(f"config.data: cannot continue from the checkpoint's data position: {e}") from None

  def eval_batches(self):
    """A fresh iterator of this host's evaluation batches: the same batches every time (the validation
    split of the evaluation source, repeated if it is short)."""
    if self.synthetic:
      return self.batches(None, split="validation")
    from famjax.data import get_batches  # pylint: disable=import-outside-toplevel
    return get_batches(self.eval_config, self.train.batch_size, split="validation",
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       seed=self.train.seed, state=None)
