"""Tokenizing once: seqio tasks (famjax's and another's) run unit by unit into ArrayRecord files, by a real
Apache Beam pipeline (DirectRunner) or in this process, with the same examples either way; bad records
counted; generated examples are those of the stream; what the examples depend on keys their store."""

import json

import numpy as np
import pytest
import seqio

from famjax import data
from famjax.data import examples, flan, store, synthetic, tokenize

# Tokenizing with Beam: the full suite only (make test).
pytestmark = pytest.mark.slow


def write_flan(directory, n_files=3, per_file=40, bad=True):
  for f in range(n_files):
    lines = [json.dumps({"inputs": f"question {f}.{i} " + "w " * (i % 17), "targets": f"answer {f}.{i}"})
             for i in range(per_file)]
    if bad:
      lines[3] = "{not json"
      lines[5] = json.dumps({"inputs": "no answer"})
      lines[7] = json.dumps({"inputs": "empty", "targets": "  "})
    (directory / f"qa-{f}.jsonl").write_text("\n".join(lines) + "\n")
  return str(directory / "qa-*.jsonl")


def units_of(rows):
  return [[(u["name"], u["examples"], u["examples_sha256"]) for u in s.units] for s in rows.stores]


@pytest.fixture(scope="module")
def flan_glob(tmp_path_factory):
  return write_flan(tmp_path_factory.mktemp("flan"))


def test_beam_tokenizes_exactly_what_the_process_does_and_counts_bad_records(tmp_path, flan_glob,
                                                                              monkeypatch):
  monkeypatch.setattr(flan, "UNIT_BYTES", 1)  # a unit per file: 3 units
  cfg = data.DataConfig(mixture="tok_flan", sources=(("qa", flan_glob, 1.0),), seq_len=128,
                        repeat_segment_len=0)
  here = store.open_or_build(cfg.replace(store=str(tmp_path / "here")), rows=8, say=lambda _: None)
  lines = []
  beam = store.open_or_build(cfg.replace(store=str(tmp_path / "beam")), rows=8, workers=1, say=lines.append)
  assert any("with Apache Beam" in line for line in lines)
  assert units_of(beam) == units_of(here) and len(units_of(here)[0]) == 3
  manifest = beam.stores[0].manifest
  assert manifest["examples"] == 3 * 37
  assert manifest["stats"]["tok_flan_qa"] == {"read": 120, "skipped_bad_json": 3,
                                              "skipped_missing_field": 3, "skipped_empty_field": 3}
  assert beam.stats()["sources"]["tok_flan_qa"]["skipped_bad_json"] == 3
  np.testing.assert_array_equal(beam.read(np.arange(8))["targets"], here.read(np.arange(8))["targets"])


@pytest.mark.slow
def test_two_beam_worker_processes_tokenize_the_same_examples_as_one(tmp_path, flan_glob, monkeypatch):
  monkeypatch.setattr(flan, "UNIT_BYTES", 1)
  cfg = data.DataConfig(mixture="tok_flan2", sources=(("qa", flan_glob, 1.0),),
                        seq_len=128, repeat_segment_len=0)
  one = store.open_or_build(cfg.replace(store=str(tmp_path / "one")), rows=8, say=lambda _: None)
  two = store.open_or_build(cfg.replace(store=str(tmp_path / "two")), rows=8, workers=2,
                            say=lambda _: None)  # DirectRunner, multi_processing
  assert units_of(two) == units_of(one)


def test_generated_examples_are_the_streams_examples_by_index():
  cfg = data.DataConfig(mixture="famjax_demo_short_copy", seq_len=256, repeat_segment_len=0, seed=5)
  rows = store.open_or_build(cfg, rows=400, say=lambda _: None)  # over 256 examples
  (copy,) = rows.stores
  assert copy.endless and len(copy.units) >= 2  # 256 examples, then 512, ...
  vocab = data.get_vocabulary(cfg)
  context = synthetic.DEMO_MIXTURES["famjax_demo_short"]
  for index in (0, 255, 256, 300):  # either side of a unit boundary
    prompt, answer = synthetic.example("copy", 5, "train", index, context)
    ids, n_prompt = copy.read(np.array([index]))[0]
    assert vocab.decode(ids[:n_prompt].tolist()) == prompt
    assert ids[n_prompt:].tolist() == vocab.encode(answer) + [vocab.eos_id]


