"""The packing plan on disk: computed once per (config, rows), published by its manifest, memory-mapped
for reading (famjax.data.plan says what the arrays are).

  <root>/plans/<mixture>-<seq_len>-<fingerprint>/    one per plan fingerprint (the packing and mixing
                                                     fields, the seed, the tasks' examples)
    p<rows>-<builds>/                                one version: the first <rows> rows over these
      row_start.bin, row_repeat.bin, piece_task.bin,   builds of the tasks' examples
      piece_example.bin, trunc_piece.bin, trunc_offset.bin, trunc_length.bin
      manifest.json                                  written last: rows, pieces, the tasks (store,
                                                     build, units read), each file's dtype, count,
                                                     size and sha256, the counters, the rows config
    .lock

A plan of more rows begins with the rows of a plan of fewer (famjax.data.plan is prefix-stable), so a
run that reads further gets a longer version; a version is never rewritten. Files are written to a
staging directory, moved into the version's directory, and the manifest goes last: a reader never sees
a half-written plan. Opening checks every file's size against the manifest (sha256: `verify`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

import numpy as np

from famjax.data import fs
from famjax.data import plan as plan_lib
from famjax.data.errors import PREPARE, StoreChangedError, StoreCorruptError

FORMAT = "famjax-plan"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def version_name(rows: int, builds: list[str]) -> str:
  return f"p{rows:012d}-{hashlib.sha256(' '.join(builds).encode()).hexdigest()[:8]}"


def versions(directory: str) -> list[tuple[int, str]]:
  """(rows, name) of the published versions of a plan directory."""
  out = []
  for name in fs.listdir(directory):
    if name.startswith("p") and not name.endswith(".tmp") and fs.exists(fs.join(directory, name, MANIFEST)):
      out.append((int(name[1:13]), name))
  return sorted(out)


class PlanWriter:
  """Appends a plan's chunks to raw files in a local staging directory (plan.build's `emit`): beside
  the plan's directory when it is local (the files are then renamed into place), else in the local
  temporary directory."""

  def __init__(self, dtypes: dict[str, str], directory: str):
    self.dtypes = {name: np.dtype(dtypes.get(name) or default) for name, default in plan_lib.FILES.items()}
    if fs.is_local(directory):
      fs.makedirs(directory)
      with fs.write_errors(directory):
        self.staging = tempfile.mkdtemp(prefix=".staging-", suffix=".tmp", dir=directory)
    else:
      self.staging = tempfile.mkdtemp(prefix="famjax_plan_")
    with fs.write_errors(self.staging):
      self._files = {name: open(os.path.join(self.staging, f"{name}.bin"), "wb") for name in self.dtypes}
    self._digests = {name: hashlib.sha256() for name in self.dtypes}
    self._counts = dict.fromkeys(self.dtypes, 0)

  def __call__(self, chunk: plan_lib.PlanChunk) -> None:
    for name in self.dtypes:
      self._append(name, getattr(chunk, name))

  def _append(self, name: str, values: np.ndarray) -> None:
    data = np.ascontiguousarray(values, self.dtypes[name])
    if data.size and not np.array_equal(data, values):
      raise ValueError(f"famjax.data: plan {name} values do not fit {self.dtypes[name]}")
    raw = data.tobytes()
    with fs.write_errors(os.path.join(self.staging, f"{name}.bin")):
      self._files[name].write(raw)
    self._digests[name].update(raw)
    self._counts[name] += len(data)

  def finish(self, pieces: int) -> dict[str, dict[str, Any]]:
    """Closes the files (row_start gets its end entry); returns their manifest entries."""
    self._append("row_start", np.array([pieces]))
    for name, f in self._files.items():
      with fs.write_errors(os.path.join(self.staging, f"{name}.bin")):
        f.close()
    return {name: {"file": f"{name}.bin", "dtype": self.dtypes[name].str, "count": self._counts[name],
                   "bytes": self._counts[name] * self.dtypes[name].itemsize,
                   "sha256": self._digests[name].hexdigest()} for name in self.dtypes}

  def publish(self, directory: str, name: str, manifest: dict[str, Any]) -> str:
    """Moves the files into <directory>/<name>/ and writes the manifest, last. Returns that directory."""
    target = fs.join(directory, name)
    with fs.write_errors(target):
      fs.makedirs(target)
      for entry in manifest["files"].values():
        fs.publish(os.path.join(self.staging, entry["file"]), fs.join(target, entry["file"]))
      fs.write_json(fs.join(target, MANIFEST), manifest)
    self.discard()
    return target

  def discard(self) -> None:
    for f in getattr(self, "_files", {}).values():
      try:
        f.close()
      except OSError:
        pass
    shutil.rmtree(self.staging, ignore_errors=True)


class PackingPlan:
  """A published plan version, opened: its arrays memory-mapped (files on another filesystem: local
  copies checked against their sha256)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.manifest_path = fs.join(directory, MANIFEST)
    manifest = fs.read_manifest(
        self.manifest_path, f"famjax.data: no packing plan at {directory} (no {MANIFEST}); build it with "
        f"{PREPARE}", f"famjax.data: {self.manifest_path} is not a readable manifest")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
      raise StoreCorruptError(f"famjax.data: {self.manifest_path} is not a famjax packing plan of format "
                              f"version {FORMAT_VERSION}; rebuild with {PREPARE} --rebuild")
    self.manifest = manifest
    self.num_rows = int(manifest["rows"])
    self.arrays: dict[str, np.ndarray] = {}
    for name, entry in manifest["files"].items():
      path = fs.join(directory, entry["file"])
      try:
        size = fs.size(path)
      except FileNotFoundError:
        raise StoreCorruptError(f"famjax.data: plan file {path} is missing (the manifest lists it); "
                                f"rebuild with {PREPARE} --rebuild") from None
      if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "overwritten"
        raise StoreCorruptError(f"famjax.data: plan file {path} is {size} bytes, the manifest says "
                                f"{entry['bytes']} ({what}); rebuild with {PREPARE} --rebuild")
      dtype = np.dtype(entry["dtype"])
      if not entry["count"]:
        self.arrays[name] = np.zeros(0, dtype)
        continue
      try:
        local = fs.local_copy(path, entry["sha256"])
      except fs.ChecksumError as e:
        raise StoreCorruptError(str(e)) from None
      self.arrays[name] = np.memmap(local, dtype, mode="r", shape=(entry["count"],))
    self._watch = fs.ManifestWatch(self.manifest_path)

  def __len__(self) -> int:
    return self.num_rows

  def pieces(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The pieces of plan rows `rows` (in that order): task, example, offset, length (-1: the whole
    example), row (the position in `rows`), and each row's repeated-span start."""
    rows = np.asarray(rows, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
      raise IndexError(f"plan rows must be in [0, {self.num_rows}), got {rows.min()}..{rows.max()}")
    start = np.asarray(self.arrays["row_start"][rows], np.int64)
    count = np.asarray(self.arrays["row_start"][rows + 1], np.int64) - start
    row = np.repeat(np.arange(len(rows)), count)
    index = np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count) + np.repeat(start, count)
    offset = np.zeros(len(index), np.int64)
    length = np.full(len(index), -1, np.int64)
    trunc = self.arrays["trunc_piece"]
    if len(trunc):
      at = np.searchsorted(trunc, index).clip(0, len(trunc) - 1)
      hit = trunc[at] == index
      offset[hit] = self.arrays["trunc_offset"][at[hit]]
      length[hit] = self.arrays["trunc_length"][at[hit]]
    return {"task": np.asarray(self.arrays["piece_task"][index], np.int64),
            "example": np.asarray(self.arrays["piece_example"][index], np.int64),
            "offset": offset, "length": length, "row": row,
            "repeat": np.asarray(self.arrays["row_repeat"][rows], np.int64)}

  def check_alive(self) -> None:
    """StoreChangedError if the plan's manifest is gone or replaced (fs.ManifestWatch)."""
    what = self._watch.changed()
    if what:
      raise _changed(self.manifest_path, what)

  def verify(self, say: Callable[[str], None] = lambda _: None) -> None:
    for entry in self.manifest["files"].values():
      path = fs.join(self.directory, entry["file"])
      if fs.sha256(path) != entry["sha256"]:
        raise StoreCorruptError(f"famjax.data: plan file {path} does not match its sha256 in "
                                f"{self.manifest_path} (corrupted); rebuild with {PREPARE} --rebuild")
      say(f"{path}: sha256 ok")


def _changed(path: str, what: str) -> StoreChangedError:
  return StoreChangedError(
      f"famjax.data: plan file {path} {what} while this run was reading it: stopping rather than mix "
      "rows of two builds. Restart the run: it opens the store as it is now (built again if it is gone)")


def open_version(directory: str, rows: int, exact: bool, builds: Optional[list[str]] = None
                 ) -> Optional[PackingPlan]:
  """A published version with at least `rows` rows (exactly, with `exact`) over `builds` (if given),
  the one of fewest rows; None if there is none."""
  for count, name in versions(directory):
    if count < rows or (exact and count != rows):
      continue
    if builds is not None and not name.endswith(version_name(count, builds)[-8:]):
      continue
    return PackingPlan(fs.join(directory, name))
  return None
