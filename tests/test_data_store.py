"""The data store: a config's examples tokenized once and a packing plan over them, read by index.

The rows are today's greedy packing of the same examples (famjax.data.packing.Packer, batch for batch);
every process layout reads the same global batches and resumes on any other; a restore seeks without
tokenizing or planning; a packing or weighting change rebuilds the plan, never the tokenization; a
store or a position of another config is refused naming the field; an endless mixture's examples and
plan grow with the rows a run reads, keeping the rows already read; the prepare command builds the
store a training run then finds; positions of the earlier layouts resume or say why not."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from famjax import data
from famjax.data import global_batches, packing, plan as plan_lib, store, tokenize
from testenv import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("inputs", "targets", "weights", "segment_ids")


def write_tasks(directory, sizes, seed=0):
  """JSONL tasks t0, t1, ... of `sizes` examples, answers naming the example: prompts of 1-12 characters
  (rows hold several examples), one in six of 30-60 (longer than some rows hold)."""
  rng = np.random.default_rng(seed)
  sources = []
  for t, n in enumerate(sizes):
    path = directory / f"t{t}.jsonl"
    with open(path, "w") as f:
      for i in range(n):
        chars = int(rng.integers(30, 60) if rng.random() < 1 / 6 else rng.integers(1, 12))
        f.write(json.dumps({"inputs": "q" * chars, "targets": f"A{t}.{i}"}) + "\n")
    sources.append((f"t{t}", str(path), float(n)))
  return tuple(sources)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
  """A finite mixture of 4 JSONL tasks of different sizes, and the store root its tests share."""
  directory = tmp_path_factory.mktemp("qa")
  sources = write_tasks(directory, (5, 11, 23, 41))
  cfg = data.DataConfig(mixture="store_qa", sources=sources, seq_len=64, repeat_segment_len=6,
                        instruction_weight=0.25, seed=3, store=str(directory / "stores"))
  return cfg


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  """An endless (generated) mixture's store of 48 rows, read in epochs of 24 (store_rows)."""
  cfg = data.DataConfig(mixture="famjax_demo_short", seq_len=128, repeat_segment_len=8, seed=3,
                        store_rows=24, store=str(tmp_path_factory.mktemp("demo")))
  return cfg, store.open_or_build(cfg, say=lambda _: None)


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


def packer_rows(rows, cfg, n):
  """The first n rows famjax.data.packing.Packer makes of the plan's slots (its mixture, in order)."""
  tasks = [plan_lib.TaskLengths(t["task"], *s.lengths().T, t["rate"], t["endless"])
           for t, s in zip(rows.manifest["tasks"], rows.stores)]
  marker = tuple(data.get_vocabulary(cfg).encode(cfg.repeat_segment_marker)) if cfg.repeat_segment_len else ()
  spec = packing.PackingSpec(cfg.seq_len, cfg.pack, cfg.mask_between_examples, cfg.repeat_segment_len,
                             cfg.repeat_segment_weight, marker, cfg.instruction_weight, cfg.too_long,
                             cfg.pack_align)
  packer, out = packing.Packer(spec, np.random.default_rng(0)), []
  for t, e in plan_lib.slot_sequence(tasks, cfg.seed, 100 * n):
    ids, n_prompt = rows.stores[t].read(np.array([e]))[0]
    out += packer.add(np.asarray(ids, np.int32), n_prompt, "t")
    if len(out) >= n:
      return out[:n]
  raise AssertionError("the packer made too few rows")


@pytest.mark.parametrize("changes", [
    {}, {"pack_align": 8}, {"pack": False}, {"mask_between_examples": True, "pack_align": 4},
    {"seq_len": 32, "repeat_segment_len": 0},  # examples truncated
    {"seq_len": 32, "repeat_segment_len": 0, "too_long": "skip"}])
