"""Tokenize once: each seqio Task's source, preprocessors and vocabulary, unit by unit, into ArrayRecord
files of tokenized examples (famjax.data.examples), with Apache Beam or in this process.

A unit is one output file and a pure function of (config, task, unit): a group of input files or a
TFDS shard of a user source, a shard of a task registered by other code (seqio's `list_shards`, as its
cache_tasks_main reads them), or a range of example indices of a generated (endless) task. Tokenizing a
unit runs the task exactly as seqio does for its cache (source.get_dataset for the unit, then the task's
preprocessors, seed fixed), writes the unit's file under a temporary name, renames it into place, then
writes the unit's summary (examples, tokens, sizes, sha256, source counters): a unit with a summary is
done, so an interrupted build redoes only the unfinished units. When every unit of a task is done, the
driver publishes the build: the examples' lengths in one file, then the manifest, last.

Runners (the same `tokenize_unit` either way):
- in this process (`workers=0`): what a training run does when it finds no examples (small configs:
  the demo's take a second or two, no start-up);
- Apache Beam (`python -m famjax.data.prepare --workers=N`): DirectRunner with N worker processes here,
  or any runner through Beam's options (Dataflow, Flink, Spark: docs/data.md has the commands). Workers
  write the files themselves (to any filesystem famjax.data.fs reaches); the driver publishes.

The examples do not depend on the runner or the number of workers (each unit's examples_sha256 is in
the manifest; the benchmark compares them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import io
import json
import os
import re
import socket
import time
import uuid
from typing import Any, Callable, Optional, Sequence

import numpy as np
import seqio

from famjax.data import examples as ex
from famjax.data import fs
from famjax.data import tasks as tasks_lib
from famjax.data.config import BYTE_VOCABULARY, DataConfig
from famjax.data.errors import StoreWriteError
from famjax.data.sources import PythonSource
from famjax.data.stats import SourceStats, building
from famjax.data.tensorflow_setup import tf
from famjax.data.vocab import get_vocabulary

# Bump when the code that makes examples changes (tokenization, generators, record format): stores of
# older code are then not reused.
TOKENIZE_VERSION = 1
SPLIT = "train"
_FETCH = 256  # examples moved from TensorFlow to numpy at a time


@dataclasses.dataclass(frozen=True)
class Unit:
  """One unit of work: one output file of one task's build."""

  task: str
  index: int
  name: str  # what it reads (input files, a shard, an example range)
  count: int  # units of the task (a shard of a task read through seqio: ShardInfo(index, count))
  directory: str  # the build directory
  build: str
  fingerprint: str
  start: int = -1  # endless tasks: the examples [start, stop)
  stop: int = -1


# -- what a task's examples are -------------------------------------------------------------------------

def vocabulary_hash(config: DataConfig) -> str:
  if config.vocabulary == BYTE_VOCABULARY:
    return BYTE_VOCABULARY
  with tf.io.gfile.GFile(os.path.expanduser(config.vocabulary), "rb") as f:  # a SentencePiece model
    return hashlib.sha1(f.read()).hexdigest()


def identity(config: DataConfig, task: str) -> dict[str, Any]:
  """What the task's tokenized examples depend on (the fingerprint of its store)."""
  return {**tasks_lib.tokenization_identity(seqio.get_mixture_or_task(task), config.seed), "split": SPLIT,
          "vocabulary_sha1": vocabulary_hash(config), "vocab_size": get_vocabulary(config).vocab_size,
          "tokenize_version": TOKENIZE_VERSION, "format_version": ex.FORMAT_VERSION}


def fingerprint(identity_: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(identity_, sort_keys=True).encode()).hexdigest()[:16]


def is_endless(task: str) -> bool:
  source = seqio.get_mixture_or_task(task).source
  return isinstance(source, PythonSource) and source.unit_names(SPLIT) is None


def unit_plan(task: str, examples: int = 0) -> list[tuple[str, int, int]]:
  """(name, start, stop) of every unit of a task: a finite one's units, or enough of an endless one's
  to hold `examples` examples."""
  source = seqio.get_mixture_or_task(task).source
  if isinstance(source, PythonSource):
    names = source.unit_names(SPLIT)
    if names is None:
      return [(f"examples {a}-{b - 1}", a, b) for a, b in map(
          ex.endless_unit_range, range(ex.endless_units_for(examples)))]
    return [(name, -1, -1) for name in names]
  shards = list(source.list_shards(SPLIT))
  if not shards:
    raise FileNotFoundError(f"famjax.data: task {task!r} lists no shards of its {SPLIT!r} split")
  return [(shard, -1, -1) for shard in shards]


