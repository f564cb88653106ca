"""famjax.data sources: user data (bad records counted, empty sources named, few-shot prompts),
sharding across two simulated hosts, missing TFDS data failing fast, and idempotent registration."""

import json
import re
import time

import numpy as np
import pytest
import seqio

from famjax import data
from famjax.data import flan, longcontext, tasks
from famjax.data.tensorflow_setup import tf, tfds

# User sources, TFDS and vocabularies: the full suite only (make test).
pytestmark = pytest.mark.slow


def _example_bytes(fields):
  feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])) for k, v in fields.items()}
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _examples_of(batches, vocab):
  """The decoded (prompt, answer) of every packed example in the batches."""
  out = []
  for batch in batches:
    for targets, ids in zip(batch["targets"], batch["segment_ids"]):
      for s in np.unique(ids[ids > 0]):
        out.append(tuple(vocab.decode(targets[ids == s].tolist()).split("\n", 1)))
  return out


def test_two_hosts_read_disjoint_shards_that_together_are_complete(tmp_path):
  path = tmp_path / "qa.jsonl"
  with open(path, "w") as f:
    for i in range(50):
      f.write(json.dumps({"inputs": f"Q{i}", "targets": f"A{i}"}) + "\n")
      if i % 10 == 0:
        f.write('{"inputs": "no target"}\n')  # bad records are sharded too, and counted once
  cfg = data.DataConfig(mixture="shard_test", sources=(("qa", str(path), 1.0),), seq_len=64,
                        repeat_segment_len=0, prefetch=0)
  vocab = data.get_vocabulary(cfg)
  seen, missing = [], 0
  for host in range(2):
    with data.get_batches(cfg, batch_size=4, process_index=host, process_count=2,
                          num_epochs=1) as it:
      batches = list(it)
      stats = it.stats()["sources"]["shard_test_qa"]
    assert all(b["targets"].shape == (2, 64) for b in batches)  # per-host batch = 4 // 2
    seen.append({int(p[1:]) for p, a in _examples_of(batches, vocab) if a == "A" + p[1:]})
    missing += stats.get("skipped_missing_field", 0)
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(50))
  assert missing == 5


def test_synthetic_shards_are_disjoint_and_complete():
  """A generated stream is the same however it is sharded: host h gets examples h, h + n, ..."""
  cfg = data.DataConfig(mixture="famjax_demo_short_kv_lookup", seq_len=512, repeat_segment_len=0)
  one = [(e["inputs_pretokenized"], e["targets_pretokenized"])
         for e in data.get_examples(cfg, split="validation")]
  two = [[(e["inputs_pretokenized"], e["targets_pretokenized"])
          for e in data.get_examples(cfg, split="validation", process_index=h, process_count=2)]
         for h in range(2)]
  assert len(one) == 256 and two[0] == one[0::2] and two[1] == one[1::2]


def test_bad_records_are_counted_and_skipped_or_truncated(tmp_path):
  jsonl = tmp_path / "mixed.jsonl"
  lines = [json.dumps({"inputs": "good one", "targets": "yes"}).encode(),
           b'{"inputs": "caf\xe9", "targets": "latin-1"}',  # not UTF-8
           b'{"inputs": "half a record',  # not JSON
           json.dumps({"inputs": "no answer"}).encode(),
           json.dumps({"inputs": "null answer", "targets": None}).encode(),
           json.dumps({"inputs": "  ", "targets": "blank prompt"}).encode(),
           json.dumps({"inputs": "x" * 300, "targets": "too long"}).encode(),
           b"",  # a blank line is not a record
           json.dumps({"inputs": "good two", "targets": 2}).encode()]
  jsonl.write_bytes(b"\n".join(lines) + b"\n")
  record = tmp_path / "mixed.tfrecord"
  with tf.io.TFRecordWriter(str(record)) as w:
    w.write(_example_bytes({"inputs": b"tf good", "targets": b"ok"}))
    w.write(_example_bytes({"inputs": b"tf no target"}))
    w.write(_example_bytes({"inputs": b"\xff\xfe", "targets": b"bad bytes"}))
    w.write(b"not a tf.train.Example")
  expected = {
      "jsonl": {"read": 8, "skipped_non_utf8": 1, "skipped_bad_json": 1, "skipped_missing_field": 2,
                "skipped_empty_field": 1},
      "rec": {"read": 4, "skipped_missing_field": 1, "skipped_non_utf8": 1, "skipped_bad_record": 1},
  }
  for too_long, kind in (("truncate", "truncated"), ("skip", "skipped_too_long")):
    for name, path in (("jsonl", jsonl), ("rec", record)):
      cfg = data.DataConfig(mixture="bad_test", sources=((name, str(path), 1.0),), seq_len=128,
                            repeat_segment_len=0, too_long=too_long, prefetch=0)
      with data.get_batches(cfg, batch_size=1, num_epochs=1) as it:
        n_rows = len(list(it))
        stats = it.stats()["sources"][f"bad_test_{name}"]
      want = dict(expected[name])
      if name == "jsonl":
        want[kind] = 1
      assert stats == dict(sorted(want.items()))
      if kind == "skipped_too_long" or name == "rec":
        assert n_rows == 1  # the good examples share one row


