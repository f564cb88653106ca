"""One task's tokenized examples: ArrayRecord files written once (famjax.data.tokenize), read by index.

A task's store, <root>/examples/<task>-<fingerprint>/ (the fingerprint: what the examples depend on,
famjax.data.tasks.tokenization_identity, and the vocabulary; never rates, packing or loss weights):

  b<UTC time>-<random>/          one build (a rebuild is a new directory; a build is never rewritten)
    unit-00000.array_record      records 0..n-1: the unit's examples, each <u4 prompt length> + token
                                 ids (uint16 for vocabularies up to 65536 ids, else int32); record n:
                                 a JSON trailer (task, fingerprint, build, unit, examples)
    unit-00000.json              the unit's summary, written once its file is in place: the unit is done
    ...
    lengths-000004.npy           [examples, 2] int32: (tokens, prompt tokens) of every example of units
                                 0-3, in order: all the packing plan reads
    manifest-000004.json         written last: units 0-3 published (their files, example counts, sizes,
                                 sha256), the build's source counters; a reader opens a manifest
  .lock                          (local disks) one process builds, the others wait, then read

A finite task's build publishes one manifest, of all its units. An endless (generated) task is tokenized
in ranges of example indices (`endless_unit_range`: 256 examples, then twice as many per unit up to
MAX_UNIT_EXAMPLES), and a build publishes a larger manifest each time a run needs more of them; the
files an earlier manifest lists are never touched again, so every published version stays whole.

Reading (ExampleStore.read): an example is record `index - first example of its unit` of its unit's
file. Files open lazily, at most `max_open_files` at once (ReaderPool, least recently used closed first).
Opening a file checks its trailer against the manifest opened (task, build, unit, count): a file from
another build is refused, naming it. Every batch checks that the files it reads are still the ones
opened (local disks: inode, size, mtime): a store deleted or replaced under a running job stops it with
StoreChangedError naming the file, never mixing rows of two builds. Riegeli checks every record's chunk
hash: a corrupted file raises StoreCorruptError naming it. Files on another filesystem (gs://) are read
from a local copy checked against the manifest's sha256 (ArrayRecord reads POSIX files only).
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import struct
import threading
from typing import Any, Optional

import numpy as np

from famjax.data import fs
from famjax.data.errors import PREPARE, StoreChangedError, StoreCorruptError

FORMAT = "famjax-examples"
FORMAT_VERSION = 1
FIRST_UNIT_EXAMPLES = 256  # an endless task's first unit; each next one twice as large, up to:
MAX_UNIT_EXAMPLES = 16384
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access (zstd-compressed, Riegeli hashes)
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access

def _max_open_files(default: int = 512) -> int:
  """The default bound of open example files: 512, or a quarter of the process's file limit if lower."""
  try:
    import resource  # pylint: disable=import-outside-toplevel  (POSIX)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
  except (ImportError, OSError, ValueError):
    return default
  return default if soft in (resource.RLIM_INFINITY, -1) else max(8, min(default, soft // 4))


MAX_OPEN_FILES = _max_open_files()
REMOTE_CHECK_SECONDS = 30.0  # how often a store on another filesystem is checked to still be there
_PROMPT = struct.Struct("<I")


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def encode_example(ids: np.ndarray, n_prompt: int, dtype: np.dtype) -> bytes:
  return _PROMPT.pack(n_prompt) + np.asarray(ids).astype(dtype, copy=False).tobytes()


def decode_example(record: bytes, dtype: np.dtype) -> tuple[np.ndarray, int]:
  return np.frombuffer(record, dtype, offset=_PROMPT.size), _PROMPT.unpack_from(record)[0]


def trailer_record(task: str, fingerprint: str, build: str, unit: int, examples: int) -> bytes:
  return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "task": task,
                     "fingerprint": fingerprint, "build": build, "unit": unit,
                     "examples": examples}, sort_keys=True).encode()


def endless_unit_range(unit: int) -> tuple[int, int]:
  """The example indices [start, stop) of unit `unit` of an endless task."""
  start, size = 0, FIRST_UNIT_EXAMPLES
  for _ in range(unit):
    start += size
    size = min(2 * size, MAX_UNIT_EXAMPLES)
  return start, start + size


