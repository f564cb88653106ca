"""The global order of training rows over a config's packing plan, each host's slice of every batch, and
the position a checkpoint saves.

    rows = famjax.data.store.open_or_build(config, rows=steps * global_batch)  # built once
    it = get_global_batches(rows, batch_size=global_batch,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)   # this host's batch_size // process_count rows of the global batch
    it.state()         # {"version": 3, "rows": rows consumed by all hosts, "fingerprint": ..., ...}

Training row i is a pure function of (plan, i). With DataConfig.store_rows = 0 (PREFIX) it is plan row i:
the plan covers the rows the run reads, every row once (a run that reads further gets a longer plan,
which begins with the same rows). With store_rows = n (EPOCHS) only the plan's first n rows are read:
row i in the first epoch (i < n), then plan row perm_e(i mod n) in epoch e = i // n, perm_e a
permutation seeded by (seed, e). Global batch s is rows [s*B, (s+1)*B); process p of n reads rows
[s*B + p*B/n, s*B + (p+1)*B/n), so the global batch is the hosts' batches in process order, whatever n
is. The state is one global number (rows consumed) and the rows' fingerprint: a restore seeks (no
replay) on any process count, mesh or even global batch size (it continues at the next row).
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Optional

import numpy as np

from famjax.data import reader
from famjax.data.errors import StoreMismatchError
from famjax.data.pipeline import check_layout

STATE_VERSION = 3
PREFIX, EPOCHS = "prefix", "epochs"
_ORDER_SALT = 0x0DE5
MAX_READ_THREADS = 8


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the plan's rows in an epoch >= 1 (EPOCHS)."""
  return np.random.default_rng([seed, epoch, _ORDER_SALT]).permutation(num_rows)


class GlobalOrder:
  """Maps training-row indices to plan rows (see the module docstring)."""

  def __init__(self, num_rows: int, seed: int, order: str = EPOCHS):
    self.num_rows, self.seed, self.order = num_rows, seed, order
    self._permutation = functools.lru_cache(maxsize=2)(
        lambda epoch: epoch_permutation(num_rows, seed, epoch))

  def __call__(self, indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    if self.order == PREFIX:
      if indices.size and indices.max() >= self.num_rows:
        raise IndexError(
            f"famjax.data: training row {int(indices[indices >= self.num_rows].min())} is past the end "
            f"of the packing plan ({self.num_rows} rows, one per training row): open the store with "
            "famjax.data.store.open_or_build(config, rows=...) (famjax.train and famjax.data.prepare "
            "do, with steps x batch_size), which extends it")
      return indices
    epochs, offsets = np.divmod(indices, self.num_rows)
    out = offsets.copy()
    for epoch in np.unique(epochs):
      if epoch > 0:
        where = epochs == epoch
        out[where] = self._permutation(int(epoch))[offsets[where]]
    return out


def get_global_batches(rows, batch_size: int, process_index: int = 0, process_count: int = 1,
                       state: Optional[dict[str, Any]] = None, prefetch: int = 2) -> GlobalBatchIterator:
  """This host's part of every global batch of `batch_size` rows of `rows` (a
  famjax.data.store.TrainingRows), continuing from `state`."""
  return GlobalBatchIterator(rows, batch_size, process_index, process_count, state, prefetch)


class GlobalBatchIterator:
  """Iterator of the pipeline's batch dicts ([batch_size // process_count, seq_len] inputs, targets,
  weights, segment_ids) of a config's training rows in the global order."""

  def __init__(self, rows, batch_size: int, process_index: int = 0, process_count: int = 1,
               state: Optional[dict[str, Any]] = None, prefetch: int = 2):
    check_layout(batch_size, process_index, process_count)
    self.store = rows
    self.batch_size, self.process_index, self.process_count = batch_size, process_index, process_count
    self.per_host_batch = batch_size // process_count
    self.order = GlobalOrder(len(rows), int(rows.config["seed"]), rows.order)
    self._start = 0 if state is None else self._check_state(state)
    self._taken = 0
    self._batches = reader.host_batches(rows.read, self.order, self._start, batch_size, process_index,
                                        process_count, prefetch=prefetch,
                                        threads=min(max(prefetch, 1), MAX_READ_THREADS))

  def rows_of(self, step: int) -> np.ndarray:
    """The training rows this host reads for the `step`-th batch after the start."""
    first = self._start + step * self.batch_size + self.process_index * self.per_host_batch
    return np.arange(first, first + self.per_host_batch, dtype=np.int64)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    self._taken += 1
    return batch

  def rows(self) -> int:
    """Training rows consumed by all hosts together (the batches this iterator handed out)."""
    return self._start + self._taken * self.batch_size

  def state(self) -> dict[str, Any]:
    """Where the stream is: one global number and what it is a position in. JSON; the same on every
    process; restores with any process count and batch size."""
    return {"version": STATE_VERSION, "rows": self.rows(), "fingerprint": self.store.fingerprint,
            "order": self.store.order, "config": self.store.config}

  def stats(self) -> dict[str, Any]:
    rows = self.rows()
    return {"batches": self._taken, "rows": rows,
            "epoch": rows // len(self.store) if self.store.order == EPOCHS else 0,
            **self.store.stats()}

  def close(self, wait: bool = True) -> None:
    del wait
    close = getattr(self._batches, "close", None)
    if close is not None:
      close()

  def __del__(self):
    if hasattr(self, "_batches"):
      self.close()

  def __enter__(self) -> GlobalBatchIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _check_state(self, state: dict[str, Any]) -> int:
    if state.get("version") != STATE_VERSION or "rows" not in state:
      raise ValueError(f"data state {_short(state)} is not a position in a packing plan (version "
                       f"{STATE_VERSION}); a streaming pipeline's state (version 1) resumes with "
                       "famjax.data.get_batches, on the layout that saved it, and a row store's "
                       "(version 2) with famjax.data.store.continue_from_row_store")
    if state.get("fingerprint") != self.store.fingerprint:
      diff = differing_fields(state.get("config") or {}, self.store.config) or [
          f"fingerprint is {state.get('fingerprint')!r} there and {self.store.fingerprint!r} here"]
      raise StoreMismatchError(f"the data state was saved with another data config: {'; '.join(diff)} "
                               f"(there = the state, here = the store at {self.store.directory})")
    rows = state["rows"]
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
      raise ValueError(f"data state: rows must be an int >= 0, got {rows!r}")
    return rows


def differing_fields(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
  """'<field> is <saved> there and <current> here' for every field that differs (nested dicts by
  their dotted keys)."""
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += differing_fields(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k} is {a!r} there and {b!r} here")
  return out


def _short(state: Any) -> str:
  text = repr(state)
  return text if len(text) < 120 else text[:117] + "..."
