"""Per-source counters (records read, skipped, truncated) and the build context that routes them.

seqio Tasks are registered once per process, but every BatchIterator needs its own counts. So a
pipeline is built inside `building(...)`: the sources and preprocessors that seqio calls while it
assembles the tf.data graph (synchronously, inside get_dataset) look up the current `SourceStats` and
the TFDS data directory here and capture them. Python readers bump plain ints; TensorFlow-side filters
bump a tf.Variable; `snapshot()` adds both.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Iterator

from famjax.data.tensorflow_setup import tf


class SourceStats:
  """Counters keyed by (source, kind). Kinds: read, skipped_<reason>, truncated, skipped_too_long."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self._variables: dict[tuple[str, str], tf.Variable] = {}

  def add(self, source: str, kind: str, n: int = 1) -> None:
    with self._lock:
      self._counts[source][kind] += n

  def tf_counter(self, source: str, kind: str) -> tf.Variable:
    """An int64 variable a tf.data function can `assign_add` to (read back by snapshot())."""
    with self._lock:
      key = (source, kind)
      if key not in self._variables:
        with tf.init_scope():
          self._variables[key] = tf.Variable(0, dtype=tf.int64, trainable=False)
      return self._variables[key]

  def snapshot(self) -> dict[str, dict[str, int]]:
    with self._lock:
      out = {s: dict(c) for s, c in self._counts.items()}
      variables = list(self._variables.items())
    for (source, kind), var in variables:
      value = int(var.numpy())
      if value:
        out.setdefault(source, {})
        out[source][kind] = out[source].get(kind, 0) + value
    return {s: dict(sorted(c.items())) for s, c in sorted(out.items())}


class _BuildContext(threading.local):
  def __init__(self):
    self.stats = SourceStats()  # outside any pipeline (e.g. a direct seqio get_dataset): a throwaway
    self.tfds_data_dir = ""


_context = _BuildContext()


@contextlib.contextmanager
def building(stats: SourceStats, tfds_data_dir: str = "") -> Iterator[None]:
  """Within this block, sources and preprocessors report to `stats` and read TFDS from the dir."""
  saved = (_context.stats, _context.tfds_data_dir)
  _context.stats, _context.tfds_data_dir = stats, tfds_data_dir
  try:
    yield
  finally:
    _context.stats, _context.tfds_data_dir = saved


def current_stats() -> SourceStats:
  return _context.stats


def current_tfds_data_dir() -> str:
  return _context.tfds_data_dir