def endless_units_for(examples: int) -> int:
  """How many units of an endless task hold at least `examples` examples."""
  units = 0
  while endless_unit_range(units)[0] < examples:
    units += 1
  return max(units, 1)


def unit_file(unit: int) -> str:
  return f"unit-{unit:05d}.array_record"


def unit_summary(unit: int) -> str:
  return f"unit-{unit:05d}.json"


def manifest_name(units: int) -> str:
  return f"manifest-{units:06d}.json"


def lengths_name(units: int) -> str:
  return f"lengths-{units:06d}.npy"


def content_id(unit_hashes: list[str]) -> str:
  """One hash of a build's examples (its units' examples_sha256 in order): builds of the same examples,
  on any host, by any number of workers, have the same content id."""
  return hashlib.sha256("".join(unit_hashes).encode()).hexdigest()[:16]


# -- finding builds -----------------------------------------------------------------------------------

def builds(directory: str) -> list[str]:
  """The build directories of a task's store, oldest first (names sort by time)."""
  return [name for name in fs.listdir(directory) if name.startswith("b") and not name.endswith(".tmp")]


def published_versions(build_dir: str) -> list[int]:
  """The unit counts of a build's published manifests, ascending."""
  out = []
  for name in fs.listdir(build_dir):
    if name.startswith("manifest-") and name.endswith(".json"):
      out.append(int(name[len("manifest-"):-len(".json")]))
  return sorted(out)


def newest_published(directory: str) -> Optional[tuple[str, int]]:
  """(build, units) of the newest build with a published manifest (its largest), or None."""
  for build in reversed(builds(directory)):
    versions = published_versions(fs.join(directory, build))
    if versions:
      return build, versions[-1]
  return None


# -- reading --------------------------------------------------------------------------------------------