def test_a_source_that_yields_nothing_is_an_error_naming_it(tmp_path):
  empty = tmp_path / "empty.jsonl"
  empty.write_text('{"inputs": "", "targets": "x"}\n{"oops": 1}\n')
  good = tmp_path / "good.jsonl"
  good.write_text('{"inputs": "q", "targets": "a"}\n')
  cfg = data.DataConfig(mixture="empty_test", seq_len=64, repeat_segment_len=0,
                        sources=(("good", str(good), 1.0), ("hollow", str(empty), 1.0)))
  with pytest.raises(ValueError, match=r"'empty_test_hollow'.*yields nothing.*1 empty_field, "
                                       r"1 missing_field"):
    data.get_batches(cfg, batch_size=1)
  missing = cfg.replace(sources=(("gone", str(tmp_path / "nope*.jsonl"), 1.0),))
  with pytest.raises(FileNotFoundError, match="'empty_test_gone'"):
    data.get_batches(missing, batch_size=1)
  one = cfg.replace(sources=(("one", str(good), 1.0),))  # one record: host 1's shard is empty
  with pytest.raises(ValueError, match="'empty_test_one'.*shard 1 of 2"):
    data.get_batches(one, batch_size=2, process_index=1, process_count=2)


def test_few_shot_prompts_put_earlier_records_first(tmp_path):
  fmt = flan.FlanFormat(few_shot=2, prompt_template="Q: {inputs}\nA:", exemplar_separator="\n\n")
  prompt, answer = flan.format_example(("3+3", " 6"), [("1+1", " 2"), ("2+2", " 4")], fmt)
  assert prompt == "Q: 1+1\nA: 2\n\nQ: 2+2\nA: 4\n\nQ: 3+3\nA:" and answer == " 6"
  path = tmp_path / "fs.jsonl"
  path.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(4)))
  cfg = data.DataConfig(mixture="few_shot_test", sources=(("fs", str(path), 1.0),), few_shot=2,
                        inputs_key="q", targets_key="a", seq_len=64, repeat_segment_len=0)
  prompts = [e["inputs_pretokenized"] for e in data.get_examples(cfg, split="train")]
  assert prompts == ["q0\n", "q0\na0\n\nq1\n", "q0\na0\n\nq1\na1\n\nq2\n",
                     "q1\na1\n\nq2\na2\n\nq3\n"]


@pytest.mark.parametrize("task", sorted(longcontext.SPECS))
def test_a_missing_tfds_dataset_fails_fast_with_instructions(tmp_path, task):
  cfg = data.DataConfig(mixture=task, seq_len=1024, repeat_segment_len=0, tfds_data_dir=str(tmp_path))
  start = time.perf_counter()
  with pytest.raises(longcontext.TfdsNotPreparedError) as info:
    data.get_batches(cfg, batch_size=1, split="validation")
  assert time.perf_counter() - start < 5.0
  message = str(info.value)
  assert task in message and str(tmp_path) in message and "TFDS_DATA_DIR" in message
  if longcontext.SPECS[task].catalog:
    assert re.search(r"tfds build \w+", message)
  else:  # xlsum, isabelle: how to export it instead of a build command that cannot work
    assert "not in the TFDS catalog" in message and "tfds build" not in message
  assert not any(tmp_path.iterdir())  # nothing was written (no download started)


