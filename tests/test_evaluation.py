"""famjax.evaluation: PassKey and long-context evaluation on the streaming path give the numbers of the
parallel forward for any chunk size; the PassKey examples are the seqio tasks'; missing data fails fast;
progress, lengths and reports."""

import io
import time

import numpy as np
import pytest
from flax import nnx

import famjax
from famjax import data
from famjax.data import metrics
from famjax.data.tensorflow_setup import tf, tfds
from famjax.evaluation import lengths, longcontext, passkey, progress, report, stream

VOCAB = data.get_vocabulary("byte")
CHUNKS = (1, 7, 8, 24)  # one token, crossing blocks, one block, several blocks


@pytest.fixture(scope="module")
def model():
  cfg = famjax.ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                           attention="fam", block_size=8, mem_segments=1, fam_len=2, dtype="float32",
                           remat="none")
  return famjax.Transformer(cfg, rngs=nnx.Rngs(0))


def test_streaming_primitives_equal_the_parallel_forward(model):
  tokens = np.random.RandomState(0).randint(3, 259, (1, 29)).astype(np.int32)
  logits = np.asarray(model(tokens))
  for chunk in CHUNKS:
    np.testing.assert_array_equal(stream.next_token_argmax(model, tokens, chunk), logits.argmax(-1))
    last, state = stream.read_prompt(model, tokens, chunk)
    np.testing.assert_allclose(np.asarray(last), logits[:, -1], rtol=1e-5, atol=1e-5)
    greedy = stream.greedy_continue(model, state, last, 5)
    # greedy: every generated token is the parallel forward's argmax after the text before it
    text = np.concatenate([tokens, greedy], axis=1)
    np.testing.assert_array_equal(greedy, np.asarray(model(text))[:, 28:-1].argmax(-1))


def test_chunk_bounds_use_few_shapes():
  assert stream.chunk_bounds(45, 16) == [(0, 16), (16, 32), (32, 40), (40, 44), (44, 45)]
  assert stream.chunk_bounds(32, 16) == [(0, 16), (16, 32)]
  sizes = {e - s for n in range(1, 300) for s, e in stream.chunk_bounds(n, 64)}
  assert sizes == {64, 32, 16, 8, 4, 2, 1}
  assert stream.rows_per_call(4096, 256_000) == 1 and stream.rows_per_call(32, 259) > 1000


def test_passkey_examples_are_the_seqio_tasks():
  ours = passkey.passkey_examples(VOCAB, 2048, 10, seed=0)
  cfg = data.DataConfig(mixture="passkey_2k", seq_len=2048, repeat_segment_len=0)
  theirs = list(data.get_examples(cfg, split="validation"))
  assert [(e["prompt"], e["answer"]) for e in ours] == [
      (e["inputs_pretokenized"], e["targets_pretokenized"]) for e in theirs]
  assert all(len(e["prompt_ids"]) + len(VOCAB.encode(e["answer"])) + 1 == 2048 for e in ours)
  assert [e["depth"] for e in ours] == pytest.approx(np.linspace(0, 1, 10))


def test_passkey_exact_match_against_hand_values():
  targets, predictions, exact = passkey.score(
      [" 12345", " 54321", " 11111"], [" 12345 is the key", "54321.", "the key is 1111"])
  assert targets == ["12345", "54321", "11111"] and predictions == ["12345", "54321", "1111"]
  assert exact == pytest.approx(200 / 3)


@pytest.mark.slow
def test_passkey_gives_the_same_numbers_for_every_chunk_size(model):
  results = [passkey.evaluate_passkey(model, VOCAB, 300, n_examples=3, chunk_size=c) for c in (1, 24)]
  assert results[0]["predictions"] == results[1]["predictions"]
  r = results[0]
  assert r["n"] == 3 and r["total_tokens"] == 300 and r["filler_tokens"] > 0
  assert [d["depth"] for d in r["per_depth"]] == [0.0, 0.5, 1.0]
  assert r["exact_match"] == pytest.approx(np.mean([p["correct"] for p in r["predictions"]]) * 100)
  # batched as one: each example alone gives the same continuation
  ex = passkey.passkey_examples(VOCAB, 300, 3)[2]
  last, state = stream.read_prompt(model, stream.with_bos(ex["prompt_ids"])[None], 24)
  alone = stream.greedy_continue(model, state, last, len(ex["answer"]) + passkey.EXTRA_TOKENS, (1,))
  assert r["predictions"][2]["output"] == VOCAB.decode(stream.cut_at_stop(alone[0], (1,)))


