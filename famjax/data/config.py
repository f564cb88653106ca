"""DataConfig: the one validated description of what the input pipeline feeds the trainer.

Validation happens on construction, so a bad value fails before any data is read, with a `ValueError`
that names the field. Defaults follow the paper's fine-tuning recipe (spec §7): packing to 8.5k tokens
without masks between packed examples, answers weighted 1 and instructions 0, and a 256-token repeated
segment weighted 0.1. This module imports no TensorFlow, so a launcher can build configs without it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

BYTE_VOCABULARY = "byte"
STREAM = "stream"  # DataConfig.store: no store, the per-host stream
TOO_LONG_POLICIES = ("truncate", "skip")
_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_SEQIO_NAME = re.compile(r"^[\w\d\.\:_#]+$")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read, how to tokenize it, and how to pack it into fixed-length rows.

  Attributes:
    mixture: a seqio Mixture or Task name: a built-in one (see famjax.data.mixture_names()), or, when
      `sources` is given, the name under which those sources are registered as a Mixture.
    vocabulary: "byte" (seqio.ByteVocabulary: nothing to download) or the path of a SentencePiece
      .model (the paper's 256k one or any other).
    seq_len: length of every row handed to the trainer (8704 = 8.5k, the paper's packing length).
    pack: put several examples in one row (greedily, in stream order); False gives one example per row.
    mask_between_examples: tell the trainer to mask attention at example boundaries. The paper does not
      (False). With FAM every example then starts from the initial FAM (famjax.model.fam.fam_restarts):
      set `pack_align` to the block size so that this is exact. With True the repeated segment is copied from the row's last example only, because only
      that example is visible to it.
    pack_align: every packed example starts at a multiple of this many tokens (1: right after the
      previous one); the gap is padding.
    repeat_segment_len: tokens of the "[repeat random segment]:" augmentation appended to each training
      row (spec §7); 0 turns it off. Only the "train" split gets it.
    repeat_segment_weight: loss weight of the repeated tokens (0.1 in the paper).
    repeat_segment_marker: the text placed before the repeated tokens (loss weight 0).
    instruction_weight: loss weight of instructions and few-shot exemplars: 0 in the paper; a small
      value gives a tiny demo model more signal per row.
    sources: user data as (task_name, path, rate) triples, each registered as a seqio Task
      `<mixture>_<task_name>` and mixed with the given rates. `path` is a JSONL file, a TFRecord file of
      tf.train.Example, a glob of either, or a TFDS data directory (one with dataset_info.json).
    inputs_key, targets_key: the field names of the instruction and the answer in `sources` records.
    few_shot: exemplars (earlier records of the same source and shard) placed before each instruction;
      0 is zero-shot.
    prompt_template: how an instruction becomes a prompt; must contain "{inputs}". An exemplar is the
      template filled with its instruction followed by its answer.
    exemplar_separator: text between few-shot exemplars and before the final prompt.
    too_long: "truncate" (keep the end of the prompt and the start of the answer) or "skip" an example
      longer than what a row can hold; either way it is counted in BatchIterator.stats().
    seed: seeds generation, shuffling, mixing and the repeated segment; same seed, same batches.
    shuffle_buffer: examples in each task's shuffle buffer for the train split of file sources, in the
      stream (store="stream"); a store's plan reads every pass in a full permutation instead.
    tfds_data_dir: where prepared TFDS datasets live; "" means $TFDS_DATA_DIR or ~/tensorflow_datasets.
    prefetch: batches read ahead (the store: by as many Grain threads; the stream: by a background
      thread); 0 reads them on the caller's thread.
    store: where the data store lives (famjax.data.store; docs/data.md: the tasks' examples tokenized
      once, and the packing plans over them): "" = $FAMJAX_DATA_STORES, else ~/.cache/famjax/stores; a
      directory or a URI (gs://bucket/stores); or "stream" for no store (each host streams its own shard
      and a restore replays; resumes only on the same process layout). Where the rows are, not what
      they are: it is not part of the fingerprint.
    store_rows: 0 (default): training reads the plan's rows in order, each once (the plan covers the
      rows the run reads: a finite mixture cycles through its tasks' examples, pass after pass, at their
      rates; an endless one's rows are all new). n > 0: only the plan's first n rows, read in epochs (a
      new order each epoch).
  """

  mixture: str = "famjax_demo"
  vocabulary: str = BYTE_VOCABULARY
  seq_len: int = 8704
  pack: bool = True
  mask_between_examples: bool = False
  pack_align: int = 1
  repeat_segment_len: int = 256
  repeat_segment_weight: float = 0.1
  repeat_segment_marker: str = "[repeat random segment]:"
  instruction_weight: float = 0.0
  sources: tuple[tuple[str, str, float], ...] = ()
  inputs_key: str = "inputs"
  targets_key: str = "targets"
  few_shot: int = 0
  prompt_template: str = "{inputs}\n"
  exemplar_separator: str = "\n\n"
  too_long: str = "truncate"
  seed: int = 0
  shuffle_buffer: int = 1000
  tfds_data_dir: str = ""
  prefetch: int = 2
  store: str = ""
  store_rows: int = 0

  def __post_init__(self):
    _check_str(self, "mixture", pattern=_SEQIO_NAME)
    _check_str(self, "vocabulary")
    _check_int(self, "seq_len", low=16)
    _check_bool(self, "pack")
    _check_bool(self, "mask_between_examples")
    _check_int(self, "pack_align", low=1)
    if self.seq_len % self.pack_align:
      _fail("pack_align", f"{self.pack_align} must divide seq_len={self.seq_len}")
    _check_int(self, "repeat_segment_len", low=0)
    _check_float(self, "repeat_segment_weight", low=0.0)
    _check_str(self, "repeat_segment_marker", allow_empty=True)
    _check_float(self, "instruction_weight", low=0.0)
    _check_str(self, "inputs_key")
    _check_str(self, "targets_key")
    _check_int(self, "few_shot", low=0)
    _check_str(self, "prompt_template")
    _check_str(self, "exemplar_separator", allow_empty=True)
    _check_int(self, "seed", low=0)
    _check_int(self, "shuffle_buffer", low=1)
    _check_str(self, "tfds_data_dir", allow_empty=True)
    _check_int(self, "prefetch", low=0)
    _check_str(self, "store", allow_empty=True)
    _check_int(self, "store_rows", low=0)
    if self.too_long not in TOO_LONG_POLICIES:
      _fail("too_long", f"must be one of {TOO_LONG_POLICIES}, got {self.too_long!r}")
    if "{inputs}" not in self.prompt_template:
      _fail("prompt_template", f'must contain "{{inputs}}", got {self.prompt_template!r}')
    if self.repeat_segment_len:
      # Byte length of the marker bounds its token length in any vocabulary.
      overhead = self.repeat_segment_len + len(self.repeat_segment_marker.encode("utf-8"))
      if overhead > self.seq_len // 2:
        _fail("repeat_segment_len", f"{self.repeat_segment_len} plus the marker ({overhead} tokens at "
              f"most) must fit in half a row (seq_len // 2 = {self.seq_len // 2}); lower it or set 0")
    object.__setattr__(self, "sources", _normalise_sources(self.sources))

  def replace(self, **changes: Any) -> DataConfig:
    return dataclasses.replace(self, **changes)


