"""famjax.evaluation.recall: the recall suite scores each question by the model's predictions of its value
tokens, aligned with the text (an oracle scores 100%, the same oracle one token late 0%), per question,
per depth and per question place; a tiny model's streamed predictions are its parallel forward's; and
famjax.eval's runner writes the recall rows into results.json and results.md."""

import json
import types

import numpy as np
import pytest
from flax import nnx

import famjax
from famjax import data
from famjax.evaluation import recall, report, runner, stream

VOCAB = data.get_vocabulary("byte")


@pytest.fixture(scope="module")
def model():
  cfg = famjax.ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                           attention="fam", block_size=8, mem_segments=0, fam_len=2, dtype="float32",
                           remat="none")
  return famjax.Transformer(cfg, rngs=nnx.Rngs(0))


def _oracle(monkeypatch, task, total, late=0):
  """next_token_argmax replaced by the true next token of the example (`late`: of the one before)."""
  texts = [ex["text_ids"] for ex in recall.recall_examples(VOCAB, task, total, 4)]

  def argmax(model, tokens, chunk_size, progress=None):
    del model, chunk_size, progress
    out = []
    for row in tokens:
      bos = len(row) == len(texts[0])  # [BOS] + text[:-1]; without BOS, text[:-1]
      text = next(t for t in texts if np.array_equal(t[:-1], row[bos:]))
      nxt = text if bos else text[1:]
      out.append(np.roll(nxt, late)[:len(row)])
    return np.stack(out)

  monkeypatch.setattr(stream, "next_token_argmax", argmax)


@pytest.mark.parametrize("task", recall.TASKS)
@pytest.mark.parametrize("bos_id", [0, None])
def test_an_oracle_scores_every_question_and_one_token_late_none(monkeypatch, task, bos_id):
  fake = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=259, block_size=8))
  _oracle(monkeypatch, task, 256)
  right = recall.evaluate_recall(fake, VOCAB, task, 256, n_examples=4, bos_id=bos_id)
  queries = 1 if task == "multikey" else data.recall.MQAR.queries
  assert right["n"] == 4 * queries and right["n_examples"] == 4 and right["exact_match"] == 100.0
  assert all(r["prediction"] == r["target"] and len(r["target"]) == 5 for r in right["predictions"])
  _oracle(monkeypatch, task, 256, late=1)
  late = recall.evaluate_recall(fake, VOCAB, task, 256, n_examples=4, bos_id=bos_id)
  assert late["exact_match"] == 0.0 and late["n"] == right["n"]


def test_exact_match_per_question_depth_and_place(monkeypatch):
  fake = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=259, block_size=8))

  def answer(model, vocabulary, examples, chunk_size, bos_id=0, progress=None):
    # multikey: right on the first two examples; mqar: right on each example's first question only
    return [[v if i < 2 or (len(ex["values"]) > 1 and q == 0) else "00000"
             for q, v in enumerate(ex["values"])] for i, ex in enumerate(examples)]

  monkeypatch.setattr(recall, "answer", answer)
  multikey = recall.evaluate_recall(fake, VOCAB, "multikey", 512, n_examples=4)
  assert multikey["exact_match"] == 50.0 and multikey["n"] == 4
  assert [d["depth"] for d in multikey["per_depth"]] == pytest.approx([0, 1 / 3, 2 / 3, 1])
  assert [d["exact_match"] for d in multikey["per_depth"]] == [100, 100, 0, 0]
  mqar = recall.evaluate_recall(fake, VOCAB, "mqar", 512, n_examples=4)
  queries = data.recall.MQAR.queries
  assert mqar["n"] == 4 * queries and mqar["exact_match"] == pytest.approx(
      100 * (4 + 2 * (queries - 1)) / (4 * queries))  # examples 0, 1 right everywhere; 2, 3 first only
  assert [(q["query"], q["exact_match"]) for q in mqar["per_query"]] == [(0, 100.0)] + [
      (q, 50.0) for q in range(1, queries)]


def test_streamed_predictions_are_the_parallel_forwards(model):
  for task in recall.TASKS:
    examples = recall.recall_examples(VOCAB, task, 128, 2)
    for chunk in (7, 32):
      said = recall.answer(model, VOCAB, examples, chunk)
      for ex, values in zip(examples, said):
        logits = np.asarray(model(stream.with_bos(ex["text_ids"])[None, :-1]))[0]
        assert values == [VOCAB.decode(logits.argmax(-1)[s:e].tolist()) for s, e in ex["spans"]]
  texts = [ex.prompt + ex.answer for ex in data.recall.eval_examples(128, data.recall.MQAR, 2)]
  assert [ex["text_ids"].tolist() for ex in examples] == [VOCAB.encode(t) for t in texts]


def test_settings_refuse_what_cannot_be_evaluated():
  with pytest.raises(ValueError, match="unknown"):
    runner.Settings(recall_tasks=("keys",), recall_lengths=(512,))
  with pytest.raises(ValueError, match="go together"):
    runner.Settings(recall_tasks=("mqar",))
  with pytest.raises(ValueError, match="cannot hold"):
    runner.Settings(recall_tasks=("mqar",), recall_lengths=(64,))
  assert runner.Settings(recall_tasks=("multikey",), recall_lengths=(64,)).recall_examples == 10


def test_runner_writes_recall_rows(model, monkeypatch, tmp_path):
  monkeypatch.setattr(runner.load_lib, "load", lambda source: (model, {"kind": "test", "path": "-"}))
  monkeypatch.setattr(runner.load_lib, "check_vocabulary", lambda *a: None)
  settings = runner.Settings(recall_tasks=("multikey", "mqar"), recall_lengths=(128, 256),
                             recall_examples=2)
  source = types.SimpleNamespace(name="tiny", vocabulary="byte")
  plan = runner.Plan([source], settings, {"byte": VOCAB}, {"byte": []})
  runner.run(plan, tmp_path, log=lambda line: None)
  rows = json.loads((tmp_path / report.RESULTS_JSON).read_text())["models"]["tiny"]["recall"]
  assert [(r["task"], r["total_tokens"], r["n_examples"]) for r in rows] == [
      ("multikey", 128, 2), ("multikey", 256, 2), ("mqar", 128, 2), ("mqar", 256, 2)]
  md = (tmp_path / report.RESULTS_MD).read_text()
  assert "## Recall exact match (%, 2 examples per task and length)" in md
  assert f"| mqar | 256 | {2 * data.recall.MQAR.queries} |" in md and "| multikey | 128 | 2 |" in md
