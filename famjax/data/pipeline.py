"""get_batches: what the trainer calls. seqio reads and mixes, numpy packs, a thread keeps batches ready.

    it = get_batches(config, batch_size=global_batch, split="train",
                     process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)  # this host's batch_size // process_count rows
    it.state()        # JSON-serialisable position; get_batches(..., state=...) continues from it

Each host reads its own shard (seqio ShardInfo from the process index and count); the global batch is
the concatenation of the hosts' batches in process order. For a seed, everything is deterministic:
generation, the tasks' shuffle buffers, seqio's mixing, packing and the repeated segment. So the state
is just how many batches were taken, and a restore rebuilds the pipeline and replays that many
batches (resume="replay", the default): the next batch is exactly the one the saved iterator would
have given, at the cost of producing the skipped ones again (the benchmark measures it; long runs add
up). resume="reseed" instead starts a fresh pipeline whose seed is derived from (seed, batches): no
replay, statistically the same stream, but not the same batches (and file sources start over from
their first records). The state records where the current pipeline started ("origin") so that either
kind of restore is itself reproducible. Resuming needs the same config, seed, batch size and process
layout; anything else is refused rather than silently giving other data.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import queue
import threading
import weakref
from typing import Any, Iterator, Optional

import numpy as np
import seqio

from famjax.data import tasks as tasks_lib
from famjax.data.config import DataConfig
from famjax.data.packing import ROW_KEYS, Packer, PackingSpec, empty_row
from famjax.data.stats import SourceStats, building
from famjax.data.tensorflow_setup import tf
from famjax.data.vocab import get_vocabulary

STATE_VERSION = 1
RESUME_MODES = ("replay", "reseed")
_EXAMPLES_PER_FETCH = 64  # examples moved from TensorFlow to numpy per call
# Changing these does not change the stream (store fields: the stream reads no store).
_CONFIG_FIELDS_NOT_IN_STATE = ("prefetch", "store", "store_rows")


def mixture_names() -> tuple[str, ...]:
  """Built-in mixture and task names, any of which can be DataConfig.mixture."""
  return tasks_lib.mixture_names()


def get_batches(config: DataConfig, batch_size: int, split: str = "train", process_index: int = 0,
                process_count: int = 1, seed: Optional[int] = None,
                state: Optional[dict[str, Any]] = None, num_epochs: Optional[int] = None,
                resume: str = "replay") -> BatchIterator:
  """Batches of packed rows for this host (see the module docstring and BatchIterator).

  batch_size: the global batch; each host gets batch_size // process_count rows.
  seed: defaults to config.seed (or to the seed recorded in `state`).
  state: a BatchIterator.state() to continue from.
  resume: how to continue from `state`: "replay" (the exact next batch) or "reseed" (no replay).
  num_epochs: None repeats the data forever (training); 1 reads each example once (evaluation), and
    the last batch is then filled up with all-padding rows (weight 0).
  """
  return BatchIterator(config, batch_size, split, process_index, process_count, seed, state,
                       num_epochs, resume)


class BatchIterator:
  """Iterator of dicts of numpy arrays, each [batch_size // process_count, seq_len]:

  inputs (int32): decoder input ids, the targets shifted right within each packed example (0 first);
  targets (int32): the ids to predict; inputs[t] predicts targets[t];
  weights (float32): per-token loss weights: prompt 0 (config.instruction_weight), answer 1,
    repeated segment config.repeat_segment_weight, padding 0;
  segment_ids (int32): 1, 2, ... per packed example, 0 for padding.
  """

  def __init__(self, config: DataConfig, batch_size: int, split: str, process_index: int,
               process_count: int, seed: Optional[int], state: Optional[dict[str, Any]],
               num_epochs: Optional[int], resume: str = "replay"):
    check_layout(batch_size, process_index, process_count)
    if resume not in RESUME_MODES:
      raise ValueError(f"resume must be one of {RESUME_MODES}, got {resume!r}")
    if state is not None and seed is None:
      seed = state.get("seed")
    self.config = config
    self.split = split
    self.seed = config.seed if seed is None else int(seed)
    self.per_host_batch = batch_size // process_count
    self.vocabulary = get_vocabulary(config)
    self.mixture = tasks_lib.ensure_registered(config)
    self._layout = dict(batch_size=batch_size, process_index=process_index,
                        process_count=process_count, num_epochs=num_epochs)
    self._taken = self._origin = 0  # batches taken; the count at which this pipeline started
    if state is not None:
      self._check_state(state)
      self._taken = int(state["batches"])
      self._origin = self._taken if resume == "reseed" else int(state["origin"])
    pipeline_seed = _pipeline_seed(self.seed, self._origin)
    self._examples = rows = PackedRows(config, split, pipeline_seed, process_index, process_count,
                                       num_epochs)
    self._stats, self._packer = rows.stats, rows.packer
    batches = _batches(iter(rows), self.per_host_batch, config.seq_len)
    batches = itertools.islice(batches, self._taken - self._origin, None)  # the replay
    if config.prefetch:
      self._source = Prefetcher(batches, config.prefetch, on_exit=self._examples.close)
    else:
      self._source = batches
    _LIVE.add(self)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._source)
    self._taken += 1
    return batch

  def state(self) -> dict[str, Any]:
    """Where the iterator is: restore with get_batches(..., state=...). JSON-serialisable."""
    return {"version": STATE_VERSION, "batches": self._taken, "origin": self._origin, "seed": self.seed,
            "mixture": self.mixture, "split": self.split, "config": _config_fingerprint(self.config),
            **self._layout}

  def stats(self) -> dict[str, Any]:
    """Counters so far: per source (records read, skipped_<why>, truncated, skipped_too_long) and of
    packing. Reading runs ahead of the batches taken (prefetch), so counts may include a few more."""
    counts = dict(self._packer.counts)
    counts["fill"] = round(counts["tokens"] / (counts["rows"] * self.config.seq_len), 4) \
        if counts["rows"] else 0.0  # non-padding fraction of the rows
    return {"batches": self._taken, "sources": self._stats.snapshot(), "packing": counts}

  def close(self, wait: bool = True) -> None:
    """Stops reading. Also done at exit (a TensorFlow iterator over Python generators still alive
    when the interpreter shuts down can hang the process) and when the iterator is dropped."""
    if isinstance(self._source, Prefetcher):
      self._source.close(wait)  # the thread closes the examples itself: it is the one running them
    else:
      self._examples.close()

  def __del__(self):
    if hasattr(self, "_source"):
      self.close(wait=False)

  def __enter__(self) -> BatchIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _check_state(self, state: dict[str, Any]) -> None:
    expected = self.state()
    for key in ("version", "seed", "mixture", "split", "config", "batch_size", "process_index",
                "process_count", "num_epochs"):
      if state.get(key) != expected[key]:
        raise ValueError(
            f"iterator state does not match this pipeline: {key} is {state.get(key)!r} in the state "
            f"and {expected[key]!r} here (resuming a stream needs the same data config, seed, batch "
            "size and process layout; a run that reads the data store, famjax.data.store, resumes on "
            "any layout)")
    batches, origin = state.get("batches"), state.get("origin")
    if not isinstance(batches, int) or not isinstance(origin, int) or not 0 <= origin <= batches:
      raise ValueError(f"iterator state: need ints 0 <= origin <= batches, got {origin!r}, {batches!r}")


def get_examples(config: DataConfig, split: str = "validation", process_index: int = 0,
                 process_count: int = 1, seed: Optional[int] = None
                 ) -> Iterator[dict[str, Any]]:
  """One pass over each task's examples (task after task, in order), unpacked and untruncated, for
  evaluation: dicts with `inputs` (prompt ids), `targets` (answer ids with EOS), their texts
  `inputs_pretokenized` / `targets_pretokenized`, and `task` (whose seqio metric_fns and
  postprocess_fn score it), plus any other feature the task emits (the GPT-3 tasks' options, label or
  reference answers, as numpy values). A PassKey-1M example comes through whole, for a streaming
  evaluation."""
  name = tasks_lib.ensure_registered(config)
  seed = config.seed if seed is None else seed
  stats = SourceStats()
  for task in tasks_lib.tasks_of(name):
    if split not in task.splits:
      continue
    with building(stats, config.tfds_data_dir):
      _preflight(task, split, process_index, process_count)
      ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, seed=seed,
                            shard_info=seqio.ShardInfo(process_index, process_count), num_epochs=1,
                            trim_output_features=False)
    for ex in ds.as_numpy_iterator():
      yield {**ex, "inputs": ex["inputs"], "targets": ex["targets"], "task": task.name,
             "inputs_pretokenized": _text(ex.get("inputs_pretokenized", b"")),
             "targets_pretokenized": _text(ex.get("targets_pretokenized", b""))}


# -- the pieces ------------------------------------------------------------------------------------

def check_layout(batch_size: int, process_index: int, process_count: int) -> None:
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count must be an int >= 1, got {process_count!r}")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
  if not isinstance(batch_size, int) or batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size {batch_size!r} must be a positive multiple of process_count "
                     f"{process_count}")


def _pipeline_seed(seed: int, origin: int) -> int:
  """The seed of a pipeline started at batch `origin` (a fresh one: the seed itself)."""
  if origin == 0:
    return seed
  return int(np.random.SeedSequence([seed, origin]).generate_state(1)[0])


def _config_fingerprint(config: DataConfig) -> str:
  fields = {k: v for k, v in vars(config).items() if k not in _CONFIG_FIELDS_NOT_IN_STATE}
  return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _preflight(task: seqio.Task, split: str, process_index: int, process_count: int) -> None:
  """Sources that can fail (missing files or TFDS data, empty shards) say so before the graph runs."""
  check = getattr(task.source, "preflight", None)
  if check is not None and split in task.splits:
    check(split, process_index, process_count)


def _build_dataset(mixture: str, config: DataConfig, split: str, seed: int, process_index: int,
                   process_count: int, num_epochs: Optional[int], stats: SourceStats
                   ) -> tf.data.Dataset:
  """This host's shard of the mixture through seqio, as ragged batches of (tokens, n_prompt, task).

  Runs eagerly (in get_batches), so missing data fails there and then, not at the first batch."""
  provider = seqio.get_mixture_or_task(mixture)
  tasks = tasks_lib.tasks_of(mixture)
  kwargs = dict(sequence_length={"inputs": config.seq_len, "targets": config.seq_len}, split=split,
                shuffle=(split == "train"), seed=seed,
                shard_info=seqio.ShardInfo(process_index, process_count), num_epochs=num_epochs,
                trim_output_features=False)
  named = all(tasks_lib.famjax_task(t) for t in tasks)
  if isinstance(provider, seqio.Mixture) and named:
    kwargs["passthrough_features"] = ["task"]
  with building(stats, config.tfds_data_dir):
    for task in tasks:
      _preflight(task, split, process_index, process_count)
    ds = provider.get_dataset(**kwargs)

  def flatten(ex):
    return {"tokens": tf.concat([ex["inputs"], ex["targets"]], 0), "n_prompt": tf.size(ex["inputs"]),
            "task": ex["task"] if named else tf.constant(mixture)}

  ds = ds.map(flatten, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.ragged_batch(_EXAMPLES_PER_FETCH).prefetch(2)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _examples(ds: tf.data.Dataset, mixture: str) -> Iterator[tuple[np.ndarray, int, str]]:
  """(tokens, prompt length, task name) of each example, in order."""
  names: dict[bytes, str] = {}
  try:
    for fetched in ds:
      flat = fetched["tokens"].flat_values.numpy()
      splits = fetched["tokens"].row_splits.numpy()
      n_prompt = fetched["n_prompt"].numpy()
      task_names = fetched["task"].numpy()
      for j, n in enumerate(n_prompt):
        name = names.get(task_names[j]) or names.setdefault(task_names[j], task_names[j].decode())
        yield flat[splits[j]:splits[j + 1]], int(n), name
  except tf.errors.OpError as e:
    raise RuntimeError(f"famjax.data: reading {mixture!r} failed: {e.message}") from None


class PackedRows:
  """The packed rows of one host's shard of a split, in stream order (an iterable of row dicts):
  seqio reads, tokenises and mixes (ShardInfo(process_index, process_count)), the Packer packs. The
  streaming pipeline batches them (famjax.data.store tokenizes and plans instead)."""

  def __init__(self, config: DataConfig, split: str, seed: int, process_index: int = 0,
               process_count: int = 1, num_epochs: Optional[int] = None):
    self.mixture = tasks_lib.ensure_registered(config)
    self.stats = SourceStats()
    dataset = _build_dataset(self.mixture, config, split, seed, process_index, process_count,
                             num_epochs, self.stats)
    self._examples = _examples(dataset, self.mixture)
    marker = tuple(get_vocabulary(config).encode(config.repeat_segment_marker))
    spec = PackingSpec(config.seq_len, config.pack, config.mask_between_examples,
                       config.repeat_segment_len, config.repeat_segment_weight, marker,
                       config.instruction_weight, config.too_long, config.pack_align)
    rng = np.random.default_rng([seed, process_index, 0x5EED])
    self.packer = Packer(spec, rng, self.stats, repeat=(split == "train"))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    produced = 0
    for tokens, n_prompt, task in self._examples:
      for row in self.packer.add(tokens, n_prompt, task):
        produced += 1
        yield row
    for row in self.packer.flush():
      produced += 1
      yield row
    if not produced:
      raise ValueError(f"famjax.data: {self.mixture!r} produced no example on this host")

  def close(self) -> None:
    self._examples.close()


def _batches(rows: Iterator[dict[str, np.ndarray]], batch_size: int, seq_len: int
             ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `batch_size` rows; the last one of a finite stream filled up with all-padding rows."""
  batch: list[dict[str, np.ndarray]] = []
  for row in rows:
    batch.append(row)
    if len(batch) == batch_size:
      yield _stack(batch)
      batch = []
  if batch:
    yield _stack(batch + [empty_row(seq_len)] * (batch_size - len(batch)))


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}


def _text(value: Any) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for it in list(_LIVE):
    it.close()


class Prefetcher:
  """Runs an iterator on a background thread, `depth` items ahead; errors re-raise in the caller."""

  _END = object()

  def __init__(self, source: Iterator, depth: int, on_exit=lambda: None):
    self._on_exit = on_exit
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._run, args=(source,), daemon=True,
                                    name="famjax-data-prefetch")
    self._thread.start()

  def _run(self, source: Iterator) -> None:
    try:
      for item in source:
        if not self._put(item):
          return
      self._put(self._END)
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
      self._put(e)
    finally:
      self._on_exit()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is self._END:
      self._done = True
      raise StopIteration
    if isinstance(item, BaseException):
      self._done = True
      raise item
    return item

  def close(self, wait: bool = True) -> None:
    self._stop.set()
    self._done = True
    if wait and self._thread is not threading.current_thread():
      self._thread.join(timeout=10)
