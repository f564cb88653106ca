"""User instruction data (Flan-style): JSONL, TFRecord or a TFDS data directory, with inputs/targets.

The paper fine-tunes on Flan (spec §7); famjax downloads nothing, so users bring an export of it (or
any instruction data) and list it in DataConfig.sources. Each source becomes a seqio Task whose
examples are read here, in Python, because that is where bad records can be told apart and counted:

- non_utf8: a line or field that is not UTF-8;   bad_json / bad_record: an unparsable line or record;
- missing_field: the inputs or targets field is absent, null, or not text;   empty_field: it is blank.
Bad records are skipped and counted under skipped_<kind> in BatchIterator.stats(); examples too long
for a row are counted by the packer. A source with no valid record in a host's shard is an error that
names it (checked before training starts), never a silent empty stream.

Records are sharded by their index in the source (all records, good or bad, in file order), so hosts
read disjoint shards that together are the whole source. Few-shot exemplars are the previous valid
records of the same shard; they are part of the prompt (loss weight 0 under the paper's recipe).

Tokenized once (famjax.data.tokenize), a source is read in units, one output file each: consecutive
input files grouped to at least UNIT_BYTES (a large file is a unit of its own), or one shard of a TFDS
split. Few-shot exemplars then come from the same unit.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import struct
from typing import Iterator, Optional, Union

from famjax.data.config import DataConfig
from famjax.data.stats import SourceStats
from famjax.data.tensorflow_setup import tf, tfds

UNIT_BYTES = 64 << 20  # input bytes per tokenization unit (consecutive files grouped up to this)

Record = Union[bytes, dict]  # a JSONL line or a serialized tf.train.Example, or a TFDS example
Parsed = Union[tuple[str, str], str]  # (inputs, targets), or the kind of a bad record


@dataclasses.dataclass(frozen=True)
class FlanFormat:
  """How records are read and turned into prompts (the DataConfig fields of the same names)."""

  inputs_key: str = "inputs"
  targets_key: str = "targets"
  few_shot: int = 0
  prompt_template: str = "{inputs}\n"
  exemplar_separator: str = "\n\n"

  @classmethod
  def from_config(cls, config: DataConfig) -> FlanFormat:
    return cls(config.inputs_key, config.targets_key, config.few_shot, config.prompt_template,
               config.exemplar_separator)


def format_example(record: tuple[str, str], exemplars: list[tuple[str, str]], fmt: FlanFormat
                   ) -> tuple[str, str]:
  """(prompt, answer): the exemplars (each prompt + answer), then the record's prompt."""
  prompt = lambda text: fmt.prompt_template.replace("{inputs}", text)  # noqa: E731  (no brace parsing)
  parts = [prompt(x) + y for x, y in exemplars] + [prompt(record[0])]
  return fmt.exemplar_separator.join(parts), record[1]


# -- reading ----------------------------------------------------------------------------------------

def source_format(path: str) -> str:
  """"tfds" for a directory (the one holding dataset_info.json), "tfrecord" if the file name says so,
  else "jsonl"."""
  if tf.io.gfile.isdir(path):
    return "tfds"
  return "tfrecord" if "tfrecord" in os.path.basename(path) else "jsonl"


def source_files(path: str) -> list[str]:
  if source_format(path) == "tfds":
    return [path]
  return sorted(tf.io.gfile.glob(path))


def records(path: str, split: str) -> Iterator[Record]:
  """Every record of a source in order (bad ones included, blank JSONL lines not)."""
  kind = source_format(path)
  if kind == "tfds":
    yield from _tfds_records(path, split)
    return
  for file in source_files(path):
    yield from _file_records(file, kind)


def _tfds_records(path: str, split: str) -> Iterator[Record]:
  builder = tfds.builder_from_directory(path)
  yield from tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))


def _file_records(file: str, kind: str) -> Iterator[Record]:
  if kind == "tfrecord":
    yield from _tfrecords(file)
    return
  with tf.io.gfile.GFile(file, "rb") as f:
    for line in f:
      if line.strip():
        yield line


def file_groups(files: list[str]) -> list[list[str]]:
  """Consecutive files grouped until a group holds UNIT_BYTES of input (tokenization units)."""
  groups, current, held = [], [], 0
  for file in files:
    current.append(file)
    held += tf.io.gfile.stat(file).length
    if held >= UNIT_BYTES:
      groups.append(current)
      current, held = [], 0
  if current:
    groups.append(current)
  return groups


def unit_names(path: str):
  """famjax.data.sources.UnitNamesFn of a source: its file groups (each named by the JSON list of its
  files, so a worker reads exactly the files the driver grouped), or its TFDS split's shards."""

  def names(split: str) -> list[str]:
    if source_format(path) == "tfds":
      shards = tfds.builder_from_directory(path).info.splits[split].num_shards
      return [f"{split}[{k}shard:{k + 1}shard]" for k in range(shards)]
    return [json.dumps(group) for group in file_groups(source_files(path))]

  return names


def _unit_records(path: str, unit: str) -> Iterator[Record]:
  kind = source_format(path)
  if kind == "tfds":
    yield from _tfds_records(path, unit)
    return
  for file in json.loads(unit):
    yield from _file_records(file, kind)