def test_rows_are_todays_greedy_packing_of_the_same_examples(qa, changes):
  cfg = qa.replace(**changes)
  rows = store.open_or_build(cfg, rows=40, say=lambda _: None)
  if cfg.seq_len == 32:  # examples longer than a row: truncated, or skipped
    counts = rows.stats()["sources"]
    assert sum(c.get("skipped_too_long" if cfg.too_long == "skip" else "truncated", 0)
               for c in counts.values()) > 0
  got = rows.read(np.arange(40))
  want = {k: np.stack([r[k] for r in packer_rows(rows, cfg, 40)]) for k in KEYS}
  repeat = np.zeros(want["targets"].shape, bool)  # where the repeated span is (its start is drawn)
  if cfg.repeat_segment_len:
    for r in range(40):
      used = np.flatnonzero(got["segment_ids"][r]).max() + 1
      n = int(np.isclose(got["weights"][r], cfg.repeat_segment_weight).sum())
      repeat[r, used - n:used] = True
      span, lo = got["targets"][r, used - n:used], 0
      if cfg.mask_between_examples:  # only the last example is visible to the copy
        segment = got["segment_ids"][r, used - 1]
        lo = np.flatnonzero(got["segment_ids"][r] == segment)[0]
      content = got["targets"][r, lo:used - n - len(rows.format.marker)]
      assert any(np.array_equal(content[i:i + n], span) for i in range(len(content) - n + 1))
  for k in KEYS:
    np.testing.assert_array_equal(np.where(repeat, 0, got[k]), np.where(repeat, 0, want[k]), err_msg=k)
  assert np.all(got["segment_ids"][repeat] == want["segment_ids"][repeat])


@pytest.mark.slow
def test_a_packing_or_weighting_change_rebuilds_the_plan_never_the_tokenization(qa, monkeypatch):
  store.open_or_build(qa, rows=16, say=lambda _: None)

  def no_tokenizing(*args, **kwargs):
    raise AssertionError("the examples must not be tokenized again")

  monkeypatch.setattr(tokenize, "tokenize_unit", no_tokenizing)
  lines = []
  rates = tuple((name, path, 1.0) for name, path, _ in qa.sources)
  for changes in ({"seq_len": 96}, {"pack_align": 4}, {"sources": rates}, {"instruction_weight": 1.0}):
    store.open_or_build(qa.replace(**changes), rows=16, say=lines.append)
  assert sum("packing plan ready" in line for line in lines) == 3  # the weight is applied when read
  assert not any("tokeniz" in line for line in lines)


def test_every_process_layout_reads_the_same_global_batches_and_resumes_on_any_other(demo):
  _, rows = demo
  with data.get_global_batches(rows, 8, prefetch=0) as one:
    reference = take(one, 10)  # 80 rows: epochs 0 to 3 of 24 rows
  first = {tuple(r) for b in reference[:3] for r in b["targets"]}  # epoch 0: the plan's 24 rows
  assert {tuple(r) for b in reference[3:6] for r in b["targets"]} == first  # epoch 1: the same rows
  assert not all(np.array_equal(a["targets"], b["targets"]) for a, b in zip(reference[3:6], reference[:3]))
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
  assert_batches_equal([global_batch(its) for _ in range(4)], reference[:4])
  saved = json.loads(json.dumps(its[0].state()))
  for n in (1, 4, 8):
    restored = [data.get_global_batches(rows, 8, p, n, state=saved) for p in range(n)]
    assert_batches_equal([global_batch(restored) for _ in range(6)], reference[4:])
  with data.get_global_batches(rows, 4, state=saved) as smaller:  # another batch size: the next row
    np.testing.assert_array_equal(next(smaller)["targets"], reference[4]["targets"][:4])