# -- one unit ----------------------------------------------------------------------------------------------

def tokenize_unit(config: DataConfig, unit: Unit, modules: Sequence[str] = (), threads: int = 0
                  ) -> dict[str, Any]:
  """Tokenizes one unit into its file and writes its summary (nothing if it is done already); returns
  the summary. The same in Beam workers and in this process. `modules` register tasks of other code;
  `threads` > 0 bounds the threads TensorFlow runs the unit's pipeline on (a Beam worker: 1, since a
  runner starts a worker process per core; 0: TensorFlow's default, all cores)."""
  done = ex.summary_of(unit.directory, unit.index)
  if done is not None and done.get("name") == unit.name:
    return done
  for module in modules:  # a Beam worker starts with an empty registry
    importlib.import_module(module)
  tasks_lib.ensure_registered(config)
  task = seqio.get_mixture_or_task(unit.task)
  dtype = ex.token_dtype(get_vocabulary(config).vocab_size)
  path = fs.join(unit.directory, ex.unit_file(unit.index))
  staging = fs.staging_file(path)
  t0, started = time.perf_counter(), _now()
  stats = SourceStats()
  records = hashlib.sha256()
  lengths: list[tuple[int, int]] = []
  try:
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    with fs.write_errors(path):
      writer = array_record_module.ArrayRecordWriter(staging, ex.WRITER_OPTIONS)
    try:
      with building(stats, config.tfds_data_dir):
        dataset = _unit_dataset(task, unit, config.seed)
      for ids, n_prompt in _examples(dataset, unit, threads):
        record = ex.encode_example(ids, n_prompt, dtype)
        with fs.write_errors(path):
          writer.write(record)
        records.update(len(record).to_bytes(8, "little") + record)
        lengths.append((len(ids), n_prompt))
      with fs.write_errors(path):
        writer.write(ex.trailer_record(unit.task, unit.fingerprint, unit.build, unit.index, len(lengths)))
    finally:
      with fs.write_errors(path):
        writer.close()
    if fs.is_local(staging):
      with fs.write_errors(path):
        _fsync(staging)
    size, digest = os.path.getsize(staging), fs.sha256(staging)
    with fs.write_errors(path):
      fs.publish(staging, path)
  finally:
    with contextlib.suppress(OSError):
      os.unlink(staging)
  table = np.asarray(lengths, np.int32).reshape(-1, 2)
  buffer = io.BytesIO()
  np.save(buffer, table, allow_pickle=False)
  lengths_path = fs.join(unit.directory, f"unit-{unit.index:05d}.lengths.npy")
  with fs.write_errors(lengths_path):
    fs.write_atomic(lengths_path, buffer.getvalue())
  summary = {"unit": unit.index, "name": unit.name, "file": ex.unit_file(unit.index),
             "examples": len(lengths), "tokens": int(table[:, 0].sum()), "bytes": size, "sha256": digest,
             "examples_sha256": records.hexdigest(), "lengths": fs.basename(lengths_path),
             "lengths_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(), "stats": stats.snapshot(),
             "started": started, "finished": _now(), "seconds": round(time.perf_counter() - t0, 3),
             "worker": f"{socket.gethostname()}:{os.getpid()}",
             "start": unit.start, "stop": unit.stop}
  summary_path = fs.join(unit.directory, ex.unit_summary(unit.index))
  with fs.write_errors(summary_path):
    fs.write_json(summary_path, summary)
  return summary


def _unit_dataset(task: seqio.Task, unit: Unit, seed: int) -> tf.data.Dataset:
  """The unit's examples through the task's source and preprocessors (seqio's cache path)."""
  source = task.source
  if isinstance(source, PythonSource):
    if unit.start >= 0:
      dataset = source.range_dataset(SPLIT, seed, unit.start, unit.stop)
    else:
      dataset = source.unit_dataset(SPLIT, seed, unit.name)
    dataset = task.preprocess_precache(dataset, seed=seed)
    return task.preprocess_postcache(dataset, sequence_length=None, seed=seed)
  return task.get_dataset(sequence_length=None, split=SPLIT, use_cached=False, shuffle=False, seed=seed,
                          shard_info=seqio.ShardInfo(unit.index, unit.count), num_epochs=1,
                          trim_output_features=False, try_in_mem_cache=False)


