"""A training config's data store: its tasks' examples, tokenized once, and the packing plan over them;
opened as TrainingRows, which any number of hosts read by index.

    rows = open_or_build(config, rows=steps * global_batch)   # tokenizes / plans what is missing
    rows.read(np.arange(0, 8))                                # plan rows 0-7 as a batch dict

The store lives under a root: DataConfig.store (a local directory or a URI such as gs://bucket/stores),
else $FAMJAX_DATA_STORES, else ~/.cache/famjax/stores:

  examples/<task>-<fingerprint>/   one task's tokenized examples (famjax.data.examples), keyed by what
                                   they depend on (source, text format, vocabulary, seed of generated
                                   tasks): shared by every config that reads the task, whatever its rates,
                                   packing or loss weights
  plans/<mixture>-<seq_len>-<fp>/  the packing plan (famjax.data.plan_store), keyed by the packing and
                                   mixing fields, the seed and the tasks' examples: changing a packing or
                                   weighting field builds a new plan in seconds, never the tokenization

open_or_build tokenizes what is missing (famjax.data.tokenize: in this process, or with Apache Beam
through famjax.data.prepare), extends an endless task's examples when the plan needs more, and computes
the plan for the rows asked (a longer one when a run reads further). Every piece is written to its own
new file and published by a manifest written last; nothing published is rewritten. Processes sharing a
disk take turns on locks (one builds, the others wait and read).

What the rows are is `rows_config`: the DataConfig fields that decide them (not where the store is,
how far ahead it is read, the TFDS directory, nor the stream's shuffle buffer), the seqio mixture, its
tasks' rates, example stores and (for files) the content of their examples, the vocabulary and the code
versions. Its hash is the fingerprint a checkpoint's data position carries.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from famjax.data import examples as examples_lib
from famjax.data import fs
from famjax.data import plan as plan_lib
from famjax.data import plan_store
from famjax.data import rows as rows_lib
from famjax.data import tasks as tasks_lib
from famjax.data import tokenize
from famjax.data.config import STREAM, DataConfig
from famjax.data.errors import (StoreChangedError, StoreCorruptError, StoreMismatchError,
                                StoreNotFoundError, StoreWriteError)
from famjax.data.global_batches import EPOCHS, PREFIX, differing_fields
from famjax.data.vocab import get_vocabulary

__all__ = ["StoreChangedError", "StoreCorruptError", "StoreMismatchError", "StoreNotFoundError",
           "StoreWriteError", "TrainingRows", "open_or_build", "rows_config", "continue_from_row_store"]

STORES_ENV = "FAMJAX_DATA_STORES"
# Bump when famjax.data.rows changes how rows are made of their pieces (weights, the repeated segment).
READ_VERSION = 1
# DataConfig fields that do not change the training rows: where the store is, how far ahead it is read,
# where TFDS data is, and the stream's shuffle buffer (a plan reads each pass in a full permutation).
_NOT_ROWS = ("prefetch", "store", "tfds_data_dir", "shuffle_buffer")


def root_of(config: DataConfig) -> str:
  """The store's root: DataConfig.store, else $FAMJAX_DATA_STORES, else ~/.cache/famjax/stores."""
  if config.store == STREAM:
    raise ValueError("DataConfig.store: 'stream' reads no store")
  if config.store:
    return config.store if not fs.is_local(config.store) else os.path.expanduser(config.store)
  return os.environ.get(STORES_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "famjax", "stores")


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _hash(value: Any) -> str:
  import hashlib  # pylint: disable=import-outside-toplevel
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def config_fields(config: DataConfig) -> dict[str, Any]:
  """The DataConfig fields that decide the rows, as JSON reads them back."""
  return json.loads(json.dumps({k: v for k, v in vars(config).items() if k not in _NOT_ROWS}))


def packing_fields(config: DataConfig) -> plan_lib.PackingFields:
  marker = get_vocabulary(config).encode(config.repeat_segment_marker) if config.repeat_segment_len else []
  return plan_lib.PackingFields(config.seq_len, config.pack, config.pack_align, config.repeat_segment_len,
                                len(marker), config.mask_between_examples, config.too_long)


