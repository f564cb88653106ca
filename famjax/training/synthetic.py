"""A deterministic synthetic batch stream in famjax.data's batch format, for tests and benchmarks.

Selected with `--config.data.mixture=synthetic`; needs neither TensorFlow nor files. Each sequence walks a
fixed random permutation of the vocabulary (x[t+1] = perm[x[t]]) and jumps to a random token with
probability `noise`, so a model can learn it (the loss falls from log V towards the noise entropy). The
permutation (the task) is the same for every seed and split; batch n depends only on (seed, n), so the
iterator's position is one integer.
"""

from __future__ import annotations

import numpy as np

VOCAB_SIZE = 256


class SyntheticBatches:
  """Iterator of {"inputs", "targets", "weights", "segment_ids"} [per-host batch, seq_len]."""

  def __init__(self, batch_size: int, seq_len: int, seed: int = 0, process_index: int = 0,
               process_count: int = 1, state: dict | None = None, vocab_size: int = VOCAB_SIZE,
               noise: float = 0.1):
    if batch_size % process_count:
      raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
    self.rows = slice(process_index * batch_size // process_count,
                      (process_index + 1) * batch_size // process_count)
    self.vocab_size, self.noise = vocab_size, noise
    self.perm = np.random.default_rng(0x5EED).permutation(vocab_size)
    self.index = int((state or {}).get("index", 0))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    B, T = self.batch_size, self.seq_len + 1
    tokens = np.empty((B, T), np.int32)
    tokens[:, 0] = rng.integers(0, self.vocab_size, B)
    jumps = rng.random((B, T)) < self.noise
    random_tokens = rng.integers(0, self.vocab_size, (B, T))
    for t in range(1, T):
      tokens[:, t] = np.where(jumps[:, t], random_tokens[:, t], self.perm[tokens[:, t - 1]])
    tokens = tokens[self.rows]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones(tokens[:, 1:].shape, np.float32),
            "segment_ids": np.ones(tokens[:, 1:].shape, np.int32)}

  def state(self) -> dict:
    return {"index": self.index}

  def stats(self) -> dict:
    return {"batches": self.index}