def _examples(dataset: tf.data.Dataset, unit: Unit, threads: int = 0):
  """(token ids, prompt tokens) of each example: the prompt (inputs) then the answer (targets + EOS)."""

  def flatten(example):
    inputs = example["inputs"] if "inputs" in example else tf.zeros([0], tf.int32)
    inputs = tf.cast(inputs, tf.int32)
    return {"tokens": tf.concat([inputs, tf.cast(example["targets"], tf.int32)], 0),
            "n_prompt": tf.size(inputs)}

  dataset = dataset.map(flatten, num_parallel_calls=tf.data.AUTOTUNE).ragged_batch(_FETCH)
  options = tf.data.Options()
  options.deterministic = True
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  try:
    for fetched in dataset.with_options(options).prefetch(2):
      flat = fetched["tokens"].flat_values.numpy()
      splits = fetched["tokens"].row_splits.numpy()
      for j, n in enumerate(fetched["n_prompt"].numpy()):
        yield flat[splits[j]:splits[j + 1]], int(n)
  except tf.errors.OpError as e:
    message = re.sub(r"^\{\{[^}]*\}\}\s*", "", e.message.strip()).splitlines()[0]
    raise RuntimeError(f"famjax.data: tokenizing {unit.task} unit {unit.index} ({unit.name}) failed: "
                       f"{message}") from None


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- a whole build -------------------------------------------------------------------------------------

@dataclasses.dataclass
class Request:
  """The examples a caller needs of one task: all of a finite one, at least `examples` of an endless one."""

  task: str
  directory: str  # the task's store (famjax.data.store: <root>/examples/<task>-<fingerprint>)
  fingerprint: str
  examples: int = 0


def new_build_name() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("b%Y%m%dT%H%M%S") + f"-{uuid.uuid4().hex[:6]}"


def choose_build(directory: str, rebuild: bool) -> tuple[str, Optional[int]]:
  """(build, published units or None): the newest published build (to use, or extend), else an
  unfinished one (an interrupted build: continue it), else a new one. `rebuild`: a newer unfinished
  build (an interrupted rebuild) or a new one."""
  names = ex.builds(directory)
  published = ex.newest_published(directory)
  if published is not None and not rebuild:
    return published
  newer = [b for b in names if published is None or b > published[0]]
  newer = [b for b in newer if not ex.published_versions(fs.join(directory, b))]
  if newer:
    return newer[-1], None
  return new_build_name(), None


def ensure(config: DataConfig, requests: Sequence[Request], *, rebuild: bool = False, workers: int = 0,
           beam_options: Optional[Sequence[str]] = None, modules: Sequence[str] = (),
           say: Callable[[str], None] = print) -> dict[str, tuple[str, int]]:
  """Makes sure every requested task has a published build holding what is asked; returns
  {task: (build, published units)}. Tokenizes what is missing (in this process with workers=0, else
  with Beam), one build per task, under each task's lock (other processes of a job wait)."""
  out: dict[str, tuple[str, int]] = {}
  pending: list[tuple[Request, str, list[Unit]]] = []
  with contextlib.ExitStack() as locks:
    for request in sorted(requests, key=lambda r: r.directory):
      locks.enter_context(fs.lock(request.directory, say, f"the examples of {request.task}"))
    for request in requests:
      build, published = choose_build(request.directory, rebuild)
      if published is None:  # a missing file or an empty source fails here, naming it
        check = getattr(seqio.get_mixture_or_task(request.task).source, "preflight", None)
        if check is not None:
          with building(SourceStats(), config.tfds_data_dir):
            check(SPLIT, 0, 1)
      if published is not None and not is_endless(request.task):  # a finite task's build is whole
        out[request.task] = (build, published)
        continue
      wanted = unit_plan(request.task, request.examples)
      if published is not None and published >= len(wanted):
        out[request.task] = (build, published)
        continue
      build_dir = fs.join(request.directory, build)
      fs.makedirs(build_dir)
      for name in fs.listdir(build_dir):  # left by a build that was killed (we hold the lock)
        if name.startswith(".") and name.endswith(".tmp"):
          fs.remove(fs.join(build_dir, name))
      units = [Unit(request.task, k, name, len(wanted), build_dir, build, request.fingerprint, start, stop)
               for k, (name, start, stop) in enumerate(wanted)]
      pending.append((request, build, units))
    if not pending:
      return out
    todo = [u for _, _, units in pending for u in units if not _done(u)]
    done = sum(len(units) for _, _, units in pending) - len(todo)
    say(f"famjax.data: tokenizing {', '.join(r.task for r, _, _ in pending)}: {len(todo)} file(s) to "
        f"write{f' ({done} done already)' if done else ''}, "
        f"{'in this process' if not workers and beam_options is None else 'with Apache Beam'} ...")
    t0 = time.perf_counter()
    run_units(config, todo, workers=workers, beam_options=beam_options, modules=modules, say=say)
    for request, build, units in pending:
      out[request.task] = (build, publish(config, request, build, units, say))
    say(f"famjax.data: tokenized in {time.perf_counter() - t0:.1f} s")
  return out


