"""Reading training rows with Grain: a MapDataset whose element s is this host's slice of global batch s,
gathered from the plan's pieces (famjax.data.store.TrainingRows.read), read ahead by Grain's prefetch
threads.

    batches = host_batches(rows, order, first_row=0, batch_size=128, process_index=p, process_count=n)
    next(batches)  # rows order(first_row + s*128 + p*128/n + [0, 128/n)) of the plan, as a batch dict

Element s is a pure function of s (no state but the index), so a restore is a seek: a new dataset that
starts at the saved row. The iterator reads `prefetch` batches ahead on `threads` threads (0: on the
caller's thread); an error while reading (a store changed under the run, a corrupt file, a row past the
plan) comes back at the batch that needed it.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

MAX_BATCHES = 1 << 40  # "endless": a run stops long before; a plan's end raises IndexError when read


class HostBatch:
  """Grain map transform: batch index -> this host's rows of that global batch."""

  def __init__(self, read: Callable[[np.ndarray], dict], order: Callable[[np.ndarray], np.ndarray],
               first_row: int, batch_size: int, per_host: int, process_index: int):
    self._read, self._order = read, order
    self._first = first_row + process_index * per_host
    self._batch_size, self._per_host = batch_size, per_host

  def rows(self, step: int) -> np.ndarray:
    """The training rows (global order) this host reads for the `step`-th batch."""
    first = self._first + step * self._batch_size
    return np.arange(first, first + self._per_host, dtype=np.int64)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return self._read(self._order(self.rows(step)))


def host_batches(read: Callable[[np.ndarray], dict], order: Callable[[np.ndarray], np.ndarray],
                 first_row: int, batch_size: int, process_index: int, process_count: int,
                 prefetch: int = 2, threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """This host's batches from training row `first_row` on (see the module docstring): a Grain
  MapDataset over batch indices, mapped to the rows they hold, iterated with Grain's prefetch."""
  import grain  # pylint: disable=import-outside-toplevel
  batch = HostBatch(read, order, first_row, batch_size, batch_size // process_count, process_index)
  dataset = grain.MapDataset.range(0, MAX_BATCHES).map(batch)
  options = grain.ReadOptions(num_threads=threads if prefetch else 0, prefetch_buffer_size=prefetch)
  return iter(dataset.to_iter_dataset(options))