def test_a_task_registered_by_other_code_is_tokenized_shard_by_shard(tmp_path):
  for k in range(2):
    (tmp_path / f"lines-{k}.txt").write_text("".join(f"line {k}.{i}\n" for i in range(30 + k)))
  vocab = data.get_vocabulary("byte")
  name = "tok_other_lines"
  if name not in seqio.TaskRegistry.names():
    seqio.TaskRegistry.add(
        name, source=seqio.TextLineDataSource({"train": str(tmp_path / "lines-*.txt")}),
        preprocessors=[lambda ds: ds.map(lambda line: {"targets": line}), seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos],
        output_features={"targets": seqio.Feature(vocab, add_eos=True)})
  cfg = data.DataConfig(mixture=name, seq_len=64, repeat_segment_len=0, store=str(tmp_path / "stores"))
  rows = store.open_or_build(cfg, rows=8, say=lambda _: None)
  (lines,) = rows.stores
  assert [u["examples"] for u in lines.units] == [30, 31]  # one unit per file (seqio's shards)
  texts = sorted(vocab.decode(ids[:-1].tolist()) for ids, _ in lines.read(np.arange(len(lines))))
  assert texts == sorted(f"line {k}.{i}" for k in range(2) for i in range(30 + k))


def test_what_the_examples_depend_on_keys_their_store(tmp_path, flan_glob):
  def directories(cfg):
    return [r.directory for r in store._requests(cfg, str(tmp_path))[2]]

  files = data.DataConfig(mixture="tok_keys", sources=(("qa", flan_glob, 1.0),), seq_len=128,
                          repeat_segment_len=0)
  assert directories(files) == directories(files.replace(seed=9, seq_len=256, instruction_weight=1.0,
                                                         sources=(("qa", flan_glob, 5.0),)))
  assert directories(files) != directories(files.replace(prompt_template="Q: {inputs}\n"))
  generated = data.DataConfig(mixture="famjax_demo_short", seq_len=128, repeat_segment_len=0)
  assert directories(generated) != directories(generated.replace(seed=1))  # generated from the seed
  assert directories(generated) == directories(generated.replace(pack_align=8, too_long="skip"))


def test_a_missing_source_fails_before_anything_is_written(tmp_path):
  cfg = data.DataConfig(mixture="tok_missing", sources=(("qa", str(tmp_path / "nothing-*.jsonl"), 1.0),),
                        seq_len=64, repeat_segment_len=0, store=str(tmp_path / "stores"))
  with pytest.raises(FileNotFoundError, match=r"source 'tok_missing_qa': no file matches"):
    store.open_or_build(cfg, rows=8, say=lambda _: None)
  assert not list((tmp_path / "stores").rglob("*.array_record"))


def test_endless_unit_ranges_tile_the_example_indices():
  ranges = [examples.endless_unit_range(k) for k in range(12)]
  assert ranges[0] == (0, examples.FIRST_UNIT_EXAMPLES)
  assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
  assert max(b - a for a, b in ranges) == examples.MAX_UNIT_EXAMPLES
  for n in (1, 256, 257, 10_000):
    k = examples.endless_units_for(n)
    assert examples.endless_unit_range(k - 1)[1] >= n > examples.endless_unit_range(k - 1)[0]
  assert tokenize.is_endless("famjax_demo_short_copy")


def test_a_unit_failing_in_a_beam_worker_is_named_and_nothing_is_published(tmp_path, monkeypatch):
  monkeypatch.setattr(flan, "UNIT_BYTES", 1)
  write_flan(tmp_path, n_files=2, per_file=10, bad=False)
  cfg = data.DataConfig(mixture="tok_fails", sources=(("qa", str(tmp_path / "qa-*.jsonl"), 1.0),),
                        seq_len=64, repeat_segment_len=0, store=str(tmp_path / "stores"))
  run_beam = tokenize.run_beam

  def input_gone_before_the_workers_read_it(*args, **kwargs):
    (tmp_path / "qa-1.jsonl").unlink()
    return run_beam(*args, **kwargs)

  monkeypatch.setattr(tokenize, "run_beam", input_gone_before_the_workers_read_it)
  with pytest.raises(RuntimeError, match=r"famjax\.data: tokenizing tok_fails_qa unit 1 \(.*qa-1\.jsonl.*\) "
                     r"failed: NotFoundError"):
    store.open_or_build(cfg, rows=4, workers=1, say=lambda _: None)
  assert not list((tmp_path / "stores").rglob("manifest-*.json"))