def _done(unit: Unit) -> bool:
  summary = ex.summary_of(unit.directory, unit.index)
  return summary is not None and summary.get("name") == unit.name


def run_units(config: DataConfig, units: Sequence[Unit], *, workers: int = 0,
              beam_options: Optional[Sequence[str]] = None, modules: Sequence[str] = (),
              say: Callable[[str], None] = print) -> None:
  """Tokenizes the units: in this process (workers=0, no Beam options), else with Apache Beam."""
  if not units:
    return
  if not workers and beam_options is None:
    t0, tokens = time.perf_counter(), 0
    for i, unit in enumerate(units):
      summary = tokenize_unit(config, unit, modules)
      tokens += summary["tokens"]
      say(f"famjax.data: {unit.task} file {unit.index + 1}/{unit.count}: {summary['examples']} examples "
          f"({i + 1}/{len(units)}, {tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s)")
    return
  run_beam(config, units, workers=max(workers, 1), beam_options=beam_options, modules=modules)


def beam_pipeline_options(workers: int, beam_options: Optional[Sequence[str]] = None) -> list[str]:
  """Beam's options: the given ones (a cluster runner), else the DirectRunner with `workers` worker
  processes (one: in this process)."""
  if beam_options is not None:
    return list(beam_options)
  mode = "multi_processing" if workers > 1 else "in_memory"
  return ["--runner=DirectRunner", f"--direct_num_workers={workers}", f"--direct_running_mode={mode}",
          "--default_sdk_harness_log_level=WARNING"]