def rows_config(config: DataConfig, tasks: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """What decides the rows (see the module docstring); `tasks`: the plan manifest's task entries."""
  return {**config_fields(config), "seqio_mixture": tasks_lib.ensure_registered(config),
          "order": EPOCHS if config.store_rows else PREFIX,
          "examples": {t["task"]: {"rate": t["rate"], "store": t["fingerprint"], "content": t["content"]}
                       for t in tasks},
          "vocabulary_sha1": tokenize.vocabulary_hash(config),
          "vocab_size": get_vocabulary(config).vocab_size,
          "versions": {"tokenize": tokenize.TOKENIZE_VERSION, "plan": plan_lib.PLAN_VERSION,
                       "read": READ_VERSION}}


def fingerprint(rows_cfg: dict[str, Any]) -> str:
  return _hash(rows_cfg)


# -- opening ---------------------------------------------------------------------------------------------

class TrainingRows:
  """A config's training rows: a packing plan version over its tasks' examples, opened for reading.
  `read(plan_rows)` gives a batch dict; `len()` is the number of rows training reads before it repeats
  them (EPOCHS) or runs out (PREFIX)."""

  def __init__(self, root: str, plan_directory: str, config: DataConfig,
               max_open_files: int = examples_lib.MAX_OPEN_FILES):
    """Opens the plan at `plan_directory` (a version directory) and the examples it reads under `root`
    for `config`; a plan of another config is refused, naming the field."""
    self.root, self.directory = root, plan_directory
    self.plan = plan_store.PackingPlan(plan_directory)
    manifest = self.plan.manifest
    _, rates, requests = _requests(config, root)
    expected = {"packing": vars(packing_fields(config)), "seed": config.seed,
                "tasks": {r.task: {"rate": rate, "store": r.fingerprint}
                          for r, (_, rate) in zip(requests, rates)}}
    saved = {"packing": manifest["packing"], "seed": manifest["seed"],
             "tasks": {t["task"]: {"rate": t["rate"], "store": t["fingerprint"]} for t in manifest["tasks"]}}
    diff = differing_fields(saved, json.loads(json.dumps(expected)))
    if diff:
      raise StoreMismatchError(
          f"famjax.data: the packing plan at {plan_directory} was built for another data config: "
          f"{'; '.join(diff)} (there = the plan, here = this run); open_or_build(config) finds or builds "
          "the plan of this config")
    self.config: dict[str, Any] = rows_config(config, manifest["tasks"])
    self.fingerprint: str = fingerprint(self.config)
    self.order: str = self.config["order"]
    self.num_rows = config.store_rows or len(self.plan)
    if self.num_rows > len(self.plan):
      raise StoreCorruptError(f"famjax.data: the plan at {plan_directory} has {len(self.plan)} rows, "
                              f"store_rows asks for {self.num_rows}")
    self.pool = examples_lib.ReaderPool(max_open_files)
    self.stores = [examples_lib.ExampleStore(fs.join(root, t["directory"]), t["build"], t["units"],
                                             self.pool, t["fingerprint"]) for t in manifest["tasks"]]
    marker = get_vocabulary(config).encode(config.repeat_segment_marker) if config.repeat_segment_len else []
    self.format = rows_lib.RowFormat(config.seq_len, config.pack_align, config.instruction_weight,
                                     config.repeat_segment_len, config.repeat_segment_weight, tuple(marker),
                                     config.mask_between_examples)

  def __len__(self) -> int:
    return self.num_rows

  @property
  def manifest(self) -> dict[str, Any]:
    return self.plan.manifest

  def read(self, plan_rows: np.ndarray) -> dict[str, np.ndarray]:
    """The batch dict ([len(plan_rows), seq_len] inputs, targets, weights, segment_ids) of plan rows."""
    self.check_alive()
    pieces = self.plan.pieces(plan_rows)
    tokens: list = [None] * len(pieces["task"])
    prompts = np.empty(len(tokens), np.int64)
    for t in np.unique(pieces["task"]):
      where = np.flatnonzero(pieces["task"] == t)
      for i, (ids, n_prompt) in zip(where, self.stores[t].read(pieces["example"][where])):
        offset, length = pieces["offset"][i], pieces["length"][i]
        tokens[i] = ids if length < 0 else ids[offset:offset + length]
        prompts[i] = n_prompt
    return rows_lib.assemble(tokens, prompts, pieces["offset"], pieces["row"], pieces["repeat"], self.format)

  def check_alive(self) -> None:
    """StoreChangedError if the plan or an example store was deleted or replaced since it was opened."""
    self.plan.check_alive()
    for store in self.stores:
      store.check_alive()

  def stats(self) -> dict[str, Any]:
    """Where the rows are and how they were made: the plan's counters, the tokenization's per source."""
    sources: dict[str, dict[str, int]] = {}
    for store in self.stores:
      for source, counts in store.manifest["stats"].items():
        sources.setdefault(source, {}).update(counts)
    for task, counts in self.manifest["stats"]["tasks"].items():
      sources.setdefault(task, {})
      for kind in ("truncated", "skipped_too_long"):
        if counts[kind]:
          sources[task][kind] = counts[kind]
    return {"store": self.directory, "plan_rows": len(self.plan), "store_rows": self.num_rows,
            "examples": {s.task: {"examples": s.num_examples, "tokens": s.manifest["tokens"],
                                  "files": len(s.units), "bytes": s.manifest["bytes"], "build": s.build}
                         for s in self.stores},
            "sources": sources, "packing": self.manifest["stats"]["packing"]}

  def verify(self, say: Callable[[str], None] = lambda _: None) -> None:
    """Checks every file of the plan and of the examples it reads against its sha256."""
    self.plan.verify(say)
    for store in self.stores:
      store.verify(say)

  def close(self) -> None:
    self.pool.close()


# -- building --------------------------------------------------------------------------------------------

def _requests(config: DataConfig, root: str) -> tuple[str, list[tuple[str, float]], list[tokenize.Request]]:
  mixture = tasks_lib.ensure_registered(config)
  rates = tasks_lib.rates_of(mixture)
  requests = []
  for task, _ in rates:
    fp = tokenize.fingerprint(tokenize.identity(config, task))
    requests.append(tokenize.Request(task, fs.join(root, "examples", f"{_safe(task)}-{fp}"), fp))
  return mixture, rates, requests


def open_or_build(config: DataConfig, rows: int = 0, *, say: Callable[[str], None] = print,
                  workers: int = 0, beam_options: Optional[Sequence[str]] = None, rebuild: bool = False,
                  modules: Sequence[str] = (), max_open_files: int = examples_lib.MAX_OPEN_FILES
                  ) -> TrainingRows:
  """The config's training rows (see the module docstring), built first where missing.

  rows: the rows a run reads (steps x global batch); DataConfig.store_rows, when set, instead.
  workers, beam_options: how to tokenize what is missing (0 and None: in this process; else Apache
    Beam, famjax.data.tokenize.run_beam). rebuild: tokenize again (after changing source files).
  modules: modules that register seqio tasks of other code (imported by every Beam worker).
  """
  root = root_of(config)
  need = config.store_rows or rows
  if need < 1:
    raise ValueError("famjax.data: open_or_build needs the rows a run reads (rows=steps x batch_size) or "
                     "DataConfig.store_rows")
  mixture, rates, requests = _requests(config, root)
  built = tokenize.ensure(config, requests, rebuild=rebuild, workers=workers, beam_options=beam_options,
                          modules=modules, say=say)
  fields = packing_fields(config)
  while True:
    tasks = [_task_entry(root, r, rate, built[r.task]) for r, (_, rate) in zip(requests, rates)]
    plan_key = {"fields": vars(fields), "seed": config.seed, "version": plan_lib.PLAN_VERSION,
                "tasks": [{k: t[k] for k in ("task", "rate", "fingerprint", "content", "endless")}
                          for t in tasks]}
    plan_dir = fs.join(root, "plans", f"{_safe(mixture)}-{config.seq_len}-{_hash(plan_key)}")
    builds = [t["build"] for t in tasks]
    # A published plan is immutable (its manifest is written last): opened without the lock, so that the
    # processes of a job that finds it do not queue behind each other (or say they wait for a build).
    version = plan_store.open_version(plan_dir, need, exact=False, builds=builds)
    if version is not None:
      return TrainingRows(root, version.directory, config, max_open_files)
    with fs.lock(plan_dir, say, "the packing plan"):
      try:
        version = plan_store.open_version(plan_dir, need, exact=False, builds=builds)
        directory = version.directory if version is not None else _plan(
            config, plan_dir, tasks, fields, need, builds, say)
        return TrainingRows(root, directory, config, max_open_files)
      except plan_lib.NeedMoreExamples as e:
        needed = e.needed
    for r in requests:
      if r.task in needed:
        r.examples = max(r.examples, needed[r.task])
    say(f"famjax.data: the plan needs more generated examples: "
        f"{', '.join(f'{t}: {n:,}' for t, n in needed.items())}")
    built = tokenize.ensure(config, requests, workers=workers, beam_options=beam_options, modules=modules,
                            say=say)


def _task_entry(root: str, request: tokenize.Request, rate: float, built: tuple[str, int]) -> dict[str, Any]:
  build, units = built
  store = examples_lib.ExampleStore(request.directory, build, units, fingerprint=request.fingerprint)
  return {"task": request.task, "rate": rate, "fingerprint": request.fingerprint, "build": build,
          "units": units, "content": store.content, "endless": store.endless,
          "directory": os.path.relpath(request.directory, root) if fs.is_local(root)
          else request.directory[len(root):].strip("/"), "store": store}


def _plan(config: DataConfig, plan_dir: str, tasks: list[dict[str, Any]],
          fields: plan_lib.PackingFields, rows: int, builds: list[str], say: Callable[[str], None]) -> str:
  """Computes and publishes the plan of `rows` rows; returns its version directory."""
  t0 = time.perf_counter()
  for name in fs.listdir(plan_dir):  # left by a plan that was killed (we hold the lock)
    if name.startswith(".staging-"):
      fs.remove(fs.join(plan_dir, name))
  inputs = []
  for t in tasks:
    lengths = t["store"].lengths()
    inputs.append(plan_lib.TaskLengths(t["task"], lengths[:, 0], lengths[:, 1], t["rate"], t["endless"]))
  writer = plan_store.PlanWriter(plan_lib.piece_dtypes(len(inputs), max(len(i) for i in inputs)), plan_dir)
  try:
    stats = plan_lib.build(inputs, fields, config.seed, rows, writer)
    files = writer.finish(stats["pieces"])
    entries = [{k: v for k, v in t.items() if k != "store"} for t in tasks]
    manifest = {"format": plan_store.FORMAT, "format_version": plan_store.FORMAT_VERSION,
                "rows": rows, "pieces": stats["pieces"], "seq_len": config.seq_len, "seed": config.seed,
                "packing": vars(fields), "tasks": entries, "files": files,
                "stats": {"tasks": stats["tasks"], "packing": stats["packing"]},
                "seconds": round(time.perf_counter() - t0, 3)}
    directory = writer.publish(plan_dir, plan_store.version_name(rows, builds), manifest)
  except BaseException:
    writer.discard()
    raise
  packing = stats["packing"]
  say(f"famjax.data: packing plan ready: {rows:,} rows of {config.seq_len} tokens, {stats['pieces']:,} "
      f"pieces, fill {packing['fill']:.2f}, {time.perf_counter() - t0:.1f} s ({directory})")
  return directory


# -- positions of earlier layouts -----------------------------------------------------------------------

def continue_from_row_store(state: dict[str, Any], rows: TrainingRows) -> tuple[dict[str, Any], str]:
  """A checkpoint position in the earlier .npy row store (version 2) as a position in `rows`: the same
  global row count, if the config that saved it decides rows the same way (else StoreMismatchError
  naming the field). Returns (the position, a note to print: the rows that follow are this plan's, not
  the ones the row store held)."""
  saved = state.get("config") or {}
  current = {k: rows.config[k] for k in rows.config if k in saved and k in config_fields_names()}
  diff = differing_fields({k: saved[k] for k in current}, current)
  if diff:
    raise StoreMismatchError(f"the data position was saved (by a run reading a row store) with another "
                             f"data config: {'; '.join(diff)} (there = the state, here = this run)")
  count = state.get("rows")
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise ValueError(f"data state: rows must be an int >= 0, got {count!r}")
  note = (f"data: the checkpoint holds a position in the earlier row store (row {count:,}); this famjax "
          "reads a packing plan over tokenized examples instead, and continues at the same row of it: "
          "the same data config and mixture, not the rows the row store held after that position")
  return {"version": 3, "rows": count, "fingerprint": rows.fingerprint, "order": rows.order,
          "config": rows.config}, note


def config_fields_names() -> set[str]:
  import dataclasses  # pylint: disable=import-outside-toplevel
  return {f.name for f in dataclasses.fields(DataConfig)} - set(_NOT_ROWS)
