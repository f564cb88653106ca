"""The Isabelle task (the paper's Table 11): a TFDS dataset the user exports, scored like PG-19 by
next-token accuracy over every token of each theory, in-process and through `python -m famjax.eval`;
missing, it fails at once saying how to export it (it is not in the TFDS catalog)."""

import json
import time

import numpy as np
import pytest
from flax import nnx

import famjax
from famjax import data
from famjax.data import metrics
from famjax.data.tensorflow_setup import tf, tfds
from famjax.evaluation import longcontext, stream
from test_gpt3_tasks import cli

# The Isabelle task end to end: the full suite only (make test).
pytestmark = pytest.mark.slow

VOCAB = data.get_vocabulary("byte")
THEORIES = ['theory Foo imports Main begin\nlemma "x = x" by simp\nend\n',
            'theory Bar imports Foo begin\nlemma "True" by auto\nend\n']


@pytest.fixture(scope="module")
def model():
  cfg = famjax.ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                           attention="fam", block_size=8, mem_segments=1, fam_len=2, dtype="float32",
                           remat="none")
  return famjax.Transformer(cfg, rngs=nnx.Rngs(2))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A local stand-in for the exported corpus: TFDS dataset `isabelle`, one text feature."""
  directory = tmp_path_factory.mktemp("tfds")
  tfds.dataset_builders.store_as_tfds_dataset(
      name="isabelle", version="1.0.0", features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
      split_datasets={"validation": tf.data.Dataset.from_tensor_slices({"text": THEORIES})},
      data_dir=str(directory))
  return directory


def expected_accuracy(model, text_tokens=None):
  """By hand: the parallel forward over [BOS] + theory + EOS, argmax against the next token (over the
  first `text_tokens` tokens of each theory: None, all of them)."""
  targets, predictions = [], []
  for theory in THEORIES:
    ids = np.asarray(VOCAB.encode(theory) + [VOCAB.eos_id], np.int32)
    predictions.append(np.asarray(model(stream.with_bos(ids)[None, :-1]))[0].argmax(-1)[:text_tokens])
    targets.append(ids[:text_tokens])
  return metrics.next_token_accuracy(targets, predictions)


def test_next_token_accuracy_of_theories(model, data_dir):
  [task] = longcontext.load_tasks("isabelle", tfds_data_dir=str(data_dir))
  assert task.language_modelling and not task.rank_classification and len(task.examples) == 2
  expected = expected_accuracy(model)
  for chunk in (1, 8):
    result = longcontext.evaluate_task(model, VOCAB, task, chunk_size=chunk)
    assert result["metrics"] == pytest.approx(expected)
  assert [r["tokens"] for r in result["predictions"]] == [len(t) + 1 for t in THEORIES]


def test_text_tokens_scores_the_first_tokens_of_each_theory(model, data_dir):
  """PG-19 and Isabelle truncated to a fixed length: the first 20 tokens of each theory."""
  [task] = longcontext.load_tasks("isabelle", tfds_data_dir=str(data_dir))
  result = longcontext.evaluate_task(model, VOCAB, task, chunk_size=8, text_tokens=20)
  assert [r["tokens"] for r in result["predictions"]] == [20, 20]
  assert result["metrics"] == pytest.approx(expected_accuracy(model, text_tokens=20))
  with pytest.raises(ValueError, match="text_tokens"):
    longcontext.evaluate_task(model, VOCAB, task, text_tokens=-1)


def test_missing_isabelle_fails_fast_with_the_export_steps(tmp_path):
  start = time.perf_counter()
  with pytest.raises(data.TfdsNotPreparedError) as info:
    longcontext.load_tasks("isabelle", tfds_data_dir=str(tmp_path))
  assert time.perf_counter() - start < 5.0
  message = str(info.value)
  assert message.startswith(f"isabelle: the TFDS dataset 'isabelle:*.*.*' is not prepared in {tmp_path}.")
  assert "not in the TFDS catalog" in message and "text feature 'text'" in message
  assert "tfds build" not in message  # there is nothing to build it from


def test_cli(model, data_dir, tmp_path):
  hf = famjax.to_hf(model, tmp_path / "hf")
  proc = cli(f"--model=m={hf}", "--tasks=isabelle", "--chunk_size=8", f"--tfds_data_dir={data_dir}",
             f"--out_dir={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  task = json.loads((tmp_path / "out" / "results.json").read_text())["models"]["m"]["tasks"]["isabelle"]
  assert task["n"] == 2
  assert task["metrics"]["next_token_accuracy"] == pytest.approx(
      expected_accuracy(model)["next_token_accuracy"], abs=1e-6)
  assert "| isabelle | next_token_accuracy | 2 |" in (tmp_path / "out" / "results.md").read_text()
  short = cli(f"--model=m={hf}", "--tasks=isabelle", "--chunk_size=8", f"--tfds_data_dir={data_dir}",
              "--text_tokens=20", f"--out_dir={tmp_path / 'short'}")
  assert short.returncode == 0, short.stderr[-3000:]
  task = json.loads((tmp_path / "short" / "results.json").read_text())["models"]["m"]["tasks"]["isabelle"]
  assert task["metrics"]["next_token_accuracy"] == pytest.approx(
      expected_accuracy(model, text_tokens=20)["next_token_accuracy"], abs=1e-6)