def run_beam(config: DataConfig, units: Sequence[Unit], *, workers: int = 1,
             beam_options: Optional[Sequence[str]] = None, modules: Sequence[str] = ()) -> None:
  """One Beam pipeline: the units, spread over the workers (Reshuffle), each tokenized by a worker."""
  import logging  # pylint: disable=import-outside-toplevel
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel
  # The workers' start-up chatter, and their errors' tracebacks: the error is raised here, rephrased.
  logging.getLogger("apache_beam").setLevel(logging.CRITICAL)
  options = PipelineOptions(beam_pipeline_options(workers, beam_options))
  # Largest first, so the long units start early. The elements and the function are plain (dicts, a
  # function pickled by value): a worker imports famjax.data when its first unit runs, not while it
  # unpickles them (the DirectRunner's workers then start one after the other).
  ordered = sorted(units, key=lambda u: (-(u.stop - u.start) if u.start >= 0 else 0, u.task, u.index))
  work = _in_worker(json.loads(json.dumps(vars(config))), tuple(modules))
  try:
    with beam.Pipeline(options=options) as pipeline:
      _ = (pipeline
           | "units" >> beam.Create([dataclasses.asdict(u) for u in ordered], reshuffle=False)
           | "spread" >> beam.Reshuffle()
           | "tokenize" >> beam.Map(work))
  except (StoreWriteError, FileNotFoundError, ValueError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (a worker's error comes back as text)
    raise _worker_error(e) from None


def _in_worker(config_fields: dict[str, Any], modules: tuple[str, ...]) -> Callable[[dict], int]:
  """What a Beam worker runs for a unit: tokenize_unit, with famjax.data imported when it runs."""

  def tokenize_in_worker(unit_fields: dict[str, Any]) -> int:
    from famjax.data import config as config_lib  # pylint: disable=import-outside-toplevel
    from famjax.data import tokenize as tokenize_lib  # pylint: disable=import-outside-toplevel
    unit = tokenize_lib.Unit(**unit_fields)
    return tokenize_lib.tokenize_unit(config_lib.DataConfig(**config_fields), unit, modules,
                                      threads=1)["tokens"]

  return tokenize_in_worker


def _worker_error(error: Exception) -> Exception:
  """A Beam worker's error as the error famjax raised there (its first famjax.data line), if any."""
  text = str(error).replace("\\n", "\n")
  kinds = r"(StoreWriteError|FileNotFoundError|ValueError|RuntimeError|OSError)"
  match = (re.search(kinds + r": (?:\[Errno \d+\] )?(famjax\.data: [^\n]*)", text)  # a traceback's last line
           or re.search(r"()(famjax\.data: [^\n]*)", text))  # the message alone
  if match is None:
    return RuntimeError(f"famjax.data: the Beam pipeline failed: {text.splitlines()[0] if text else error!r}")
  kind = match.group(1) or type(error).__name__
  message = re.sub(r"\s*\[while running '[^']*'\]", "", match.group(2)).rstrip("'\" ")
  if kind == "StoreWriteError":
    return StoreWriteError(28 if "No space left" in message else 5, message)
  return {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(kind, RuntimeError)(message)


def publish(config: DataConfig, request: Request, build: str, units: Sequence[Unit],
            say: Callable[[str], None] = print) -> int:
  """Publishes a build whose units are all done: their lengths in one file, then the manifest (last).
  Returns the units published."""
  build_dir = fs.join(request.directory, build)
  summaries = []
  for unit in units:
    summary = ex.summary_of(build_dir, unit.index)
    if summary is None:
      raise RuntimeError(f"famjax.data: {request.task}: unit {unit.index} ({unit.name}) has no finished "
                         f"file in {build_dir}; rerun to finish the build")
    summaries.append(summary)
  tables = []
  for summary in summaries:
    raw = fs.read_bytes(fs.join(build_dir, summary["lengths"]))
    if hashlib.sha256(raw).hexdigest() != summary["lengths_sha256"]:
      raise RuntimeError(f"famjax.data: {fs.join(build_dir, summary['lengths'])} does not match its "
                         "summary; rerun with --rebuild")
    tables.append(np.load(io.BytesIO(raw), allow_pickle=False))
  lengths = np.concatenate(tables) if tables else np.zeros((0, 2), np.int32)
  n = len(units)
  buffer = io.BytesIO()
  np.save(buffer, lengths, allow_pickle=False)
  lengths_path = fs.join(build_dir, ex.lengths_name(n))
  with fs.write_errors(lengths_path):
    fs.write_atomic(lengths_path, buffer.getvalue())
  stats: dict[str, dict[str, int]] = {}
  for summary in summaries:
    for source, counts in summary["stats"].items():
      for kind, value in counts.items():
        stats.setdefault(source, {})
        stats[source][kind] = stats[source].get(kind, 0) + value
  examples, tokens = int(len(lengths)), int(lengths[:, 0].sum()) if len(lengths) else 0
  if not examples:
    raise ValueError(f"famjax.data: task {request.task!r} yielded no example to train on "
                     f"({stats.get(request.task) or 'no records'}); check its source")
  endless = units[0].start >= 0
  manifest = {
      "format": ex.FORMAT, "format_version": ex.FORMAT_VERSION, "task": request.task,
      "fingerprint": request.fingerprint, "identity": identity(config, request.task), "build": build,
      "endless": endless, "dtype": ex.token_dtype(get_vocabulary(config).vocab_size).str,
      "units": [{k: s[k] for k in ("unit", "name", "file", "examples", "tokens", "bytes", "sha256",
                                   "examples_sha256")} for s in summaries],
      "examples": examples, "tokens": tokens, "bytes": int(sum(s["bytes"] for s in summaries)),
      "lengths": {"file": ex.lengths_name(n), "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()},
      "content": None if endless else ex.content_id([s["examples_sha256"] for s in summaries]),
      "stats": stats, "published": _now()}
  manifest_path = fs.join(build_dir, ex.manifest_name(n))
  with fs.write_errors(manifest_path):
    fs.write_json(manifest_path, manifest)
  say(f"famjax.data: {request.task}: {examples:,} examples, {tokens:,} tokens in {n} file(s), "
      f"{manifest['bytes'] / max(tokens, 1):.2f} bytes/token (build {build})")
  return n
