"""Bad input and faults of the data store: a full disk while tokenizing (a real tiny filesystem), a
store deleted or replaced under a running job, a corrupt or truncated ArrayRecord file, an interrupted
build, open files, and a store on a non-local filesystem (TensorFlow's ram://)."""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from famjax import data
from famjax.data import flan, store
from testenv import subprocess_env

# Faults of the data store (each builds stores): the full suite only (make test).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("inputs", "targets", "weights", "segment_ids")


def write_tasks(directory, sizes, files_per_task=1, seed=0):
  """JSONL tasks t0, t1, ... of `sizes` examples, each in `files_per_task` files."""
  rng = np.random.default_rng(seed)
  sources = []
  for t, n in enumerate(sizes):
    for f in range(files_per_task):
      with open(directory / f"t{t}-{f}.jsonl", "w") as out:
        for i in range(f, n, files_per_task):
          out.write(json.dumps({"inputs": "q" * int(rng.integers(1, 60)), "targets": f"A{t}.{i}"}) + "\n")
    sources.append((f"t{t}", str(directory / f"t{t}-*.jsonl"), float(n)))
  return tuple(sources)


@pytest.fixture
def one_file_per_unit(monkeypatch):
  monkeypatch.setattr(flan, "UNIT_BYTES", 1)  # every input file its own unit (and output file)


def config(sources, root, **changes):
  return data.DataConfig(mixture="faults_qa", sources=sources, seq_len=64, repeat_segment_len=4,
                         store=str(root), **changes)