class ExampleStore:
  """One published version of one build of a task's examples, opened for reading."""

  def __init__(self, directory: str, build: str, units: int, pool: Optional[ReaderPool] = None,
               fingerprint: Optional[str] = None):
    self.directory, self.build = directory, build
    self.build_dir = fs.join(directory, build)
    self.manifest_path = fs.join(self.build_dir, manifest_name(units))
    manifest = fs.read_manifest(
        self.manifest_path, f"famjax.data: no published examples at {self.manifest_path}; build them with "
        f"{PREPARE}", f"famjax.data: {self.manifest_path} is not a readable manifest; rebuild with {PREPARE} "
        "--rebuild")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
      raise StoreCorruptError(f"famjax.data: {self.manifest_path} is not a famjax example store of format "
                              f"version {FORMAT_VERSION}; rebuild with {PREPARE} --rebuild")
    if fingerprint is not None and manifest["fingerprint"] != fingerprint:
      raise StoreCorruptError(f"famjax.data: {self.manifest_path} holds the examples of fingerprint "
                              f"{manifest['fingerprint']}, not {fingerprint} (copied from another store?)")
    self.manifest = manifest
    self.task: str = manifest["task"]
    self.fingerprint: str = manifest["fingerprint"]
    self.endless: bool = manifest["endless"]
    self.dtype = np.dtype(manifest["dtype"])
    self.units = manifest["units"]
    self.num_examples = int(manifest["examples"])
    self.content: Optional[str] = manifest.get("content")
    self.unit_starts = np.cumsum([0] + [u["examples"] for u in self.units]).astype(np.int64)
    self.files = [fs.join(self.build_dir, u["file"]) for u in self.units]
    self.pool = pool if pool is not None else ReaderPool()
    self._watch = fs.ManifestWatch(self.manifest_path, REMOTE_CHECK_SECONDS)

  def __len__(self) -> int:
    return self.num_examples

  def lengths(self) -> np.ndarray:
    """[examples, 2] int32: each example's tokens and prompt tokens (what the packing plan reads)."""
    entry = self.manifest["lengths"]
    path = fs.join(self.build_dir, entry["file"])
    try:
      raw = fs.read_bytes(path)
    except FileNotFoundError:
      raise StoreCorruptError(f"famjax.data: store file {path} is missing (its manifest lists it); "
                              f"rebuild with {PREPARE} --rebuild") from None
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
      raise StoreCorruptError(f"famjax.data: store file {path} does not match its sha256 in "
                              f"{self.manifest_path} (corrupted or replaced); rebuild with {PREPARE} "
                              "--rebuild")
    lengths = np.load(io.BytesIO(raw), allow_pickle=False)
    if lengths.shape != (self.num_examples, 2):
      raise StoreCorruptError(f"famjax.data: store file {path} holds {lengths.shape}, not "
                              f"({self.num_examples}, 2)")
    return lengths

  def locate(self, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unit, record position) of each example index."""
    examples = np.asarray(examples, np.int64)
    if examples.size and (examples.min() < 0 or examples.max() >= self.num_examples):
      raise IndexError(f"famjax.data: {self.task}: examples must be in [0, {self.num_examples}), got "
                       f"{examples.min()}..{examples.max()}")
    unit = np.searchsorted(self.unit_starts, examples, side="right") - 1
    return unit, examples - self.unit_starts[unit]

  def read(self, examples: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """(token ids, prompt tokens) of each example index, in the order given."""
    examples = np.asarray(examples, np.int64)
    out: list = [None] * len(examples)
    units, positions = self.locate(examples)
    for unit in np.unique(units):
      self.pool.check(self, int(unit))  # the file this run opened, still (else StoreChangedError)
      where = np.flatnonzero(units == unit)
      wanted, inverse = np.unique(positions[where], return_inverse=True)
      records = self.pool.read(self, int(unit), wanted.tolist())
      decoded = [decode_example(r, self.dtype) for r in records]
      for i, j in zip(where, inverse):
        out[i] = decoded[j]
    return out

  def check_alive(self) -> None:
    """Raises StoreChangedError if the manifest this store was opened from is gone or replaced
    (fs.ManifestWatch: local, every call; another filesystem, at most every REMOTE_CHECK_SECONDS)."""
    what = self._watch.changed()
    if what:
      raise _changed(self.manifest_path, what)

  def verify(self, say=lambda _: None) -> None:
    """Checks every file against the sha256 its manifest gives (reads the whole build)."""
    for unit, path in zip(self.units, self.files):
      try:
        digest = fs.sha256(path)
      except FileNotFoundError:
        raise StoreCorruptError(f"famjax.data: store file {path} is missing; rebuild with {PREPARE} "
                                "--rebuild") from None
      if digest != unit["sha256"]:
        raise StoreCorruptError(f"famjax.data: store file {path} does not match its sha256 in "
                                f"{self.manifest_path} (corrupted); rebuild with {PREPARE} --rebuild")
      say(f"{path}: {unit['examples']} examples, sha256 ok")
    self.lengths()


def _changed(path: str, what: str) -> StoreChangedError:
  return StoreChangedError(
      f"famjax.data: store file {path} {what} while this run was reading it: stopping rather than mix "
      "rows of two builds. Restart the run: it opens the store as it is now (built again if it is gone)")


class ReaderPool:
  """Open ArrayRecord readers of any number of stores, at most `max_open_files` at once (the least
  recently used is closed first). Thread-safe: Grain's prefetch threads read through one pool."""

  def __init__(self, max_open_files: int = MAX_OPEN_FILES):
    self.max_open_files = max_open_files
    self._open: collections.OrderedDict = collections.OrderedDict()  # path -> _Reader
    self._lock = threading.Lock()

  def read(self, store: ExampleStore, unit: int, positions: list[int]) -> list[bytes]:
    path = store.files[unit]
    reader = self._acquire(store, unit, path)
    try:
      try:
        return reader.reader.read(positions)
      except RuntimeError as e:
        raise StoreCorruptError(f"famjax.data: store file {path} is corrupted ({str(e).splitlines()[0]}); "
                                f"rebuild with {PREPARE} --rebuild") from None
    finally:
      self._release(reader)

  def check(self, store: ExampleStore, unit: int) -> None:
    """Raises StoreChangedError if the file of `unit` (if open) is no longer the file opened."""
    path = store.files[unit]
    with self._lock:
      reader = self._open.get(path)
    if reader is None or reader.identity is None:
      return
    try:
      now = fs.stat_identity(path)
    except FileNotFoundError:
      raise _changed(path, "was deleted") from None
    if now != reader.identity:
      raise _changed(path, "was replaced")

  def open_files(self) -> int:
    with self._lock:
      return len(self._open)

  def close(self) -> None:
    with self._lock:
      readers, self._open = list(self._open.values()), collections.OrderedDict()
    for reader in readers:
      reader.close()

  def _acquire(self, store: ExampleStore, unit: int, path: str) -> _Reader:
    with self._lock:
      reader = self._open.get(path)
      if reader is not None:
        self._open.move_to_end(path)
        reader.users += 1
        return reader
    opened = _Reader.open(store, unit, path)  # outside the lock: opening reads the file's index
    with self._lock:
      reader = self._open.get(path)
      if reader is None:
        reader, opened = opened, None
        self._open[path] = reader
      reader.users += 1
      self._evict()
    if opened is not None:
      opened.close()
    return reader

  def _release(self, reader: _Reader) -> None:
    with self._lock:
      reader.users -= 1
      self._evict()

  def _evict(self) -> None:
    """Closes the least recently used idle readers beyond the limit (under the lock)."""
    for path in list(self._open):
      if len(self._open) <= self.max_open_files:
        return
      reader = self._open[path]
      if reader.users == 0:
        del self._open[path]
        reader.close()


