"""Paths of the data store on any filesystem: local directories, gs://, and whatever else TensorFlow's
gfile reaches (ram:// in the tests), with one set of helpers.

Local paths go through the os module (exact errors, fsync, flock, memory maps); a path with a scheme
("gs://bucket/x", "ram://x") goes through tf.io.gfile, so a store on a bucket is a bucket prefix, never a
local directory called "gs:". Errors come back as the OSError a local filesystem would raise:
FileNotFoundError for a missing path, OSError(ENOSPC) for a full disk, naming the path.

ArrayRecord's reader and writer open POSIX files only, so two helpers bridge the gap: `publish` moves a
finished local file to its place (a rename on the same filesystem; a copy, then a rename, elsewhere) and
`local_copy` gives a local file to read (the path itself, or a copy in a local cache, checked against the
sha256 the store's manifest gives).

Writes are atomic: a file is written under a temporary name beside its destination and renamed into
place, so a reader sees the whole file or nothing. Stores use it to publish by writing their manifest
last.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from typing import Any, Callable, Iterator

from famjax.data.errors import StoreCorruptError, StoreNotFoundError, StoreWriteError
from famjax.data.tensorflow_setup import tf

CACHE_ENV = "FAMJAX_DATA_CACHE"  # where local copies of files on other filesystems go


def is_local(path: str) -> bool:
  return "://" not in str(path) or str(path).startswith("file://")


def _local(path: str) -> str:
  path = str(path)
  return path[len("file://"):] if path.startswith("file://") else path


def join(base: str, *parts: str) -> str:
  if is_local(base):
    return os.path.join(_local(base), *parts)
  return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def basename(path: str) -> str:
  return str(path).rstrip("/").rsplit("/", 1)[-1]


@contextlib.contextmanager
def _os_errors(path: str) -> Iterator[None]:
  """TensorFlow's errors (gfile on non-local paths) as the OSErrors of a local filesystem."""
  try:
    yield
  except tf.errors.NotFoundError as e:
    raise FileNotFoundError(errno.ENOENT, f"no such file ({e.message})", str(path)) from None
  except tf.errors.ResourceExhaustedError as e:
    raise OSError(errno.ENOSPC, f"no space left ({e.message})", str(path)) from None
  except tf.errors.OpError as e:
    if "No space left" in e.message:
      raise OSError(errno.ENOSPC, f"no space left ({e.message})", str(path)) from None
    raise OSError(errno.EIO, e.message, str(path)) from None


def _as_os_errors(fn: Callable) -> Callable:
  @functools.wraps(fn)
  def wrapped(path, *args, **kwargs):
    with _os_errors(path):
      return fn(path, *args, **kwargs)

  return wrapped


@_as_os_errors
def exists(path: str) -> bool:
  return os.path.exists(_local(path)) if is_local(path) else tf.io.gfile.exists(path)


@_as_os_errors
def makedirs(path: str) -> None:
  if is_local(path):
    os.makedirs(_local(path), exist_ok=True)
  else:
    tf.io.gfile.makedirs(path)


@_as_os_errors
def listdir(path: str) -> list[str]:
  """Names in a directory (sorted; [] when it does not exist)."""
  if is_local(path):
    try:
      return sorted(os.listdir(_local(path)))
    except FileNotFoundError:
      return []
  if not tf.io.gfile.isdir(path):
    return []
  return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(path))


@_as_os_errors
def size(path: str) -> int:
  return os.stat(_local(path)).st_size if is_local(path) else tf.io.gfile.stat(path).length


@_as_os_errors
def read_bytes(path: str) -> bytes:
  if is_local(path):
    with open(_local(path), "rb") as f:
      return f.read()
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def read_json(path: str) -> Any:
  return json.loads(read_bytes(path))