def _store(tmp_path, name, version, features, rows, config=None):
  split = tf.data.Dataset.from_tensor_slices(rows)
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, config=config, features=tfds.features.FeaturesDict(features),
      split_datasets={"validation": split}, data_dir=str(tmp_path))


@pytest.mark.slow
def test_a_generation_task_on_local_tfds_data(model, tmp_path):
  text = tfds.features.Text()
  _store(tmp_path, "xlsum", "1.0.0", {"text": text, "summary": text},
         {"text": [f"article {i} about the sky. " * 3 for i in range(4)],
          "summary": [f"summary {i}" for i in range(4)]}, config="english")
  [task] = longcontext.load_tasks("xlsum", tfds_data_dir=str(tmp_path), max_examples=3)
  assert task.name == "xlsum" and len(task.examples) == 3 and not task.language_modelling
  results = [longcontext.evaluate_task(model, VOCAB, task, chunk_size=c, max_new_tokens=6)
             for c in (7, 16)]
  assert results[0]["predictions"] == results[1]["predictions"]
  rows = results[0]["predictions"]
  assert len({r["target"] for r in rows} & {f"summary {i}" for i in range(4)}) == 3
  assert results[0]["metrics"] == metrics.rouge_l([r["target"] for r in rows],
                                                  [r["prediction"] for r in rows])


@pytest.mark.slow
def test_next_token_accuracy_of_a_book_on_local_tfds_data(model, tmp_path):
  text = tfds.features.Text()
  books = ["the sky is blue. " * 6, "the grass is green. " * 3]
  _store(tmp_path, "pg19", "0.1.1",
         {"book_id": tf.int32, "book_link": text, "book_text": text, "book_title": text,
          "publication_date": text},
         {"book_id": [1, 2], "book_link": ["a", "b"], "book_text": books, "book_title": ["x", "y"],
          "publication_date": ["1900", "1901"]})
  [task] = longcontext.load_tasks("pg19", tfds_data_dir=str(tmp_path))
  assert task.language_modelling
  # by hand: the parallel forward over [BOS] + book + EOS, argmax against the next token
  targets, predictions = [], []
  for book in books:
    ids = np.asarray(VOCAB.encode(book) + [VOCAB.eos_id], np.int32)
    text_ids = stream.with_bos(ids)
    predictions.append(np.asarray(model(text_ids[None, :-1]))[0].argmax(-1))
    targets.append(ids)
  expected = metrics.next_token_accuracy(targets, predictions)
  for chunk in CHUNKS:
    result = longcontext.evaluate_task(model, VOCAB, task, chunk_size=chunk)
    assert result["metrics"] == pytest.approx(expected)
  assert [r["tokens"] for r in result["predictions"]] == [len(t) for t in targets]


@pytest.mark.slow
def test_generation_stops_at_eos(model):
  params = model.params_dict()
  params["lm_head"] = params["lm_head"].at[:, VOCAB.eos_id].add(100.0)  # EOS always wins
  eos_model = famjax.Transformer(model.config, params=params)
  task = longcontext.TaskData("always_eos", "validation", (
      {"inputs": np.asarray(VOCAB.encode("a question"), np.int32), "targets": np.asarray([5, 1]),
       "targets_pretokenized": "b"},), (metrics.exact_match,), lambda text, **_: text)
  result = longcontext.evaluate_task(eos_model, VOCAB, task, max_new_tokens=50)
  assert result["predictions"] == [{"prompt_tokens": 10, "target": "b", "prediction": "",
                                    "generated_tokens": 0}]
  assert result["metrics"] == {"exact_match": 0.0}


