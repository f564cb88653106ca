"""The global order of training rows over a row store, and each host's slice of every batch.

    store = famjax.data.store.open_or_build(config, min_rows=steps * global_batch)  # built once
    it = get_global_batches(store, batch_size=global_batch,
                            process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)   # this host's batch_size // process_count rows of the global batch
    it.state()         # {"version": 2, "rows": rows consumed by all hosts, "fingerprint": ..., ...}

Row i of the training stream is a pure function of (store, seed, i). A PREFIX store (an endless
mixture: the first rows of its stream) gives store row i: every row once, exactly what a one-process
stream gives (the store must hold row i: famjax.data.store.open_or_build(min_rows=...) extends it). An
EPOCHS store of N rows (a finite mixture's pass, or DataConfig.store_rows rows) gives store row i in the
first epoch (i < N: the stream's own order, already shuffled by seqio) and store row perm_e(i mod N)
in epoch e = i // N >= 1, perm_e a permutation seeded by (seed, e). Global batch s
is rows [s*B, (s+1)*B); process p of n reads rows [s*B + p*B/n, s*B + (p+1)*B/n), so the global batch
is the hosts' batches in process order, whatever n is. The state is one global number (rows consumed)
and the store's fingerprint: a restore seeks (no replay) and works on any process count, mesh or even
global batch size (it continues at the next row).
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Optional

import numpy as np

from famjax.data.pipeline import Prefetcher, check_layout
from famjax.data.store import EPOCHS, PREFIX, RowStore, StoreMismatchError, differing_fields

STATE_VERSION = 2
_ORDER_SALT = 0x0DE5


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the store's rows in an epoch >= 1."""
  return np.random.default_rng([seed, epoch, _ORDER_SALT]).permutation(num_rows)


class GlobalOrder:
  """Maps training-stream row indices to store rows (see the module docstring)."""

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
            "of the row store "
            f"({self.num_rows} rows of an endless mixture, one per training row): extend it with "
            "famjax.data.store.open_or_build(config, min_rows=...) (famjax.train and "
            "famjax.data.prepare do, to steps x batch_size)")
      return indices
    epochs, offsets = np.divmod(indices, self.num_rows)
    out = offsets.copy()
    for epoch in np.unique(epochs):
      if epoch > 0:
        where = epochs == epoch
        out[where] = self._permutation(int(epoch))[offsets[where]]
    return out


def get_global_batches(store: RowStore, batch_size: int, process_index: int = 0, process_count: int = 1,
                       state: Optional[dict[str, Any]] = None, prefetch: int = 2
                       ) -> GlobalBatchIterator:
  """This host's part of every global batch of `batch_size` rows, continuing from `state`."""
  return GlobalBatchIterator(store, batch_size, process_index, process_count, state, prefetch)


class GlobalBatchIterator:
  """Iterator of the pipeline's batch dicts ([batch_size // process_count, seq_len] inputs, targets,
  weights, segment_ids) read from a RowStore in the global order."""

  def __init__(self, store: RowStore, batch_size: int, process_index: int = 0, process_count: int = 1,
               state: Optional[dict[str, Any]] = None, prefetch: int = 2):
    check_layout(batch_size, process_index, process_count)
    self.store = store
    self.batch_size, self.process_index, self.process_count = batch_size, process_index, process_count
    self.per_host_batch = batch_size // process_count
    self.order = GlobalOrder(len(store), int(store.config["seed"]), store.order)
    self._start = 0 if state is None else self._check_state(state)
    self._taken = 0
    batches = self._batches()
    self._prefetcher = None
    if prefetch:
      self._prefetcher = Prefetcher(batches, prefetch)
    self._source = self._prefetcher or batches

  def rows_of(self, step: int) -> np.ndarray:
    """The training-stream rows this host reads for the `step`-th batch after the start."""
    first = self._start + step * self.batch_size + self.process_index * self.per_host_batch
    return np.arange(first, first + self.per_host_batch, dtype=np.int64)

  def _batches(self) -> Iterator[dict[str, np.ndarray]]:
    step = 0
    while True:
      yield self.store.read(self.order(self.rows_of(step)))
      step += 1

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._source)
    self._taken += 1
    return batch

  def rows(self) -> int:
    """Training-stream rows consumed by all hosts together (the batches this iterator handed out)."""
    return self._start + self._taken * self.batch_size

  def state(self) -> dict[str, Any]:
    """Where the stream is: one global number and what it is a position in. JSON; the same on every
    process; restores with any process count and batch size."""
    return {"version": STATE_VERSION, "rows": self.rows(), "fingerprint": self.store.fingerprint,
            "order": self.store.order, "store_rows": len(self.store) if self.store.order == EPOCHS else None,
            "config": self.store.config}

  def stats(self) -> dict[str, Any]:
    rows = self.rows()
    return {"batches": self._taken, "rows": rows,
            "epoch": rows // len(self.store) if self.store.order == EPOCHS else 0,
            "store": str(self.store.directory), "store_rows": len(self.store), **self.store.manifest["build"]}

  def close(self, wait: bool = True) -> None:
    if self._prefetcher is not None:
      self._prefetcher.close(wait)

  def __del__(self):
    if hasattr(self, "_prefetcher"):
      self.close(wait=False)

  def __enter__(self) -> GlobalBatchIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _check_state(self, state: dict[str, Any]) -> int:
    if state.get("version") != STATE_VERSION or "rows" not in state:
      raise ValueError(f"data state {_short(state)} is not a row-store position (version "
                       f"{STATE_VERSION}); a streaming pipeline's state (version 1) resumes with "
                       "famjax.data.get_batches, on the layout that saved it")
    if state.get("fingerprint") != self.store.fingerprint:
      diff = differing_fields(state.get("config") or {}, self.store.config) or [
          f"fingerprint is {state.get('fingerprint')!r} there and {self.store.fingerprint!r} here"]
      raise StoreMismatchError(f"the data state was saved with another data config: {'; '.join(diff)} "
                               f"(there = the state, here = the store at {self.store.directory})")
    if self.store.order == EPOCHS and state.get("store_rows") != len(self.store):
      raise StoreMismatchError(
          f"the data state was saved over a store of {state.get('store_rows')} rows, the store at "
          f"{self.store.directory} holds {len(self.store)} (rebuilt from changed source files?): the "
          "same position would be other rows")
    rows = state["rows"]
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
      raise ValueError(f"data state: rows must be an int >= 0, got {rows!r}")
    return rows


def _short(state: Any) -> str:
  text = repr(state)
  return text if len(text) < 120 else text[:117] + "..."