@pytest.mark.slow
def test_a_restore_seeks_without_tokenizing_or_planning(demo, monkeypatch):
  cfg, rows = demo
  step, batch = 50_000, 128
  with data.get_global_batches(rows, batch) as it:
    state = dict(it.state(), rows=step * batch)

  def fail(*args, **kwargs):
    raise AssertionError("a restore must not tokenize or plan")

  monkeypatch.setattr(tokenize, "tokenize_unit", fail)
  monkeypatch.setattr(plan_lib, "build", fail)
  monkeypatch.setattr(data.pipeline.PackedRows, "__init__", fail)
  lock = store.fs.lock

  def plan_lock(directory, say, what):  # a published plan is opened without queueing for the lock that
    assert what != "the packing plan", "a published plan must open without the builders' lock"
    return lock(directory, say, what)  # guards building one (the processes of a job would wait in turn)

  monkeypatch.setattr(store.fs, "lock", plan_lock)
  reopened = store.open_or_build(cfg, say=fail)
  with data.get_global_batches(reopened, batch, 3, 4, state=state) as it:
    got = next(it)
  first = step * batch + 3 * 32  # process 3 of 4: the last quarter of the global batch
  wanted = [global_batches.epoch_permutation(24, cfg.seed, i // 24)[i % 24] for i in range(first, first + 32)]
  np.testing.assert_array_equal(got["targets"], rows.read(np.array(wanted))["targets"])


@pytest.mark.slow
def test_a_store_or_a_position_of_another_config_is_refused_naming_the_field(demo):
  cfg, rows = demo
  with pytest.raises(store.StoreMismatchError, match=r"packing\.seq_len is 128 there and 256 here"):
    store.TrainingRows(rows.root, rows.directory, cfg.replace(seq_len=256))
  with pytest.raises(store.StoreMismatchError, match=r"seed is 3 there and 4 here"):
    store.TrainingRows(rows.root, rows.directory, cfg.replace(seed=4))
  store.TrainingRows(rows.root, rows.directory, cfg.replace(prefetch=0))  # how it is read: not the rows
  with data.get_global_batches(rows, 4) as it:
    next(it)
    state = it.state()
  other = store.TrainingRows(rows.root, rows.directory, cfg.replace(instruction_weight=0.5))
  with pytest.raises(store.StoreMismatchError, match=r"instruction_weight is 0\.0 there and 0\.5 here"):
    data.get_global_batches(other, 4, state=state)
  with pytest.raises(ValueError, match="streaming pipeline's state"):
    data.get_global_batches(rows, 4, state={"version": 1, "batches": 3})


@pytest.mark.slow
def test_an_endless_mixtures_examples_and_plan_grow_with_the_rows_a_run_reads(demo):
  cfg = demo[0].replace(store_rows=0)  # every row once: the plan covers the rows a run reads
  rows = store.open_or_build(cfg, rows=16, say=pytest.fail)  # the 24-row plan holds them: found
  assert (len(rows), rows.order) == (24, "prefix")
  with data.get_global_batches(rows, 4) as it:
    first = take(it, 6)
    state = it.state()
    with pytest.raises(IndexError, match="training row 24 is past the end of the packing plan"):
      next(it)
  units = len(rows.stores[0].units)
  lines = []
  grown = store.open_or_build(cfg, rows=2000, say=lines.append)
  assert len(grown) == 2000 and len(grown.stores[0].units) > units
  assert any("needs more generated examples" in line for line in lines)
  assert any(f"({len(grown.stores) * units} done already)" in line for line in lines)  # kept, extended
  with data.get_global_batches(grown, 4) as it:
    assert_batches_equal(take(it, 6), first)  # the rows already read, the same
  with data.get_global_batches(grown, 4, state=state) as it:
    next(it)  # a position in the shorter plan continues in the longer one
  assert len(store.open_or_build(cfg, rows=100, say=pytest.fail)) == 2000  # a longer plan: kept


@pytest.mark.slow
def test_a_finite_mixtures_examples_are_all_stored_once(qa):
  rows = store.open_or_build(qa, rows=8, say=lambda _: None)
  vocab = data.get_vocabulary(qa)
  answers = []
  for s in rows.stores:
    assert not s.endless and len(s) == {"t0": 5, "t1": 11, "t2": 23, "t3": 41}[s.task.split("_")[-1]]
    for ids, n_prompt in s.read(np.arange(len(s))):
      answers.append(vocab.decode(ids[n_prompt:-1].tolist()))
  assert sorted(answers) == sorted(f"A{t}.{i}" for t, n in enumerate((5, 11, 23, 41)) for i in range(n))


@pytest.mark.slow
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
  env = subprocess_env(FAMJAX_DATA_STORES=str(tmp_path / "stores"), PYTHONPATH=ROOT)
  command = [sys.executable, "-m", "famjax.data.prepare", f"--config={config_file}", "--workers=1",
             "--verify"]  # Beam's DirectRunner, in this process; then every file against its sha256
  out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "with Apache Beam" in out.stdout and "packing plan ready: 16 rows of 128 tokens" in out.stdout
  assert "verified" in out.stdout
  directory = out.stdout.strip().splitlines()[-1]
  assert directory.startswith(str(tmp_path / "stores" / "plans" / "famjax_demo_short-128-"))
  raw = {"steps": 4, "seq_len": 128, "batch_size": 4, "seed": 5}  # the training edge: same store
  section = DataSection.from_dict({"mixture": "famjax_demo_short", "repeat_segment_len": 8})
  monkeypatch.setenv("FAMJAX_DATA_STORES", str(tmp_path / "stores"))
  source = TrainData(section, train_config(raw))
  with source.batches(None) as it:
    next(it)
    assert it.stats()["store"] == directory
  assert "famjax.data" not in capsys.readouterr().out  # found it: nothing built


@pytest.mark.slow
def test_positions_of_the_earlier_layouts_resume_or_say_why_not(demo, capsys, monkeypatch):
  from famjax.train_data import TrainData
  from famjax.training.config import ConfigError, DataSection, train_config
  monkeypatch.setenv("FAMJAX_DATA_STORES", demo[0].store)  # its examples: the same tokenization
  section = DataSection.from_dict({"mixture": "famjax_demo_short", "repeat_segment_len": 8})
  source = TrainData(section, train_config({"seq_len": 128, "batch_size": 4, "seed": 3, "steps": 8}))
  with data.get_batches(source.config, 4, seed=3) as stream:  # a run of the streaming pipeline
    take(stream, 2)
    state = json.loads(json.dumps(stream.state()))
    expected = next(stream)
  assert state["config"] == "bc44c9d3433ee261"  # what famjax computed before the row store existed
  with source.batches(state) as it:  # a checkpoint of that run: the stream continues, exactly
    assert isinstance(it, data.BatchIterator)
    np.testing.assert_array_equal(next(it)["targets"], expected["targets"])
  assert "holds a stream position (batch 2" in capsys.readouterr().out
  with pytest.raises(ConfigError, match=r"process_count is 2 in the state and 1 here .* data store"):
    source.batches(dict(state, process_count=2))  # saved by 2 processes, restored on 1
  # a position in the .npy row store (version 2): the same row of the plan, with a note
  row_store = {"version": 2, "rows": 12, "fingerprint": "0123456789abcdef", "order": "prefix",
               "store_rows": None, "config": {**store.config_fields(source.config), "endless": True,
                                              "rows_version": 1, "format_version": 1}}
  with source.batches(row_store) as it:
    batch = next(it)
    assert it.state()["rows"] == 16 and it.state()["version"] == 3
  assert "position in the earlier row store (row 12)" in capsys.readouterr().out
  np.testing.assert_array_equal(batch["targets"], source._store.read(np.arange(12, 16))["targets"])
  with pytest.raises(ConfigError, match=r"instruction_weight is 0\.5 there and 0\.0 here"):
    source.batches(dict(row_store, config={**row_store["config"], "instruction_weight": 0.5}))
