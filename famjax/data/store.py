"""The row store: a config's packed training rows, materialised once and read by index.

seqio still defines, reads, tokenises and mixes the tasks, and famjax's packer packs them, exactly as
the streaming pipeline does for one host (`PackedRows`, process 0 of 1): the store is those rows, in
that order, written to disk. Row j of the store is then a file offset, so training reads any row
without producing the ones before it (famjax.data.global_batches: resume by seeking, on any number of
hosts). The rows do not depend on how many processes later read them.

How many rows: a finite mixture (files, TFDS) stores one whole pass, read in EPOCHS (in order, then in a
new order each time); an endless one (the generated famjax_demo and PassKey tasks) stores a PREFIX of
its stream, as many rows as the run reads, each read once, and grows when a run reads further;
DataConfig.store_rows = n stores the first n rows, read in EPOCHS.

A store is a directory:

  manifest.json     written last, atomically: the format version, the config the rows come from (the
                    fields that determine them) and its fingerprint, the row count, the record dtype,
                    and per shard file its rows, bytes and sha256. No manifest: not (yet) a store.
  rows-00000.npy    the shards: numpy .npy files of one structured record per row:
  rows-00001.npy      targets [seq_len]      uint16 (vocabularies up to 65536 ids) or int32
  ...                 segment_ids [seq_len]  uint16 (seq_len < 65536) or int32
                      weights [seq_len]      float32, exactly the packer's
                      crc                    uint32: CRC-32 of the record's other bytes
                    Decoder inputs are not stored: they are shift_right(targets, segment_ids).
  building.json     while a build runs: the shards finished so far (a build resumes from it)
  .lock             a build holds an exclusive lock on it (other processes wait, then read)

Integrity: opening checks the manifest against the config (a store of another config is refused,
naming the field) and every shard's size (a truncated or missing file is refused, naming it); every
row read is checked against its CRC (a corrupted row raises, naming the file and the row: never a
silently wrong or skipped row); `verify()` (prepare --verify) checks every shard's sha256.

Why numpy shards and not ArrayRecord/Grain or seqio's cache: the rows are fixed-size integer and float
arrays, so a row's offset is arithmetic and a memory map reads it with no index, no decoder and no
new dependency; seqio's cache stores examples before packing (a restore would still have to repack
from the start), and ArrayRecord would add a dependency and a serialisation per row for no gain here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from famjax.data import tasks as tasks_lib
from famjax.data.config import BYTE_VOCABULARY, STREAM, DataConfig
from famjax.data.packing import shift_right
from famjax.data.pipeline import PackedRows
from famjax.data.vocab import get_vocabulary

FORMAT = "famjax-row-store"
FORMAT_VERSION = 1
# Bump when code that produces rows changes (generators, packing) so older stores are not reused.
ROWS_VERSION = 1
MANIFEST, PROGRESS, LOCK = "manifest.json", "building.json", ".lock"
SHARD_BYTES = 64 << 20  # target size of a shard file
STORES_ENV = "FAMJAX_DATA_STORES"
_NOT_ROWS = ("prefetch", "store", "tfds_data_dir")  # DataConfig fields that do not change the rows
PREPARE = "python -m famjax.data.prepare --config=<your config>"
# How training reads a store (famjax.data.global_batches): PREFIX, an endless mixture's first rows, each
# read once (row i is store row i; the store grows when a run reads further); EPOCHS, a finite pass or
# DataConfig.store_rows rows, read again in a new order each epoch.
PREFIX, EPOCHS = "prefix", "epochs"


class StoreNotFoundError(FileNotFoundError):
  """No complete store at the directory (build one: famjax.data.prepare, or build())."""


class StoreMismatchError(ValueError):
  """The store (or a saved position) comes from another config; the message names the field."""


class StoreCorruptError(ValueError):
  """A store file is truncated, missing or does not match its checksums; the message names it."""


# -- what the rows are ---------------------------------------------------------------------------------

def rows_config(config: DataConfig) -> dict[str, Any]:
  """The fields that determine the rows: the DataConfig's (less where data lives and how it is read
  ahead), the seqio mixture name, the vocabulary's contents and the versions of the code and format."""
  if config.store == STREAM:
    raise ValueError("DataConfig.store: 'stream' reads no store")
  fields = {k: v for k, v in vars(config).items() if k not in _NOT_ROWS}
  fields = json.loads(json.dumps(fields))  # tuples -> lists: what a manifest reads back
  mixture = tasks_lib.ensure_registered(config)
  endless = tasks_lib.endless(mixture, "train")
  return {**fields, "split": "train", "seqio_mixture": mixture, "endless": endless,
          "order": PREFIX if endless and not config.store_rows else EPOCHS,
          "vocabulary_sha1": _vocabulary_hash(config),
          "vocab_size": get_vocabulary(config).vocab_size, "rows_version": ROWS_VERSION,
          "format_version": FORMAT_VERSION}