class _Reader:
  def __init__(self, reader, identity):
    self.reader, self.identity, self.users = reader, identity, 0

  @classmethod
  def open(cls, store: ExampleStore, unit: int, path: str) -> _Reader:
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    entry = store.units[unit]
    try:
      local = fs.local_copy(path, entry["sha256"])
      identity = fs.stat_identity(local) if fs.is_local(path) else None
      reader = array_record_module.ArrayRecordReader(local, READER_OPTIONS)
    except (FileNotFoundError, fs.ChecksumError) as e:
      raise _changed(path, "is missing" if isinstance(e, FileNotFoundError) else "was replaced") from None
    except RuntimeError as e:
      raise StoreCorruptError(f"famjax.data: store file {path} cannot be read as ArrayRecord "
                              f"({str(e).splitlines()[0]}); rebuild with {PREPARE} --rebuild") from None
    try:
      count = reader.num_records()
      trailer = json.loads(reader.read([count - 1])[0]) if count else {}
    except (RuntimeError, ValueError) as e:
      _close_quietly(reader)
      raise StoreCorruptError(f"famjax.data: store file {path} is corrupted ({str(e).splitlines()[0]}); "
                              f"rebuild with {PREPARE} --rebuild") from None
    expected = {"task": store.task, "fingerprint": store.fingerprint, "build": store.build, "unit": unit,
                "examples": entry["examples"]}
    got = {k: trailer.get(k) for k in expected}
    if got != expected or count != entry["examples"] + 1:
      _close_quietly(reader)
      if trailer.get("task") == store.task and trailer.get("unit") == unit and (
          trailer.get("build") != store.build or trailer.get("fingerprint") != store.fingerprint):
        raise _changed(path, f"was replaced by a file of build {trailer.get('build')} (this run opened "
                       f"build {store.build})")
      raise StoreCorruptError(f"famjax.data: store file {path} holds {count} records with trailer {got}, "
                              f"its manifest says {entry['examples'] + 1} with {expected} (truncated or "
                              f"overwritten); rebuild with {PREPARE} --rebuild")
    return cls(reader, identity)

  def close(self) -> None:
    _close_quietly(self.reader)


def _close_quietly(reader) -> None:
  """Closes an ArrayRecord reader; one of a damaged file may fail to close (it is closed anyway)."""
  try:
    reader.close()
  except RuntimeError:
    pass


def summary_of(build_dir: str, unit: int) -> Optional[dict[str, Any]]:
  """A finished unit's summary, if its file is in place at the recorded size; else None (redo it)."""
  try:
    summary = fs.read_json(fs.join(build_dir, unit_summary(unit)))
    if fs.size(fs.join(build_dir, summary["file"])) != summary["bytes"]:
      return None
  except (OSError, ValueError, KeyError):
    return None
  return summary
