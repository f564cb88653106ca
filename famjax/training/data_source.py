"""The data edge of a job: famjax.data's pipeline, or the synthetic stream (data.mixture="synthetic").

famjax.data (and so TensorFlow) is imported only when a real mixture is used, inside these functions:
importing this module keeps the training core free of TensorFlow.
"""

from __future__ import annotations

import jax

from famjax.training.config import ConfigError, TrainConfig
from famjax.training.synthetic import VOCAB_SIZE, SyntheticBatches

SYNTHETIC = "synthetic"


def data_config(raw: dict, seq_len: int, seed: int):
  """famjax.data.DataConfig from the config's data section; ConfigError naming the field."""
  from famjax.data import DataConfig  # pylint: disable=import-outside-toplevel
  try:
    return DataConfig(**raw, seq_len=seq_len, seed=seed)
  except TypeError as e:  # an unknown field
    raise ConfigError(f"config.data: {e}".replace("DataConfig.__init__() ", "")) from None
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0].replace("DataConfig.", "config.data.")) from None


class DataSource:
  """Validates the data section up front (an unknown mixture fails before compiling) and makes the
  per-host batch iterators the loop consumes (`batches(position)`, `.state()` for checkpoints)."""

  def __init__(self, raw: dict, train: TrainConfig):
    self.raw, self.train = dict(raw), train
    self.synthetic = self.raw.get("mixture") == SYNTHETIC
    if not self.synthetic:
      from famjax.data import tasks  # pylint: disable=import-outside-toplevel
      self.config = data_config(self.raw, train.seq_len, train.seed)
      try:
        tasks.ensure_registered(self.config)
      except ValueError as e:
        raise ConfigError(str(e).splitlines()[0].replace("DataConfig.", "config.data.")) from None

  def vocab_size(self) -> int:
    if self.synthetic:
      return VOCAB_SIZE
    from famjax.data import get_vocabulary  # pylint: disable=import-outside-toplevel
    return get_vocabulary(self.config).vocab_size

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