def _tfrecords(file: str) -> Iterator[bytes]:
  """The records of a TFRecord file (length, length CRC, data, data CRC; CRCs are not checked).
  A truncated tail ends the file and yields b"" (a bad record)."""
  with tf.io.gfile.GFile(file, "rb") as f:
    while True:
      header = f.read(12)
      if not header:
        return
      if len(header) < 12:
        yield b""
        return
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        yield b""
        return
      yield data


def parse(record: Record, fmt: FlanFormat, kind: str) -> Parsed:
  """(inputs, targets) of a record of a source of format `kind`, or why it is bad."""
  if kind == "tfds":
    fields = record
  elif kind == "tfrecord":
    fields = _example_fields(record, fmt)
    if fields is None:
      return "bad_record"
  else:
    try:
      text = record.decode("utf-8")
    except UnicodeDecodeError:
      return "non_utf8"
    try:
      fields = json.loads(text)
    except json.JSONDecodeError:
      return "bad_json"
    if not isinstance(fields, dict):
      return "bad_json"
  values = []
  for key in (fmt.inputs_key, fmt.targets_key):
    value = fields.get(key)
    if isinstance(value, bytes):
      try:
        value = value.decode("utf-8")
      except UnicodeDecodeError:
        return "non_utf8"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      value = str(value)
    if not isinstance(value, str):
      return "missing_field"
    if not value.strip():
      return "empty_field"
    values.append(value)
  return values[0], values[1]


def _example_fields(record: bytes, fmt: FlanFormat) -> Optional[dict]:
  """The text fields of a serialized tf.train.Example, or None if it does not parse as one."""
  if not record:
    return None
  try:
    example = tf.train.Example.FromString(record)
  except Exception:  # pylint: disable=broad-except  (protobuf raises DecodeError or others)
    return None
  out = {}
  for key in (fmt.inputs_key, fmt.targets_key):
    feature = example.features.feature.get(key)
    if feature is not None and feature.bytes_list.value:
      out[key] = feature.bytes_list.value[0]
  return out


# -- the seqio source --------------------------------------------------------------------------------

def make_examples(task: str, path: str, fmt: FlanFormat):
  """The famjax.data.sources.ExampleFn of a user source: one pass over it per epoch."""

  def make(split: str, seed: int, shard_index: int, num_shards: int, stats: SourceStats
           ) -> Iterator[tuple[str, str]]:
    del seed  # file order; the task's shuffle buffer mixes it
    valid = 0
    selected = (r for i, r in enumerate(records(path, split)) if i % num_shards == shard_index)
    for example in _examples(task, selected, fmt, source_format(path), stats):
      valid += 1
      yield example
    if not valid:
      raise ValueError(f"source {task!r} ({path}) yielded no valid record in shard {shard_index} of "
                       f"{num_shards}")

  return make


def unit_examples(task: str, path: str, fmt: FlanFormat):
  """The famjax.data.sources.UnitExamplesFn of a user source: the examples of one unit, in order."""

  def make(split: str, seed: int, unit: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    del split, seed  # the unit names its split's shard or files
    yield from _examples(task, _unit_records(path, unit), fmt, source_format(path), stats)

  return make


def _examples(task: str, selected: Iterator[Record], fmt: FlanFormat, kind: str, stats: SourceStats
              ) -> Iterator[tuple[str, str]]:
  """(prompt, answer) of every valid record; bad ones counted (skipped_<why>) and skipped."""
  exemplars: collections.deque = collections.deque(maxlen=fmt.few_shot or 1)
  for record in selected:
    stats.add(task, "read")
    parsed = parse(record, fmt, kind)
    if isinstance(parsed, str):
      stats.add(task, f"skipped_{parsed}")
      continue
    yield format_example(parsed, list(exemplars) if fmt.few_shot else [], fmt)
    exemplars.append(parsed)


def preflight(task: str, path: str, fmt: FlanFormat):
  """Raises, naming the source, if it has no file or no valid record in this host's shard."""

  def check(split: str, shard_index: int, num_shards: int) -> None:
    if not source_files(path):
      raise FileNotFoundError(f"source {task!r}: no file matches {path!r}")
    if source_format(path) == "tfds" and not tf.io.gfile.exists(os.path.join(path, "dataset_info.json")):
      raise FileNotFoundError(f"source {task!r}: {path} is a directory without dataset_info.json (give "
                              "the TFDS version directory, or a JSONL/TFRecord file or glob)")
    if source_format(path) == "tfds" and split not in tfds.builder_from_directory(path).info.splits:
      raise ValueError(f"source {task!r}: the TFDS dataset at {path} has no split {split!r}")
    kind, counts = source_format(path), collections.Counter()
    for i, record in enumerate(records(path, split)):
      if i % num_shards == shard_index:
        parsed = parse(record, fmt, kind)
        if not isinstance(parsed, str):
          return
        counts[parsed] += 1
    detail = ", ".join(f"{n} {why}" for why, n in sorted(counts.items())) or "no records"
    raise ValueError(f"source {task!r} ({path}) yields nothing: no valid record in shard "
                     f"{shard_index} of {num_shards} ({detail})")

  return check


def splits(path: str) -> tuple[str, ...]:
  """Files hold one split ("train"); a TFDS directory holds whatever splits it was built with."""
  if tf.io.gfile.exists(os.path.join(path, "dataset_info.json")):
    return tuple(tfds.builder_from_directory(path).info.splits.keys())
  return ("train",)
