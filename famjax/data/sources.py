"""A seqio DataSource over Python-generated text examples, sharded by example index.

Synthetic tasks, PassKey and user files all produce (inputs, targets) strings in Python. This source
turns a Python generator into tf.data and does the two things seqio's FunctionDataSource cannot:
- sharding at the source: host `i` of `n` generates (or parses) only examples `i, i + n, i + 2n, ...`,
  so hosts never do each other's work and their shards are disjoint and together complete;
- speed: the generator yields chunks of examples that are unbatched in TensorFlow, because a
  tf.data.Dataset.from_generator element costs about 0.2 ms on its own.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import seqio

from famjax.data.stats import SourceStats, current_stats
from famjax.data.tensorflow_setup import tf

CHUNK = 64
TEXT_FEATURES = ("inputs", "targets")

# make_examples(split, seed, shard_index, num_shards, stats) -> iterator of (inputs, targets) strings
ExampleFn = Callable[[str, int, int, int, SourceStats], Iterator[tuple[str, str]]]


class PythonSource(seqio.DataSource):
  """seqio DataSource whose examples come from `make_examples`, already sharded by example index.

  make_examples(split, seed, shard_index, num_shards, stats) yields (inputs, targets) string pairs; a
  finite iterator is one epoch (it is called again for the next). `stats` are the counters of the
  pipeline being built (famjax.data.stats.building) when seqio asked for this dataset.
  """

  def __init__(self, make_examples: ExampleFn, splits: Sequence[str],
               num_input_examples: Optional[Mapping[str, int]] = None, shuffled: bool = False,
               preflight: Optional[Callable[[str, int, int], None]] = None,
               endless: Sequence[str] = ()):
    """shuffled: the examples are already i.i.d. (generated), so seqio need not shuffle them.
    endless: the splits whose stream never ends (generated training examples); a row store holds a
    fixed number of their rows instead of one pass.

    preflight(split, shard_index, num_shards): a cheap check run before the dataset is built that
    raises a clear error (missing file, a shard with no valid record) instead of an empty stream.
    """
    super().__init__(splits=splits, num_input_examples=num_input_examples, caching_permitted=False)
    self._make_examples = make_examples
    self._shuffled = shuffled
    self._preflight = preflight
    self.endless = tuple(endless)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  @property
  def performs_internal_shuffling(self) -> bool:
    return self._shuffled

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def num_input_examples(self, split: str) -> Optional[int]:
    return (self._num_input_examples or {}).get(split)  # None: endless or unknown

  def preflight(self, split: str, shard_index: int, num_shards: int) -> None:
    if self._preflight is not None:
      self._preflight(split, shard_index, num_shards)

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                  use_cached=False, num_epochs=1) -> tf.data.Dataset:
    del shuffle, sequence_length, use_cached, num_epochs  # the examples' order is the generator's
    index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    seed = 0 if seed is None else int(seed)
    make, stats = self._make_examples, current_stats()

    def chunks():
      yield from _chunked(make(split, seed, index, count, stats))

    spec = {k: tf.TensorSpec([None], tf.string) for k in TEXT_FEATURES}
    return tf.data.Dataset.from_generator(chunks, output_signature=spec).unbatch()


def _chunked(pairs: Iterable[tuple[str, str]]) -> Iterator[dict[str, list[bytes]]]:
  inputs, targets = [], []
  for x, y in pairs:
    inputs.append(x.encode("utf-8"))
    targets.append(y.encode("utf-8"))
    if len(inputs) == CHUNK:
      yield {"inputs": inputs, "targets": targets}
      inputs, targets = [], []
  if inputs:
    yield {"inputs": inputs, "targets": targets}