def test_a_missing_dataset_or_unknown_task_fails_fast(tmp_path):
  start = time.perf_counter()
  with pytest.raises(data.TfdsNotPreparedError, match=str(tmp_path)):
    longcontext.load_tasks("scrolls_quality", tfds_data_dir=str(tmp_path))
  assert time.perf_counter() - start < 5.0
  with pytest.raises(ValueError, match="unknown mixture or task 'no_such_task'"):
    longcontext.load_tasks("no_such_task")


def test_progress_line_and_eta():
  assert progress.format_duration(3725) == "1h02m05s" and progress.format_duration(65) == "1m05s"
  assert progress.progress_line("pk", 2048, 8192, 2.0) == (
      "pk: 2,048/8,192 tokens (25%), 1,024 tok/s, ETA 6s")
  assert progress.progress_line("pk", 8192, 8192, 4.0) == "pk: 8,192 tokens in 4s, 2,048 tok/s"
  out = io.StringIO()
  p = progress.Progress("pk", stream=out, interval=0.0)
  p.start(100)
  p.advance(40)
  p.advance(60)
  p.finish()
  lines = out.getvalue().splitlines()
  assert len(lines) == 2 and lines[0].startswith("pk: 40/100 tokens (40%)") and "ETA" in lines[0]
  assert lines[1].startswith("pk: 100 tokens in")


def test_length_specs():
  assert lengths.parse_lengths("1k,2k,...,16k") == [1024, 2048, 4096, 8192, 16384]
  assert lengths.parse_lengths("2k,4k,...,1m")[-1] == 1 << 20
  assert lengths.parse_lengths("300, 512,1M") == [300, 512, 1 << 20]
  assert [lengths.format_length(n) for n in (2048, 1 << 20, 1000)] == ["2k", "1m", "1000"]
  for bad in ("2x", "", "0", "1k,...,4k", "1k,3k,...,16k", "1k,2k,...,5k", "1k,1k"):
    with pytest.raises(ValueError, match="bad length"):
      lengths.parse_lengths(bad)


def test_reports(tmp_path):
  def pk(total, filler, exact, per_depth=()):
    return {"total_tokens": total, "filler_tokens": filler, "exact_match": exact,
            "per_depth": [{"depth": d, "n": 1, "exact_match": e} for d, e in per_depth]}
  results = {"settings": {"passkey_examples": 10}, "models": {
      "fam": {"info": {"kind": "famjax workdir", "path": "/w/fam", "step": 5, "model": {}},
              "passkey": [pk(2048, 1802, 100.0), pk(4096, 3850, 90.0, [(0.0, 0.0), (0.2, 100.0),
                                                                         (0.5, 100.0), (1.0, 100.0)])],
              "tasks": {"xlsum": {"n": 3, "metrics": {"rougeL": 12.345}}}},
      "bswa": {"info": {"kind": "Hugging Face directory", "path": "/h", "model": {}},
               "passkey": [pk(2048, 1802, 100.0 / 3, [(0.0, 0.0), (0.5, 0.0), (1.0, 100.0)])],
               "tasks": {}}}}
  assert report.passkey_table(results).splitlines() == [
      "| tokens | filler tokens | fam | bswa |", "|---|---:|---:|---:|",
      "| 2k | 1,802 | 100 | 33.3 |", "| 4k | 3,850 | 90 | - |"]
  assert report.passkey_depth_table(results).splitlines() == [
      "| key depth (2k, 4k tokens) | fam | bswa |", "|---|---:|---:|",
      "| 0.00-0.25 | 50 (2) | 0 (1) |", "| 0.25-0.50 | - | - |", "| 0.50-0.75 | 100 (1) | 0 (1) |",
      "| 0.75-1.00 | 100 (1) | 100 (1) |"]
  assert report.tasks_table(results).splitlines()[2] == "| xlsum | rougeL | 3 | 12.3 |"
  written = report.write_all(results, tmp_path / "out")
  assert [p.name for p in written] == ["results.json", "results.md", "passkey.png"]
  assert (tmp_path / "out" / "passkey.png").read_bytes()[:4] == b"\x89PNG"
  assert report.short_count(1802) == "1.76k" and report.short_count(1048330) == "1m"
  assert report.short_count(500) == "500"