def fingerprint(rows_cfg: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(rows_cfg, sort_keys=True).encode()).hexdigest()[:16]


def default_directory(config: DataConfig) -> Path:
  """Where a config's store lives when DataConfig.store is "": $FAMJAX_DATA_STORES (else
  ~/.cache/famjax/stores) / <mixture>-<seq_len>-<fingerprint>."""
  root = os.environ.get(STORES_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "famjax", "stores")
  cfg = rows_config(config)
  name = re.sub(r"[^A-Za-z0-9_.-]", "_", cfg["seqio_mixture"])
  return Path(root) / f"{name}-{config.seq_len}-{fingerprint(cfg)}"


def directory_of(config: DataConfig) -> Path:
  """The config's store directory: DataConfig.store, or the default one."""
  return Path(config.store).expanduser() if config.store else default_directory(config)


def differing_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'<field>: <saved> in the store, <current> here' for every field that differs."""
  return [f"{k} is {saved.get(k, '<absent>')!r} there and {current.get(k, '<absent>')!r} here"
          for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]


def _vocabulary_hash(config: DataConfig) -> str:
  if config.vocabulary == BYTE_VOCABULARY:
    return BYTE_VOCABULARY
  with open(os.path.expanduser(config.vocabulary), "rb") as f:  # a SentencePiece model: its ids
    return hashlib.sha1(f.read()).hexdigest()


def record_dtype(seq_len: int, vocab_size: int) -> np.dtype:
  tokens = "<u2" if vocab_size <= 1 << 16 else "<i4"
  segments = "<u2" if seq_len < 1 << 16 else "<i4"
  return np.dtype([("targets", tokens, (seq_len,)), ("segment_ids", segments, (seq_len,)),
                   ("weights", "<f4", (seq_len,)), ("crc", "<u4")])


def encode(rows: list[dict[str, np.ndarray]], dtype: np.dtype) -> np.ndarray:
  """Rows (packer dicts) as records, each with the CRC of its bytes."""
  records = np.zeros(len(rows), dtype)
  for key in ("targets", "segment_ids", "weights"):
    values = np.stack([r[key] for r in rows])
    records[key] = values
    if not np.array_equal(records[key], values):
      raise ValueError(f"famjax.data.store: {key} do not fit {dtype[key].base}")
  records["crc"] = _crcs(records)
  return records


def _crcs(records: np.ndarray) -> np.ndarray:
  raw = records.view(np.uint8).reshape(len(records), records.dtype.itemsize)
  return np.fromiter((zlib.crc32(raw[i, :-4]) for i in range(len(records))), np.uint32, len(records))


# -- reading -------------------------------------------------------------------------------------------

class RowStore:
  """A built store, opened for reading: `read(store_rows)` gives batch dicts, `len()` its rows."""

  def __init__(self, directory: str | os.PathLike, config: Optional[DataConfig] = None):
    """Opens the store at `directory`; with `config`, refuses a store built from another one."""
    self.directory = Path(directory)
    path = self.directory / MANIFEST
    if not path.exists():
      building = " (a build was interrupted: rerun it to continue)" if (
          self.directory / PROGRESS).exists() else ""
      raise StoreNotFoundError(f"famjax.data: no row store at {self.directory} (no {MANIFEST})"
                               f"{building}; build it with {PREPARE}")
    try:
      manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise StoreCorruptError(f"famjax.data: {path} is not a readable manifest ({e}); rebuild the "
                              f"store with {PREPARE} --rebuild") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
      raise StoreMismatchError(f"famjax.data: {path} is not a famjax row store of format version "
                               f"{FORMAT_VERSION} (format {manifest.get('format')!r}, version "
                               f"{manifest.get('format_version')!r}); rebuild it with {PREPARE} --rebuild")
    self.manifest = manifest
    self.config: dict[str, Any] = manifest["config"]
    self.fingerprint: str = manifest["fingerprint"]
    if config is not None:
      expected = rows_config(config)
      if fingerprint(expected) != self.fingerprint:
        diff = differing_fields(self.config, expected) or ["(fingerprint only)"]
        raise StoreMismatchError(
            f"famjax.data: the row store at {self.directory} was built from another data config: "
            f"{'; '.join(diff)} (there = the store, here = this run). Point DataConfig.store elsewhere "
            f"(or leave it empty for a per-config directory), or rebuild it with {PREPARE} --rebuild")
    self.seq_len = int(self.config["seq_len"])
    self.order: str = self.config["order"]
    self.dtype = np.lib.format.descr_to_dtype(
        [tuple(f[:2]) + (tuple(f[2]),) if len(f) == 3 else tuple(f) for f in manifest["dtype"]])
    self.rows_per_shard = int(manifest["rows_per_shard"])
    self.shards = manifest["shards"]
    self.num_rows = int(manifest["rows"])
    if sum(s["rows"] for s in self.shards) != self.num_rows or self.num_rows < 1:
      raise StoreCorruptError(f"famjax.data: {path}: the shards' rows do not add up to {self.num_rows}")
    for s in self.shards:  # sizes only: cheap at any store size; contents by CRC when read
      file = self.directory / s["file"]
      try:
        size = file.stat().st_size
      except FileNotFoundError:
        raise StoreCorruptError(f"famjax.data: store file {file} is missing (the manifest lists it); "
                                f"rebuild the store with {PREPARE} --rebuild") from None
      if size != s["bytes"]:
        raise StoreCorruptError(
            f"famjax.data: store file {file} is {size} bytes, the manifest says {s['bytes']} "
            f"({'truncated' if size < s['bytes'] else 'overwritten'}); rebuild the store with "
            f"{PREPARE} --rebuild")
    self._maps: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self.num_rows

  def _map(self, k: int) -> np.ndarray:
    if k not in self._maps:
      file = self.directory / self.shards[k]["file"]
      try:
        records = np.load(file, mmap_mode="r")
      except (OSError, ValueError) as e:
        raise StoreCorruptError(f"famjax.data: store file {file} cannot be read as a shard ({e}); "
                                f"rebuild the store with {PREPARE} --rebuild") from None
      if records.dtype != self.dtype or records.shape != (self.shards[k]["rows"],):
        raise StoreCorruptError(f"famjax.data: store file {file} holds {records.shape} records of "
                                f"{records.dtype}, the manifest says ({self.shards[k]['rows']},) of "
                                f"{self.dtype}; rebuild the store with {PREPARE} --rebuild")
      self._maps[k] = records
    return self._maps[k]

  def records(self, rows: np.ndarray) -> np.ndarray:
    """The records of store rows `rows` (any order), each checked against its CRC."""
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
      raise IndexError(f"store rows must be in [0, {self.num_rows}), got {rows.min()}..{rows.max()}")
    out = np.empty(len(rows), self.dtype)
    shard = rows // self.rows_per_shard
    for k in np.unique(shard):
      where = np.flatnonzero(shard == k)
      local = rows[where] - k * self.rows_per_shard
      got = self._map(int(k))[local]
      bad = np.flatnonzero(_crcs(got) != got["crc"])
      if bad.size:
        file = self.directory / self.shards[int(k)]["file"]
        raise StoreCorruptError(
            f"famjax.data: store file {file} is corrupted: record {int(local[bad[0]])} (store row "
            f"{int(rows[where[bad[0]]])}) does not match its checksum; rebuild the store with {PREPARE} "
            "--rebuild")
      out[where] = got
    return out

  def read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """A batch (the pipeline's dict of [len(rows), seq_len] arrays) of store rows `rows`."""
    records = self.records(rows)
    targets = records["targets"].astype(np.int32)
    segment_ids = records["segment_ids"].astype(np.int32)
    return {"inputs": shift_right(targets, segment_ids), "targets": targets,
            "weights": np.ascontiguousarray(records["weights"]), "segment_ids": segment_ids}

  def verify(self, say: Callable[[str], None] = lambda _: None) -> None:
    """Checks every shard's sha256 against the manifest (reads the whole store)."""
    for s in self.shards:
      file = self.directory / s["file"]
      if _sha256(file) != s["sha256"]:
        raise StoreCorruptError(f"famjax.data: store file {file} does not match its sha256 in the "
                                f"manifest (corrupted); rebuild the store with {PREPARE} --rebuild")
      say(f"{file.name}: {s['rows']} rows, sha256 ok")

  def drop_page_cache(self) -> None:
    """Asks the OS to forget the shards' cached pages (benchmarks: a cold read)."""
    self._maps.clear()
    for s in self.shards:
      fd = os.open(self.directory / s["file"], os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


# -- building ------------------------------------------------------------------------------------------

def open_or_build(config: DataConfig, directory: Optional[str | os.PathLike] = None, *, min_rows: int = 0,
                  say: Callable[[str], None] = print, **build_kwargs) -> RowStore:
  """The config's store (DataConfig.store, else the default directory), built first if missing, and
  extended if it is a PREFIX store of fewer than `min_rows` rows (the rows a run reads)."""
  directory = Path(directory) if directory is not None else directory_of(config)
  try:
    rows = RowStore(directory, config)
    if rows.order == EPOCHS or len(rows) >= min_rows:
      return rows
  except (StoreNotFoundError, StoreCorruptError):  # corrupt: maybe mid-extension by another process;
    pass  # build() opens it again under the lock, and raises if it really is
  return build(config, directory, min_rows=min_rows, say=say, **build_kwargs)


def build(config: DataConfig, directory: Optional[str | os.PathLike] = None, *, min_rows: int = 0,
          rows_per_shard: Optional[int] = None, rebuild: bool = False,
          say: Callable[[str], None] = print) -> RowStore:
  """Materialises the config's training rows into `directory` (default: directory_of(config)).

  How many: one pass of a finite mixture, DataConfig.store_rows if set, else (an endless mixture)
  `min_rows`, the rows the run reads; a PREFIX store with fewer is extended. Shard by shard, each
  written to a temporary file and renamed; an interrupted build or an extension resumes (the stream is
  produced again up to where it stopped, each finished shard checked against it by its CRCs, not
  rewritten). Concurrent builders (processes of one job) take turns on a lock: the first builds, the
  others then find the store. Returns the opened store. `say` gets a line per shard.
  """
  directory = Path(directory) if directory is not None else directory_of(config)
  directory.mkdir(parents=True, exist_ok=True)
  cfg = rows_config(config)
  fp = fingerprint(cfg)
  if cfg["order"] == PREFIX and min_rows < 1:
    raise ValueError(f"famjax.data: {cfg['seqio_mixture']!r} is endless: its store holds the rows a run "
                     "reads; give that number (min_rows), or DataConfig.store_rows to read a fixed number "
                     "of rows in epochs")
  with _locked(directory, say):
    existing = None
    if (directory / MANIFEST).exists():
      if not rebuild:
        existing = RowStore(directory, config)
        if existing.order == EPOCHS or len(existing) >= min_rows:
          return existing
      else:
        (directory / MANIFEST).unlink()
    dtype = record_dtype(config.seq_len, cfg["vocab_size"])
    if existing is not None:  # a PREFIX store the run reads beyond: extend it
      per_shard = existing.rows_per_shard
    else:
      per_shard = rows_per_shard or max(1, SHARD_BYTES // dtype.itemsize)
    limit = min_rows if cfg["order"] == PREFIX else (config.store_rows or None)
    done = [] if rebuild else max(_progress(directory, fp, per_shard),
                                  list(existing.shards) if existing is not None else [], key=len)
    for tmp in directory.glob(".*.tmp"):  # left by a build that was killed
      tmp.unlink(missing_ok=True)
    what = f"{limit} rows" if limit else "one pass of the data"
    if existing is not None:
      say(f"famjax.data: extending the row store {directory} from {len(existing)} to {what} ...")
    else:
      say(f"famjax.data: building the row store {directory} ({cfg['seqio_mixture']}, seq_len "
          f"{config.seq_len}, {what}{f'; resuming: {len(done)} shard(s) on disk' if done else ''}) ...")
    t0 = time.perf_counter()
    source = PackedRows(config, "train", config.seed, 0, 1, num_epochs=None if cfg["endless"] else 1)
    rows_iter, shards, total = iter(source), [], 0
    try:
      while limit is None or total < limit:
        want = per_shard if limit is None else min(per_shard, limit - total)
        chunk = [row for _, row in zip(range(want), rows_iter)]
        if not chunk:
          break
        records = encode(chunk, dtype)
        k = len(shards)
        entry = _check_done(directory, done[k], records) if k < len(done) else None
        if entry is None:
          entry = _write_shard(directory, f"rows-{k:05d}.npy", records)
        shards.append(entry)
        total += len(chunk)
        _write_json(directory / PROGRESS, {"fingerprint": fp, "rows_per_shard": per_shard,
                                           "shards": shards})
        elapsed = time.perf_counter() - t0
        say(f"famjax.data: shard {k}: {total} rows{f' of {limit}' if limit else ''}, "
            f"{total * config.seq_len / max(elapsed, 1e-9):,.0f} tokens/s, {elapsed:.1f} s")
        if len(chunk) < want:
          break
      stats = {"sources": source.stats.snapshot(), "packing": dict(source.packer.counts)}
    finally:
      source.close()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fp, "config": cfg,
                "rows": total, "seq_len": config.seq_len, "rows_per_shard": per_shard,
                "dtype": np.lib.format.dtype_to_descr(dtype), "shards": shards, "build": stats,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(directory / MANIFEST, manifest)
    (directory / PROGRESS).unlink(missing_ok=True)
    for stale in directory.glob("rows-*.npy"):  # shards of an earlier, longer build
      if stale.name not in {s["file"] for s in shards}:
        stale.unlink()
    say(f"famjax.data: row store ready: {total} rows of {config.seq_len} tokens in {len(shards)} "
        f"shard(s), {time.perf_counter() - t0:.1f} s")
  return RowStore(directory, config)


def _progress(directory: Path, fp: str, per_shard: int) -> list[dict[str, Any]]:
  """The finished shards of an interrupted build of the same config and shard size, else []."""
  try:
    progress = json.loads((directory / PROGRESS).read_text())
  except (OSError, ValueError):
    return []
  if progress.get("fingerprint") != fp or progress.get("rows_per_shard") != per_shard:
    return []
  return list(progress.get("shards", []))


def _check_done(directory: Path, entry: dict[str, Any], records: np.ndarray) -> Optional[dict]:
  """The entry of a shard an interrupted build finished, if its file holds exactly `records`."""
  file = directory / entry["file"]
  try:
    if file.stat().st_size != entry["bytes"] or entry["rows"] != len(records):
      return None
    on_disk = np.load(file, mmap_mode="r")
    if on_disk.dtype != records.dtype or not np.array_equal(on_disk["crc"], records["crc"]):
      return None
  except (OSError, ValueError):
    return None
  return entry


def _write_shard(directory: Path, name: str, records: np.ndarray) -> dict[str, Any]:
  tmp = directory / f".{name}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    np.save(f, records, allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  entry = {"file": name, "rows": len(records), "bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
  os.replace(tmp, directory / name)
  return entry


def _write_json(path: Path, value: Any) -> None:
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(json.dumps(value, indent=1))
  os.replace(tmp, path)


@contextlib.contextmanager
def _locked(directory: Path, say: Callable[[str], None]) -> Iterator[None]:
  """An exclusive lock on the store directory (fcntl.flock; where the filesystem has none, builders
  run side by side, which is safe: they write the same bytes and rename atomically)."""
  import fcntl  # pylint: disable=import-outside-toplevel  (POSIX)
  with open(directory / LOCK, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      say(f"famjax.data: another process is building the row store {directory}; waiting for it")
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:
      pass
    try:
      yield
    finally:
      with contextlib.suppress(OSError):
        fcntl.flock(f, fcntl.LOCK_UN)