@_as_os_errors
def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` under a temporary name beside `path`, then renames it into place."""
  tmp = join(os.path.dirname(_local(path)) if is_local(path) else path.rsplit("/", 1)[0],
             f".{basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
  if is_local(path):
    try:
      with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, _local(path))
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise
    return
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(data)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_json(path: str, value: Any) -> None:
  write_atomic(path, json.dumps(value, indent=1, sort_keys=True).encode())


@_as_os_errors
def remove(path: str) -> None:
  """Deletes a file or a directory tree; nothing if it is not there."""
  if is_local(path):
    local = _local(path)
    if os.path.isdir(local) and not os.path.islink(local):
      shutil.rmtree(local, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(local)
  elif tf.io.gfile.isdir(path):
    tf.io.gfile.rmtree(path)
  elif tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


@_as_os_errors
def publish(local_file: str, path: str) -> None:
  """Moves a finished local file to `path` (any filesystem), atomically for readers of `path`."""
  if is_local(path):
    try:
      os.replace(local_file, _local(path))
    except OSError as e:
      if e.errno != errno.EXDEV:
        raise
      tmp = staging_file(path)  # another local filesystem: copy beside the destination, then rename
      try:
        shutil.copyfile(local_file, tmp)
        os.replace(tmp, _local(path))
      finally:
        with contextlib.suppress(OSError):
          os.unlink(tmp)
      os.unlink(local_file)
    return
  tmp = f"{path.rsplit('/', 1)[0]}/.{basename(path)}.{uuid.uuid4().hex[:8]}.tmp"
  tf.io.gfile.copy(local_file, tmp, overwrite=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  os.unlink(local_file)


def staging_file(path: str, suffix: str = "") -> str:
  """A local temporary file name for building the file that will be published at `path`: beside it
  when `path` is local (the rename is then atomic), else in the local temporary directory."""
  name = f".{basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}.tmp"
  if is_local(path):
    return os.path.join(os.path.dirname(_local(path)), name)
  return os.path.join(tempfile.gettempdir(), name)


def sha256(path: str) -> str:
  h = hashlib.sha256()
  for block in _blocks(path):
    h.update(block)
  return h.hexdigest()


def _blocks(path: str) -> Iterator[bytes]:
  with _os_errors(path):
    opener = open(_local(path), "rb") if is_local(path) else tf.io.gfile.GFile(path, "rb")
    with opener as f:
      while True:
        block = f.read(1 << 22)
        if not block:
          return
        yield block


def cache_root() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "famjax_data_cache")


def local_copy(path: str, expected_sha256: str) -> str:
  """A local file with the contents of `path`: the path itself when it is local, else a copy in the
  local cache ($FAMJAX_DATA_CACHE, else the temporary directory), fetched once and checked against
  `expected_sha256` (a file that does not match is refused, naming it)."""
  if is_local(path):
    return _local(path)
  key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
  local = os.path.join(cache_root(), key, f"{expected_sha256[:16]}-{basename(path)}")
  if os.path.exists(local):
    return local
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = f"{local}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    _copy_to_local(path, tmp)
    got = sha256(tmp)
    if got != expected_sha256:
      raise ChecksumError(f"famjax.data: {path} does not match the sha256 its store's manifest gives "
                          f"({got[:16]}... != {expected_sha256[:16]}...): replaced or corrupted")
    os.replace(tmp, local)
  finally:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
  return local


class ChecksumError(ValueError):
  """A file's contents do not match the checksum the manifest that lists it gives."""


@_as_os_errors
def _copy_to_local(path: str, local: str) -> None:
  tf.io.gfile.copy(path, local, overwrite=True)


@contextlib.contextmanager
def write_errors(path: str) -> Iterator[None]:
  """A failed write (a full disk, a lost connection; ArrayRecord's writer raises RuntimeError) as
  StoreWriteError naming the file being written."""
  try:
    yield
  except StoreWriteError:
    raise
  except OSError as e:
    raise StoreWriteError(e.errno, f"famjax.data: writing {path} failed: {e.strerror or e}; nothing was "
                          "published (free space and rerun: finished files are kept)", str(path)) from None
  except RuntimeError as e:
    message = str(e).splitlines()[0] if str(e) else repr(e)
    if not any(word in message for word in ("write", "open", "close", "flush")):
      raise
    code = errno.ENOSPC if "No space left" in message else errno.EIO
    raise StoreWriteError(code, f"famjax.data: writing {path} failed: {message}; nothing was published "
                          "(free space and rerun: finished files are kept)", str(path)) from None


@contextlib.contextmanager
def lock(directory: str, say: Callable[[str], None], what: str) -> Iterator[None]:
  """An exclusive lock on a local directory (flock on `<directory>/.lock`): processes of one job that
  share a disk take turns (one builds, the others wait, then find it built). A directory on another
  filesystem gets no lock: builders there write the same bytes under their own names and publish
  atomically, so running side by side is safe, only wasteful (build ahead with famjax.data.prepare)."""
  if not is_local(directory):
    yield
    return
  import fcntl  # pylint: disable=import-outside-toplevel  (POSIX)
  os.makedirs(_local(directory), exist_ok=True)
  with open(os.path.join(_local(directory), ".lock"), "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      say(f"famjax.data: another process is building {what} in {directory}; waiting for it")
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:  # a filesystem without locks
      pass
    try:
      yield
    finally:
      with contextlib.suppress(OSError):
        fcntl.flock(f, fcntl.LOCK_UN)


def read_manifest(path: str, missing: str, unreadable: str) -> dict:
  """A published manifest's JSON: StoreNotFoundError(missing) when it is not there, StoreCorruptError
  (unreadable, the reason appended) when it is not valid JSON."""
  try:
    return read_json(path)
  except FileNotFoundError:
    raise StoreNotFoundError(missing) from None
  except (OSError, ValueError) as e:
    raise StoreCorruptError(f"{unreadable} ({e})") from None


def stat_identity(path: str) -> tuple:
  """What tells a file from a replacement of it at the same path (local: inode, size, mtime; elsewhere:
  size). FileNotFoundError when it is gone."""
  if is_local(path):
    st = os.stat(_local(path))
    return (st.st_ino, st.st_size, st.st_mtime_ns)
  return (size(path),)


class ManifestWatch:
  """Whether a published manifest is still the one a reader opened. `changed()` returns None while it is,
  else "was deleted" or "was replaced". Local files: checked on every call (inode, size, mtime). Another
  filesystem: only whether it still exists, at most every `every` seconds (a remote stat per read would
  cost more than the read)."""

  def __init__(self, path: str, every: float = 30.0):
    self.path, self.every = path, every
    self.identity = stat_identity(path) if is_local(path) else None
    self.checked_at = time.monotonic()

  def changed(self):
    if self.identity is None:
      if time.monotonic() - self.checked_at < self.every:
        return None
      self.checked_at = time.monotonic()
      return None if exists(self.path) else "was deleted"
    try:
      now = stat_identity(self.path)
    except FileNotFoundError:
      return "was deleted"
    return "was replaced" if now != self.identity else None
