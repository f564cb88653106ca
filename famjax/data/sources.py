"""A seqio DataSource over Python-generated text examples, sharded by example index.

Synthetic tasks, PassKey and user files all produce (inputs, targets) strings in Python. This source
turns a Python generator into tf.data and does the two things seqio's FunctionDataSource cannot:
- sharding at the source: host `i` of `n` generates (or parses) only examples `i, i + n, i + 2n, ...`,
  so hosts never do each other's work and their shards are disjoint and together complete;
- speed: the generator yields chunks of examples that are unbatched in TensorFlow, because a
  tf.data.Dataset.from_generator element costs about 0.2 ms on its own.

For tokenizing once (famjax.data.tokenize), a source also says how it splits into work units, each one
output file and a pure function of (split, seed, unit): a finite source (user files) lists its units
(`unit_names`: groups of input files, or TFDS shards) and reads one (`unit_examples`); an endless one
(generated examples) reads any range of its example indices (`range_examples`).
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
# unit_names(split) -> the names of a finite source's units (what each reads)
UnitNamesFn = Callable[[str], Sequence[str]]
# unit_examples(split, seed, unit name, stats) -> the (inputs, targets) of that unit, in order
UnitExamplesFn = Callable[[str, int, str, SourceStats], Iterator[tuple[str, str]]]
# range_examples(split, seed, start, stop) -> examples start, ..., stop - 1 of an endless source
RangeExamplesFn = Callable[[str, int, int, int], Iterator[tuple[str, str]]]


class PythonSource(seqio.DataSource):
  """seqio DataSource whose examples come from `make_examples`, already sharded by example index.

  make_examples(split, seed, shard_index, num_shards, stats) yields (inputs, targets) string pairs; a
  finite iterator is one epoch (it is called again for the next). `stats` are the counters of the
  pipeline being built (famjax.data.stats.building) when seqio asked for this dataset.
  """

  def __init__(self, make_examples: ExampleFn, splits: Sequence[str],
               num_input_examples: Optional[Mapping[str, int]] = None, shuffled: bool = False,
               preflight: Optional[Callable[[str, int, int], None]] = None,
               endless: Sequence[str] = (), unit_names: Optional[UnitNamesFn] = None,
               unit_examples: Optional[UnitExamplesFn] = None,
               range_examples: Optional[RangeExamplesFn] = None):
    """shuffled: the examples are already i.i.d. (generated), so seqio need not shuffle them.
    endless: the splits whose stream never ends (generated training examples); they are tokenized in
    ranges of example indices (`range_examples`), as many as the run's rows need.
    unit_names, unit_examples: a finite source's tokenization units (see the module docstring); without
    them the whole split is one unit (read through make_examples as shard 0 of 1).

    preflight(split, shard_index, num_shards): a cheap check run before the dataset is built that
    raises a clear error (missing file, a shard with no valid record) instead of an empty stream.
    """
    super().__init__(splits=splits, num_input_examples=num_input_examples, caching_permitted=False)
    self._make_examples = make_examples
    self._shuffled = shuffled
    self._preflight = preflight
    self.endless = tuple(endless)
    self._unit_names, self._unit_examples = unit_names, unit_examples
    self._range_examples = range_examples

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
    return _dataset(lambda: make(split, seed, index, count, stats))

  # -- tokenization units (famjax.data.tokenize) ---------------------------------------------------

  def unit_names(self, split: str) -> Optional[list[str]]:
    """The names of the split's tokenization units, or None for an endless split (read by ranges)."""
    if split in self.endless:
      return None
    return list(self._unit_names(split)) if self._unit_names is not None else [split]

  def unit_dataset(self, split: str, seed: int, unit: str) -> tf.data.Dataset:
    """The (inputs, targets) strings of the unit named `unit` (one of unit_names) of a finite split."""
    stats = current_stats()
    if self._unit_examples is None:
      make = self._make_examples
      return _dataset(lambda: make(split, seed, 0, 1, stats))
    make_unit = self._unit_examples
    return _dataset(lambda: make_unit(split, seed, unit, stats))

  def range_dataset(self, split: str, seed: int, start: int, stop: int) -> tf.data.Dataset:
    """Examples start, ..., stop - 1 of an endless split."""
    if self._range_examples is None:
      raise ValueError(f"{split!r} of this source is endless but it cannot read a range of examples")
    make_range = self._range_examples
    return _dataset(lambda: make_range(split, seed, start, stop))


def _dataset(make: Callable[[], Iterable[tuple[str, str]]]) -> tf.data.Dataset:
  def chunks():
    yield from _chunked(make())

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