def test_prepared_tfds_data_is_read_as_eval_task_and_as_user_source(tmp_path):
  """A small dataset stored in TFDS format stands in for a prepared XLSum (and a Flan export)."""
  texts = [f"article {i} " * 5 for i in range(12)]
  summaries = [f"summary {i}" if i % 4 else "" for i in range(12)]  # 3 without a summary
  split = tf.data.Dataset.from_tensor_slices({"text": texts, "summary": summaries})
  features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "summary": tfds.features.Text()})
  tfds.dataset_builders.store_as_tfds_dataset(
      name="xlsum", version="1.0.0", config="english", features=features,
      split_datasets={"validation": split}, data_dir=str(tmp_path))
  cfg = data.DataConfig(mixture="xlsum", seq_len=256, repeat_segment_len=0, tfds_data_dir=str(tmp_path))
  examples = list(data.get_examples(cfg, split="validation"))
  assert sorted(e["targets_pretokenized"] for e in examples) == sorted(s for s in summaries if s)
  assert all(e["inputs_pretokenized"].startswith("Summarize the article.\narticle") for e in examples)
  with data.get_batches(cfg, batch_size=2, split="validation", num_epochs=1) as it:
    assert sum(int((b["weights"] == 1).sum()) for b in it) == sum(len(s) + 1 for s in summaries if s)
    assert it.stats()["sources"]["xlsum"] == {"skipped_empty_field": 3}
  export = str(tmp_path / "xlsum" / "english" / "1.0.0")
  user = data.DataConfig(mixture="tfds_dir_test", sources=(("x", export, 1.0),), inputs_key="text",
                         targets_key="summary", seq_len=256, repeat_segment_len=0)
  answers = [e["targets_pretokenized"] for e in data.get_examples(user, split="validation")]
  assert sorted(answers) == sorted(s for s in summaries if s)


def test_registration_is_idempotent_and_follows_the_config(tmp_path):
  data.register_builtins()
  data.register_builtins()
  a = tmp_path / "a.jsonl"
  a.write_text('{"inputs": "q", "targets": "a"}\n')
  b = tmp_path / "b.jsonl"
  b.write_text('{"inputs": "q", "targets": "b"}\n')
  cfg = data.DataConfig(mixture="reg_test", sources=(("s", str(a), 1.0),), seq_len=64,
                        repeat_segment_len=0)
  assert tasks.ensure_registered(cfg) == "reg_test"
  task = seqio.TaskRegistry.get("reg_test_s")
  assert tasks.ensure_registered(cfg.replace(seq_len=128)) == "reg_test"
  assert seqio.TaskRegistry.get("reg_test_s") is task  # same definition: untouched
  tasks.ensure_registered(cfg.replace(sources=(("s", str(b), 1.0),)))
  assert seqio.TaskRegistry.get("reg_test_s") is not task  # another path: replaced
  with pytest.raises(ValueError, match="DataConfig.mixture"):
    tasks.ensure_registered(cfg.replace(mixture="famjax_demo"))
  with pytest.raises(ValueError, match="DataConfig.mixture: unknown"):
    tasks.ensure_registered(data.DataConfig(mixture="no_such_mixture"))


def test_config_errors_name_the_field():
  for field, value in [("seq_len", 0), ("too_long", "drop"), ("prompt_template", "no slot"),
                       ("repeat_segment_len", 600), ("sources", [("a b", "x", 1.0)]),
                       ("repeat_segment_weight", -1.0), ("pack", 1)]:
    with pytest.raises(ValueError, match=f"DataConfig.{field}"):
      data.DataConfig(seq_len=1024 if field != "seq_len" else value,
                      **({field: value} if field != "seq_len" else {}))
  cfg = data.DataConfig(sources=[["a", "x.jsonl", 2]])
  assert cfg.sources == (("a", "x.jsonl", 2.0),)


def test_a_sentencepiece_vocabulary_gets_its_own_tasks(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  text = tmp_path / "text.txt"
  text.write_text("\n".join(f"the key {i} is {i * 7} and the sky is blue" for i in range(300)))
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=64,
                                 model_type="bpe", minloglevel=2)
  cfg = data.DataConfig(mixture="famjax_demo_short", vocabulary=str(tmp_path / "sp.model"),
                        seq_len=256, repeat_segment_len=16, prefetch=0)
  vocab = data.get_vocabulary(cfg)
  assert vocab.vocab_size == 64
  with data.get_batches(cfg, batch_size=2) as it:
    batch = next(it)
    assert it.mixture.startswith("famjax_demo_short.spm_")
  assert batch["targets"].max() < 64 and (batch["weights"] == 1).any()
