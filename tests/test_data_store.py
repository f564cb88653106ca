"""The row store and the global order: the stored rows are the one-process stream's, every process
layout reads the same global batches, a restore seeks (no stream is built) on any layout, a damaged or
foreign store is refused naming the file or the field, a build resumes, and the prepare command builds
the store a training run then finds."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from famjax import data
from famjax.data import global_batches, packing, store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("inputs", "targets", "weights", "segment_ids")
CFG = data.DataConfig(mixture="famjax_demo_short", seq_len=128, repeat_segment_len=8, seed=3, store_rows=24)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A 24-row store of famjax_demo_short in 3 shards of 8 rows."""
  directory = tmp_path_factory.mktemp("store")
  store.build(CFG, directory, rows_per_shard=8, say=lambda _: None)
  return directory


def fresh_copy(built, tmp_path):
  """A copy of the built store that a test may damage."""
  copy = tmp_path / "store"
  copy.mkdir()
  for f in built.iterdir():
    (copy / f.name).write_bytes(f.read_bytes())
  return copy


def take(it, n):
  return [next(it) for _ in range(n)]


def global_batch(iterators):
  """One global batch: the hosts' batches in process order."""
  parts = [next(it) for it in iterators]
  return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def assert_batches_equal(got, want):
  for g, w in zip(got, want, strict=True):
    for k in KEYS:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_the_store_holds_the_one_process_stream_in_order(built):
  rows = store.RowStore(built, CFG)
  assert len(rows) == 24 and [s["rows"] for s in rows.shards] == [8, 8, 8]
  assert rows.manifest["config"]["endless"]  # generated: a fixed number of rows, not a pass
  with data.get_batches(CFG, batch_size=4) as stream:
    expected = take(stream, 6)
  with data.get_global_batches(rows, 4) as it:
    assert_batches_equal(take(it, 6), expected)  # epoch 0: the stream's own order
    later = take(it, 6)  # epoch 1: the same rows in another order
  first = {tuple(r) for b in expected for r in b["targets"]}
  assert {tuple(r) for b in later for r in b["targets"]} == first
  assert not all(np.array_equal(a["targets"], b["targets"]) for a, b in zip(later, expected))
  for b in later:  # a stored row comes back whole: decoder inputs are derived exactly
    for row in range(4):
      ids = b["segment_ids"][row]
      np.testing.assert_array_equal(b["inputs"][row], packing.shift_right(b["targets"][row], ids))


def test_every_process_layout_reads_the_same_global_batches_and_resumes_on_any_other(built):
  rows = store.RowStore(built, CFG)
  with data.get_global_batches(rows, 8, prefetch=0) as one:
    reference = take(one, 10)  # 80 rows: epochs 0 to 3 of 24 rows
  for n in (2, 4, 8):
    its = [data.get_global_batches(rows, 8, p, n) for p in range(n)]
    assert_batches_equal([global_batch(its) for _ in range(4)], reference[:4])
    states = [it.state() for it in its]
    assert all(s == states[0] for s in states) and states[0]["rows"] == 32
    assert json.loads(json.dumps(states[0])) == states[0]
    for it in its:
      it.close()
  # saved by 2 processes after step 4, restored on 1, 4 and 8: the same next global batches
  its = [data.get_global_batches(rows, 8, p, 2) for p in range(2)]
  take_global = [global_batch(its) for _ in range(4)]
  saved = json.loads(json.dumps(its[0].state()))
  for n in (1, 4, 8):
    restored = [data.get_global_batches(rows, 8, p, n, state=saved) for p in range(n)]
    assert_batches_equal([global_batch(restored) for _ in range(6)], reference[4:])
  assert_batches_equal(take_global, reference[:4])
  # another global batch size continues at the next row
  with data.get_global_batches(rows, 4, state=saved) as smaller:
    np.testing.assert_array_equal(next(smaller)["targets"], reference[4]["targets"][:4])