def _fail(field: str, message: str):
  raise ValueError(f"DataConfig.{field}: {message}")


def _check_str(cfg, field, *, allow_empty=False, pattern=None):
  value = getattr(cfg, field)
  if not isinstance(value, str) or (not value and not allow_empty):
    _fail(field, f"must be a{'' if allow_empty else ' non-empty'} string, got {value!r}")
  if pattern is not None and not pattern.match(value):
    _fail(field, f"{value!r} must match {pattern.pattern}")


def _check_int(cfg, field, *, low):
  value = getattr(cfg, field)
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    _fail(field, f"must be an int >= {low}, got {value!r}")


def _check_float(cfg, field, *, low):
  value = getattr(cfg, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
      or value < low:
    _fail(field, f"must be a finite number >= {low}, got {value!r}")


def _check_bool(cfg, field):
  if not isinstance(getattr(cfg, field), bool):
    _fail(field, f"must be a bool, got {getattr(cfg, field)!r}")


def _normalise_sources(sources) -> tuple[tuple[str, str, float], ...]:
  """Lists (from ml-collections or JSON) become tuples; every triple is checked."""
  if isinstance(sources, (str, bytes)) or not isinstance(sources, (list, tuple)):
    _fail("sources", f"must be a sequence of (task_name, path, rate), got {sources!r}")
  out, seen = [], set()
  for i, item in enumerate(sources):
    if not isinstance(item, (list, tuple)) or len(item) != 3:
      _fail("sources", f"entry {i} must be (task_name, path, rate), got {item!r}")
    name, path, rate = item
    if not isinstance(name, str) or not _NAME.match(name):
      _fail("sources", f"entry {i}: task_name must match {_NAME.pattern}, got {name!r}")
    if name in seen:
      _fail("sources", f"entry {i}: task_name {name!r} appears twice")
    if not isinstance(path, str) or not path:
      _fail("sources", f"entry {i} ({name}): path must be a non-empty string, got {path!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) \
        or rate <= 0:
      _fail("sources", f"entry {i} ({name}): rate must be a finite number > 0, got {rate!r}")
    seen.add(name)
    out.append((name, path, float(rate)))
  return tuple(out)