def unit_files(root):
  return sorted(str(p) for p in root.rglob("unit-*.array_record"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(sources, root) of a store of 3 tasks in 3 files each (9 example files), planned for 200 rows."""
  directory = tmp_path_factory.mktemp("faults")
  sources = write_tasks(directory, (40, 60, 80), files_per_task=3)
  saved, flan.UNIT_BYTES = flan.UNIT_BYTES, 1
  try:
    store.open_or_build(config(sources, directory / "stores"), rows=200, say=lambda _: None)
  finally:
    flan.UNIT_BYTES = saved
  return sources, directory / "stores"


def copy_of(built, tmp_path):
  """(config, TrainingRows) of a copy of the built store that a test may damage."""
  sources, root = built
  shutil.copytree(root, tmp_path / "stores")
  cfg = config(sources, tmp_path / "stores")
  return cfg, store.open_or_build(cfg, rows=200, say=pytest.fail)


def test_a_store_deleted_under_a_running_job_stops_it_naming_the_file(built, tmp_path):
  _, rows = copy_of(built, tmp_path)
  with data.get_global_batches(rows, 8, prefetch=0) as it:
    next(it)
    shutil.rmtree(tmp_path / "stores")
    with pytest.raises(data.StoreChangedError, match=r"(plan|store) file .*manifest.* was deleted while "
                       r"this run was reading it: stopping rather than mix rows of two builds"):
      next(it)


def test_a_store_replaced_under_a_running_job_stops_it_and_never_mixes_rows(built, tmp_path,
                                                                            one_file_per_unit):
  cfg, a = copy_of(built, tmp_path)
  with data.get_global_batches(a, 8, prefetch=0) as it:
    reference = [next(it) for _ in range(5)]
  sources, _ = built
  changed = tmp_path / "changed"
  changed.mkdir()
  for path in sorted(glob.glob(sources[1][1])):  # another build of t1: other answers
    (changed / os.path.basename(path)).write_text(open(path).read().replace('"A1.', '"B1.'))
  other = (sources[0], ("t1", str(changed / "t1-*.jsonl"), sources[1][2]), sources[2])
  b = store.open_or_build(config(other, tmp_path / "b"), rows=40, say=lambda _: None)
  assert a.stores[1].content != b.stores[1].content
  rows = store.TrainingRows(a.root, a.directory, cfg)
  got = []
  with data.get_global_batches(rows, 8, prefetch=0) as it:
    got.append(next(it))  # opens (some of) a's files
    for unit in range(3):  # b's files copied over a's, as a careless sync would
      shutil.copyfile(b.stores[1].files[unit], a.stores[1].files[unit])
    with pytest.raises(data.StoreChangedError, match=r"store file .*unit-0000\d\.array_record was "
                       r"replaced"):
      for _ in range(4):
        got.append(next(it))
  for g, want in zip(got, reference):  # what was read before the error is a's, whole
    for k in KEYS:
      np.testing.assert_array_equal(g[k], want[k])


def test_a_corrupt_or_truncated_arrayrecord_file_is_named(built, tmp_path):
  cfg, rows = copy_of(built, tmp_path)
  victim = rows.stores[1].files[1]
  raw = bytearray(open(victim, "rb").read())
  raw[256] ^= 0x08  # a flipped bit among the records (the file is padded to 64 KiB blocks after them)
  open(victim, "wb").write(bytes(raw))
  fresh = store.TrainingRows(rows.root, rows.directory, cfg)
  examples_of_t1 = np.arange(len(fresh.stores[1]))
  with pytest.raises(data.StoreCorruptError, match=rf"{victim} is corrupted .*Riegeli"):
    fresh.stores[1].read(examples_of_t1)  # what a batch holding any of them reads
  with pytest.raises(data.StoreCorruptError, match=rf"{victim} does not match its sha256"):
    fresh.verify()
  open(victim, "wb").write(bytes(raw[:len(raw) // 2]))  # truncated
  truncated = rf"{victim} (holds \d+ records|cannot be read|is corrupted)"
  with pytest.raises(data.StoreCorruptError, match=truncated):
    store.TrainingRows(rows.root, rows.directory, cfg).stores[1].read(examples_of_t1)


def test_open_files_stay_bounded(built, tmp_path):
  cfg, built_rows = copy_of(built, tmp_path)
  assert sum(len(s.files) for s in built_rows.stores) == 9
  rows = store.TrainingRows(built_rows.root, built_rows.directory, cfg, max_open_files=4)

  def open_unit_files():
    count = 0
    for fd in os.listdir("/proc/self/fd"):
      try:  # a descriptor another thread closes between the listing and the read is not open
        count += os.readlink(f"/proc/self/fd/{fd}").endswith(".array_record")
      except FileNotFoundError:
        pass
    return count

  baseline = open_unit_files()
  seen = 0
  with data.get_global_batches(rows, 8, prefetch=2) as it:
    for _ in range(25):
      next(it)
      seen = max(seen, open_unit_files() - baseline)
      assert rows.pool.open_files() <= 4
  assert 0 < seen <= 4 + 2  # the bound, plus a file each prefetch thread may hold while it reads
  rows.close()
  assert open_unit_files() == baseline


def test_an_interrupted_build_redoes_only_the_unfinished_files(built, tmp_path, one_file_per_unit):
  sources, root = built
  cfg = config(sources, tmp_path / "stores")
  written = []

  def interrupt_after_two_files(line):
    if " file " in line and "examples (" in line:
      written.append(line)
      if len(written) == 2:
        raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    store.open_or_build(cfg, rows=200, say=interrupt_after_two_files)
  done = {p: os.stat(p) for p in unit_files(tmp_path / "stores")}
  assert len(done) == 2 and not list((tmp_path / "stores").rglob("manifest-*.json"))  # nothing published
  lines = []
  rows = store.open_or_build(cfg, rows=200, say=lines.append)
  assert any("7 file(s) to write (2 done already)" in line for line in lines)
  for path, before in done.items():  # finished files: kept, not rewritten
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  clean = store.open_or_build(config(sources, root), rows=200, say=pytest.fail)  # the module's build
  assert [s.content for s in rows.stores] == [s.content for s in clean.stores]
  for k in KEYS:
    np.testing.assert_array_equal(rows.read(np.arange(20))[k], clean.read(np.arange(20))[k])


def test_a_store_on_a_non_local_filesystem(tmp_path, monkeypatch):
  """TensorFlow's ram:// filesystem stands for gs://: every path goes through famjax.data.fs."""
  monkeypatch.setenv("FAMJAX_DATA_CACHE", str(tmp_path / "cache"))
  sources = write_tasks(tmp_path, (12, 20))
  remote = config(sources, "ram://famjax_faults/stores")
  rows = store.open_or_build(remote, rows=16, say=lambda _: None)
  assert rows.directory.startswith("ram://famjax_faults/stores/plans/")
  assert not (tmp_path / "ram:").exists() and not os.path.exists("ram:")  # not a local directory
  local = store.open_or_build(config(sources, tmp_path / "local"), rows=16, say=lambda _: None)
  with data.get_global_batches(rows, 4) as a, data.get_global_batches(local, 4) as b:
    for _ in range(4):
      x, y = next(a), next(b)
      for k in KEYS:
        np.testing.assert_array_equal(x[k], y[k])
  cached = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
  assert any(name.endswith(".array_record") for name in cached)  # read through checked local copies
  rows.verify()
  reopened = store.open_or_build(remote, rows=16, say=pytest.fail)  # published: found, not rebuilt
  assert reopened.directory == rows.directory


_FULL_DISK = textwrap.dedent("""
    import json, os, shutil, sys
    from famjax import data
    from famjax.data import flan, store
    flan.UNIT_BYTES = 1
    disk, sources = sys.argv[1], tuple(tuple(s) for s in json.loads(sys.argv[2]))
    reference = store.open_or_build(data.DataConfig(mixture="disk_qa", sources=sources, seq_len=64,
                                                    repeat_segment_len=0, store=sys.argv[3]),
                                    rows=8, say=lambda _: None)
    need = sum(os.path.getsize(f) for s in reference.stores for f in s.files)
    free = shutil.disk_usage(disk).free
    with open(os.path.join(disk, "filler"), "wb") as f:  # leave room for about half the examples
      f.write(b"x" * (free - need // 2))
    cfg = data.DataConfig(mixture="disk_qa", sources=sources, seq_len=64, repeat_segment_len=0,
                          store=os.path.join(disk, "stores"))
    out = {}
    try:
      store.open_or_build(cfg, rows=8, say=lambda _: None)
    except data.StoreWriteError as e:
      out["error"] = str(e)
    out["published"] = [p for p, _, files in os.walk(disk) for f in files if f.startswith("manifest")]
    out["units_before"] = sorted(p + "/" + f for p, _, files in os.walk(disk) for f in files
                                 if f.endswith(".array_record"))
    os.unlink(os.path.join(disk, "filler"))
    rows = store.open_or_build(cfg, rows=8, say=lambda _: None)
    out["same_examples"] = [s.content for s in rows.stores] == [s.content for s in reference.stores]
    out["same_rows"] = bool((rows.read(range(8))["targets"] == reference.read(range(8))["targets"]).all())
    print("RESULT " + json.dumps(out))
    """)


@pytest.mark.slow
def test_a_full_disk_while_tokenizing_publishes_nothing_and_a_rerun_finishes(tmp_path):
  """On a real tiny filesystem: a tmpfs mounted in a private mount namespace (unshare)."""
  if shutil.which("unshare") is None:
    pytest.skip("needs unshare (util-linux) to mount a tiny filesystem")
  sources = write_tasks(tmp_path, (300, 500), files_per_task=4)
  disk = tmp_path / "tiny"
  disk.mkdir()
  script = tmp_path / "full_disk.py"
  script.write_text(_FULL_DISK)
  command = (f"mount -t tmpfs -o size=2m tmpfs {disk} && exec {sys.executable} {script} {disk} "
             f"'{json.dumps(sources)}' {tmp_path / 'reference'}")
  env = subprocess_env(PYTHONPATH=ROOT)
  out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  if out.returncode and "mount" in out.stderr and "RESULT" not in out.stdout:
    pytest.skip(f"cannot mount a tiny filesystem here: {out.stderr.strip().splitlines()[-1]}")
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.split("RESULT ", 1)[1])
  assert "No space left on device" in result["error"] and str(disk) in result["error"]
  assert "nothing was published" in result["error"]
  assert result["published"] == []  # no manifest: no store, no plan
  assert result["units_before"]  # the files finished before the disk filled were kept ...
  assert result["same_examples"] and result["same_rows"]  # ... and the rerun finished the build