def test_a_restore_seeks_without_building_a_stream(built, monkeypatch):
  rows = store.RowStore(built, CFG)
  order = global_batches.GlobalOrder(len(rows), CFG.seed)
  step, batch = 50_000, 128
  state = {"version": 2, "rows": step * batch, "fingerprint": rows.fingerprint, "order": "epochs",
           "store_rows": 24, "config": rows.config}

  def no_stream(*args, **kwargs):
    raise AssertionError("a restore must not build the stream")

  monkeypatch.setattr(data.pipeline.PackedRows, "__init__", no_stream)
  with data.get_global_batches(store.RowStore(built), batch, 3, 4, state=state) as it:
    got = next(it)
  first = step * batch + 3 * 32  # process 3 of 4: the last quarter of the global batch
  wanted = [global_batches.epoch_permutation(24, CFG.seed, i // 24)[i % 24] for i in range(first, first + 32)]
  np.testing.assert_array_equal(order(np.arange(first, first + 32)), wanted)
  np.testing.assert_array_equal(got["targets"], rows.read(np.array(wanted))["targets"])


def test_a_corrupted_row_is_found_by_its_checksum_naming_the_file(built, tmp_path):
  directory = fresh_copy(built, tmp_path)
  rows = store.RowStore(directory, CFG)
  shard = directory / "rows-00001.npy"
  raw = bytearray(shard.read_bytes())
  header = len(raw) - 8 * rows.dtype.itemsize
  raw[header + 3 * rows.dtype.itemsize + 100] ^= 0x40  # one bit of record 3 (store row 11)
  shard.write_bytes(bytes(raw))
  rows = store.RowStore(directory, CFG)  # same size: opening cannot tell
  with pytest.raises(store.StoreCorruptError,
                     match=r"rows-00001\.npy is corrupted: record 3 \(store row 11\)"):
    rows.read(np.arange(24))
  rows.read(np.arange(11))  # the rows before it are fine
  with data.get_global_batches(rows, 4) as it:
    take(it, 2)
    with pytest.raises(store.StoreCorruptError, match="rows-00001.npy"):  # the batch holding row 11
      next(it)
  with pytest.raises(store.StoreCorruptError, match=r"rows-00001\.npy does not match its sha256"):
    rows.verify()


def test_a_truncated_or_missing_file_is_refused_when_the_store_opens(built, tmp_path):
  directory = fresh_copy(built, tmp_path)
  shard = directory / "rows-00002.npy"
  size = shard.stat().st_size
  with open(shard, "r+b") as f:
    f.truncate(size - 1000)
  with pytest.raises(store.StoreCorruptError, match=rf"rows-00002\.npy is {size - 1000} bytes, the "
                     rf"manifest says {size} \(truncated\)"):
    store.RowStore(directory, CFG)
  shard.unlink()
  with pytest.raises(store.StoreCorruptError, match=r"rows-00002\.npy is missing"):
    store.RowStore(directory, CFG)
  (directory / store.MANIFEST).unlink()
  with pytest.raises(store.StoreNotFoundError, match="famjax.data.prepare"):
    store.RowStore(directory, CFG)


def test_a_store_or_a_position_of_another_config_is_refused_naming_the_field(built):
  other = CFG.replace(instruction_weight=0.5)
  with pytest.raises(store.StoreMismatchError, match=r"instruction_weight is 0\.0 there and 0\.5 here"):
    store.RowStore(built, other)
  with pytest.raises(store.StoreMismatchError, match="instruction_weight"):
    store.open_or_build(other, built)  # an explicit directory is never silently rebuilt
  with pytest.raises(store.StoreMismatchError, match="seed is 3 there and 4 here"):
    store.RowStore(built, CFG.replace(seed=4))
  store.RowStore(built, CFG.replace(prefetch=0, store=str(built)))  # where and how: not the rows
  rows = store.RowStore(built, CFG)
  with data.get_global_batches(rows, 4) as it:
    next(it)
    state = it.state()
  foreign = dict(state, fingerprint="0" * 16, config={**state["config"], "seq_len": 256})
  with pytest.raises(store.StoreMismatchError, match="seq_len is 256 there and 128 here"):
    data.get_global_batches(rows, 4, state=foreign)
  with pytest.raises(store.StoreMismatchError, match="store of 30 rows"):
    data.get_global_batches(rows, 4, state=dict(state, store_rows=30))
  with pytest.raises(ValueError, match="streaming pipeline's state"):
    data.get_global_batches(rows, 4, state={"version": 1, "batches": 3})


def test_an_interrupted_build_resumes_without_rewriting_finished_shards(built, tmp_path):
  directory = tmp_path / "partial"

  def interrupt_after_first_shard(line):
    if "shard 0:" in line:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    store.build(CFG, directory, rows_per_shard=8, say=interrupt_after_first_shard)
  assert not (directory / store.MANIFEST).exists() and (directory / store.PROGRESS).exists()
  with pytest.raises(store.StoreNotFoundError, match="interrupted"):
    store.RowStore(directory, CFG)
  first = (directory / "rows-00000.npy").stat()
  lines = []
  rows = store.build(CFG, directory, rows_per_shard=8, say=lines.append)
  assert "resuming: 1 shard(s) on disk" in lines[0]
  again = (directory / "rows-00000.npy").stat()
  assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not rewritten
  assert not (directory / store.PROGRESS).exists()
  assert [s["sha256"] for s in rows.shards] == [s["sha256"] for s in store.RowStore(built).shards]


def test_an_endless_mixture_stores_the_rows_a_run_reads_and_grows_with_it(tmp_path):
  cfg, directory = CFG.replace(store_rows=0), tmp_path / "prefix"
  with pytest.raises(ValueError, match="is endless: its store holds the rows a run reads"):
    store.build(cfg, directory)
  rows = store.open_or_build(cfg, directory, min_rows=12, rows_per_shard=8, say=lambda _: None)
  assert (len(rows), rows.order, [s["rows"] for s in rows.shards]) == (12, "prefix", [8, 4])
  with data.get_batches(cfg, batch_size=4) as stream:
    expected = take(stream, 5)
  with data.get_global_batches(rows, 4) as it:
    assert_batches_equal(take(it, 3), expected[:3])  # the stream's rows, each once
    state = it.state()
    with pytest.raises(IndexError, match="row 12 is past the end of the row store"):
      next(it)
  first = (directory / "rows-00000.npy").stat()
  lines = []
  grown = store.open_or_build(cfg, directory, min_rows=20, say=lines.append)
  assert len(grown) == 20 and "extending the row store" in lines[0] and "from 12 to 20 rows" in lines[0]
  again = (directory / "rows-00000.npy").stat()
  assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # checked, not rewritten
  assert len(store.open_or_build(cfg, directory, min_rows=16, say=pytest.fail)) == 20  # enough: kept
  with data.get_global_batches(grown, 4, state=state) as it:  # a position in the smaller store
    assert_batches_equal(take(it, 2), expected[3:5])


def test_a_finite_mixture_stores_one_whole_pass(tmp_path):
  path = tmp_path / "qa.jsonl"
  path.write_text("".join(json.dumps({"inputs": f"Q{i}", "targets": f"A{i}"}) + "\n" for i in range(50)))
  cfg = data.DataConfig(mixture="store_test_qa", sources=(("qa", str(path), 1.0),), seq_len=64,
                        repeat_segment_len=0, store=str(tmp_path / "qa_store"))
  rows = store.open_or_build(cfg, say=lambda _: None)
  assert not rows.manifest["config"]["endless"]
  batch, vocab = rows.read(np.arange(len(rows))), data.get_vocabulary(cfg)
  answers = []
  for targets, weights in zip(batch["targets"], batch["weights"]):
    ids = targets[weights == 1]  # the answers, each ending with EOS
    ends = np.flatnonzero(ids == vocab.eos_id)
    answers += [vocab.decode(part.tolist()) for part in np.split(ids, ends + 1)[:-1]]
  assert sorted(answers) == sorted(f"A{i}" for i in range(50))  # all 50, each once
  assert rows.manifest["build"]["packing"]["examples"] == 50


def test_prepare_builds_the_store_a_training_run_finds(tmp_path, monkeypatch, capsys):
  from famjax.train_data import TrainData
  from famjax.training.config import DataSection, train_config
  config_file = tmp_path / "cfg.py"
  config_file.write_text(
      "from configs import base\n\n"
      "def get_config():\n"
      "  c = base.get_config()\n"
      "  c.steps, c.seq_len, c.batch_size, c.seed = 4, 128, 4, 5\n"
      "  c.data.mixture = 'famjax_demo_short'\n"
      "  c.data.repeat_segment_len = 8\n"
      "  return c\n")
  env = {**os.environ, "FAMJAX_DATA_STORES": str(tmp_path / "stores"), "TF_CPP_MIN_LOG_LEVEL": "2",
         "PYTHONPATH": ROOT}
  command = [sys.executable, "-m", "famjax.data.prepare", f"--config={config_file}"]
  out = subprocess.run(command + ["--rows_per_shard=8"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "shard 1: 16 rows of 16" in out.stdout
  directory = out.stdout.strip().splitlines()[-1]
  assert directory.startswith(str(tmp_path / "stores" / "famjax_demo_short-128-"))
  verified = subprocess.run(command + ["--verify"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
  assert verified.returncode == 0 and "16 rows verified" in verified.stdout, verified.stderr[-3000:]
  # the training edge finds it (same config, same fingerprint): no second build
  raw = {"steps": 4, "seq_len": 128, "batch_size": 4, "seed": 5}  # reads the 16 rows prepared
  section = DataSection.from_dict({"mixture": "famjax_demo_short", "repeat_segment_len": 8})
  monkeypatch.setenv("FAMJAX_DATA_STORES", str(tmp_path / "stores"))
  source = TrainData(section, train_config(raw))
  with source.batches(None) as it:
    next(it)
    assert it.stats()["store"] == directory
  assert "famjax.data" not in capsys.readouterr().out  # found it: nothing built


def test_a_stream_position_from_before_the_store_still_replays_or_says_why_not(capsys):
  from famjax.train_data import TrainData
  from famjax.training.config import ConfigError, DataSection, train_config
  section = DataSection.from_dict({"mixture": "famjax_demo_short", "repeat_segment_len": 8})
  source = TrainData(section, train_config({"seq_len": 128, "batch_size": 4, "seed": 3}))
  with data.get_batches(source.config, 4, seed=3) as stream:  # a run of the streaming pipeline
    take(stream, 2)
    state = json.loads(json.dumps(stream.state()))
    expected = next(stream)
  assert state["config"] == "bc44c9d3433ee261"  # what famjax computed before the row store existed
  with source.batches(state) as it:  # a checkpoint of that run: the stream continues, exactly
    assert isinstance(it, data.BatchIterator)
    np.testing.assert_array_equal(next(it)["targets"], expected["targets"])
  assert "holds a stream position (batch 2" in capsys.readouterr().out
  with pytest.raises(ConfigError, match=r"process_count is 2 in the state and 1 here .* row store"):
    source.batches(dict(state, process_count=2))  # saved by 2 processes, restored on 1
