"""The GPT-3 suite: rank classification picks the option of highest log-likelihood (the streamed
log-likelihoods checked against the parallel forward, the choices and accuracies against a unigram
model whose numbers are known by hand), the generation tasks score
exact match and F1 after SQuAD's normalisation, the JSON-lines files come through seqio with their
options and answers, `python -m famjax.eval --tasks=gpt3_rank,gpt3_gen` writes the metrics, and a
missing file fails at once naming what to prepare."""

import json
import math
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import famjax
from cli import run_main
from famjax import data
from famjax.data import gpt3, metrics
from famjax.evaluation import longcontext, rank, stream

# The GPT-3 tasks end to end: the full suite only (make test).
pytestmark = pytest.mark.slow

VOCAB = data.get_vocabulary("byte")


@pytest.fixture(scope="module")
def model():
  cfg = famjax.ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                           attention="fam", block_size=8, mem_segments=1, fam_len=2, dtype="float32",
                           remat="none")
  return famjax.Transformer(cfg, rngs=nnx.Rngs(0))


class Unigram:
  """A stand-in for a Transformer on the streaming path whose next token is z with probability 1/2, y
  with 1/4, any other of the 259 ids with 1/(4 * 257), whatever the text: log-likelihoods by hand."""

  P = {"z": 0.5, "y": 0.25}
  OTHER = 0.25 / 257

  def __init__(self):
    p = np.full(259, self.OTHER)
    for text, prob in self.P.items():
      p[VOCAB.encode(text)[0]] = prob
    self.logits = jnp.asarray(np.log(p), jnp.float32)
    self.config = SimpleNamespace(vocab_size=259, block_size=8)

  def init_state(self, batch_size):
    return jnp.zeros((batch_size,))

  def stream(self, tokens, state):
    return jnp.broadcast_to(self.logits, (*tokens.shape, 259)), state

  @classmethod
  def log_likelihood(cls, text: str) -> float:
    return sum(math.log(cls.P.get(c, cls.OTHER)) for c in text)


def write_jsonl(root, task, records, split="validation"):
  path = root / "gpt3" / task / f"{split}.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


# -- the metrics, by hand ---------------------------------------------------------------------------

def test_answer_normalisation():
  assert metrics.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
  assert metrics.normalize_answer("An apple, a day.") == "apple day"
  assert metrics.normalize_answer("  theory of THE\tmind ") == "theory of mind"  # 'theory' keeps 'the'
  assert metrics.normalize_answer("U.S.A.") == "usa"
  assert metrics.answer_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
  assert metrics.answer_f1("", "") == 1.0 and metrics.answer_f1("", "x") == 0.0
  assert metrics.answer_f1("blue", "red") == 0.0


def test_squad_takes_the_best_reference():
  scores = metrics.squad([["William Shakespeare", "Shakespeare"], ["Paris"], [], ["New York City"]],
                         ["shakespeare.", "Rome", "", "New York"])
  # EM: 1, 0, 1 (unanswerable, empty prediction), 0; F1: 1, 0, 1, 2 * 1 * (2/3) / (1 + 2/3) = 0.8
  assert scores["exact_match"] == pytest.approx(50.0)
  assert scores["f1"] == pytest.approx(100 * (1 + 0 + 1 + 0.8) / 4)


def test_rank_classification_by_hand():
  targets = [(0, [3, 3]), (1, [1, 10]), (2, [4, 4, 4])]
  scores = [[-1.0, -2.0], [-1.0, -5.0], [-3.0, -3.0, -3.0]]
  # sums: option 0, 0 (wrong), 0 (tie: first; wrong); per byte: 0, 1 (-0.5 > -1), 0 (wrong)
  assert metrics.rank_classification(targets, scores) == {"accuracy": pytest.approx(100 / 3),
                                                          "accuracy_norm": pytest.approx(200 / 3)}
  with pytest.raises(ValueError, match="3 scores for 2 options"):
    metrics.rank_classification([(0, [1, 1])], [[0.0, 0.0, 0.0]])


def test_answer_span():
  assert gpt3.answer_span(" Paris\nQ: next question", "line") == "Paris"
  assert gpt3.answer_span(" wolves. and then", "word") == "wolves."
  assert gpt3.answer_span("   ", "word") == ""


# -- log-likelihoods on the streaming path --------------------------------------------------------------

def test_option_log_likelihoods_equal_the_parallel_forward(model):
  context, options = "The sky is", [" blue", " green today", "!"]
  expected = []
  for option in options:
    ids = stream.with_bos(VOCAB.encode(context + option))
    log_probs = np.asarray(jax.nn.log_softmax(model(ids[None, :-1])[0], axis=-1))
    first = 1 + len(VOCAB.encode(context))  # index in ids of the option's first token
    expected.append(sum(log_probs[t - 1, ids[t]] for t in range(first, len(ids))))
  for chunk in (1, 8):
    lls = rank.option_log_likelihoods(model, VOCAB, [context] * 3, options, chunk)
    np.testing.assert_allclose(lls, expected, rtol=1e-4, atol=1e-4)
  assert rank.tokens_read(VOCAB, [context] * 3, options) == 1 + 10 + 4 + 11 + 0


def test_split_ids_takes_the_continuation_after_the_context():
  assert rank.split_ids(VOCAB, "ab", " c") == (VOCAB.encode("ab"), VOCAB.encode(" c"))
  assert rank.split_ids(VOCAB, "", "xy") == ([], VOCAB.encode("xy"))


def test_the_most_likely_option_wins(tmp_path):
  write_jsonl(tmp_path, "piqa", [
      {"context": "Question: pick one\nAnswer:", "options": ["zz", "zy", "yy"], "label": 0},
      {"context": "Question: another\nAnswer:", "options": ["ab", "zzz"], "label": 1},
      {"context": "Question: third\nAnswer:", "options": ["zzzz", "q"], "label": 1},
      {"contexts": ["The cup is z", "The cup is y"], "continuation": "zz", "label": 0},
      {"context": "Question: long or short\nAnswer:", "options": ["zzzzzz", "y"], "label": 0},
  ])
  [task] = longcontext.load_tasks("piqa", tfds_data_dir=str(tmp_path))
  assert task.rank_classification and len(task.examples) == 5
  ex = task.examples[3]
  assert [c.decode() for c in ex["option_contexts"]] == ["The cup is z", "The cup is y"]
  assert ex["inputs_pretokenized"] == "The cup is z" and ex["targets_pretokenized"] == "zz"
  result = longcontext.evaluate_task(Unigram(), VOCAB, task, chunk_size=8)
  rows = result["predictions"]
  options = [["zz", "zy", "yy"], ["ab", "zzz"], ["zzzz", "q"], ["zz", "zz"], ["zzzzzz", "y"]]
  for row, texts in zip(rows, options):
    np.testing.assert_allclose(row["log_likelihoods"], [Unigram.log_likelihood(t) for t in texts],
                               rtol=1e-5)
  # by hand: sums pick 0, 1, 0 (wrong), 0 (a tie: the first), 1 (6 log 1/2 < log 1/4: wrong);
  # per byte: the same but the last, log 1/2 > log 1/4 (right)
  assert [r["prediction"] for r in rows] == [0, 1, 0, 0, 1]
  assert [r["prediction_norm"] for r in rows] == [0, 1, 0, 0, 0]
  assert result["metrics"] == {"accuracy": pytest.approx(60.0), "accuracy_norm": pytest.approx(80.0)}


def test_generation_tasks_score_em_and_f1(tmp_path):
  write_jsonl(tmp_path, "triviaqa", [
      {"context": "Q: say z\nA:", "answers": ["zzzz", "b"]},
      {"context": "Q: say b\nA:", "answers": ["b"]},
      {"context": "Q: say z b\nA:", "answers": ["zzzz bbbb"]},
  ])
  [task] = longcontext.load_tasks("triviaqa", tfds_data_dir=str(tmp_path))
  result = longcontext.evaluate_task(Unigram(), VOCAB, task, max_new_tokens=4)  # greedy: zzzz
  assert [r["prediction"] for r in result["predictions"]] == ["zzzz"] * 3
  assert [r["target"] for r in result["predictions"]] == [["zzzz", "b"], ["b"], ["zzzz bbbb"]]
  assert result["metrics"] == {"exact_match": pytest.approx(100 / 3),
                               "f1": pytest.approx(100 * (1 + 0 + 2 / 3) / 3)}


# -- files, registration, errors ----------------------------------------------------------------------

def test_groups_and_task_names():
  assert len(gpt3.group_tasks("gpt3_rank")) == 19 and len(gpt3.group_tasks("gpt3_gen")) == 5
  assert {"hellaswag", "winogrande", "arc_challenge", "boolq"} <= set(gpt3.group_tasks("gpt3_rank"))
  assert set(gpt3.group_tasks("gpt3_gen")) == {"triviaqa", "natural_questions", "web_questions",
                                               "squad_v2", "lambada"}
  names = data.mixture_names()
  assert "gpt3_rank" in names and "gpt3_gen" in names and "hellaswag" in names


def test_a_bad_line_names_file_and_line(tmp_path):
  path = write_jsonl(tmp_path, "copa", [{"context": "c", "options": ["a", "b"], "label": 0},
                                         {"context": "c", "options": ["a", "b"], "label": 2}])
  with pytest.raises(ValueError, match=rf"copa: {path}:2: \"label\" must be an int in \[0, 2\)"):
    longcontext.load_tasks("copa", tfds_data_dir=str(tmp_path))
  path.write_text('{"context": "c", "options": ["a"], "label": 0}\n')
  with pytest.raises(ValueError, match=r":1: .*>= 2 options"):
    longcontext.load_tasks("copa", tfds_data_dir=str(tmp_path))
  path.write_text("not json\n")
  with pytest.raises(ValueError, match=r"copa: .*:1: "):
    longcontext.load_tasks("copa", tfds_data_dir=str(tmp_path))


def test_missing_data_fails_fast_with_the_preparation_steps(tmp_path):
  start = time.perf_counter()
  with pytest.raises(data.Gpt3DataNotFoundError) as info:
    longcontext.load_tasks("gpt3_rank", tfds_data_dir=str(tmp_path))
  message = str(info.value)
  assert time.perf_counter() - start < 5.0
  names = ", ".join(sorted(gpt3.group_tasks("gpt3_rank")))  # seqio lists a mixture's tasks sorted
  assert message.startswith(f"gpt3_rank: 19 tasks have no data ({names}). anli_r1: no data at "
                            f"{tmp_path / 'gpt3' / 'anli_r1' / 'validation.jsonl'}. ")
  assert "never downloads" in message and '"options": [str, ...], "label": int' in message
  assert "facebook/anli, test_r1" in message
  write_jsonl(tmp_path, "anli_r1", [{"context": "c", "options": ["a", "b"], "label": 0}])
  for task in gpt3.group_tasks("gpt3_rank"):
    (tmp_path / "gpt3" / task).mkdir(exist_ok=True)  # a directory without the split's file: missing
  with pytest.raises(data.Gpt3DataNotFoundError, match=r"^gpt3_rank: 18 tasks have no data \(anli_r2, "):
    longcontext.load_tasks("gpt3_rank", tfds_data_dir=str(tmp_path))
  with pytest.raises(data.Gpt3DataNotFoundError, match=r'^lambada: no data at .*"answers": \[str, ...\]'):
    longcontext.load_tasks("lambada", tfds_data_dir=str(tmp_path), split="test")


def test_shards_are_disjoint_and_complete(tmp_path):
  write_jsonl(tmp_path, "web_questions", [{"context": f"q{i}", "answers": [f"a{i}"]} for i in range(5)])
  cfg = data.DataConfig(mixture="web_questions", tfds_data_dir=str(tmp_path), repeat_segment_len=0)
  get = lambda i, n: [e["inputs_pretokenized"] for e in data.get_examples(cfg, process_index=i,  # noqa
                                                                           process_count=n)]
  assert get(0, 1) == [f"q{i}" for i in range(5)]
  assert get(0, 2) == ["q0", "q2", "q4"] and get(1, 2) == ["q1", "q3"]


# -- the command line ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  cfg = famjax.ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                           attention="fam", block_size=8, mem_segments=1, fam_len=2, dtype="float32",
                           remat="none")
  return famjax.to_hf(famjax.Transformer(cfg, rngs=nnx.Rngs(1)), tmp_path_factory.mktemp("hf") / "hf")


def cli(*flags):
  """famjax.eval's main in this process (tests/cli.py; tests/test_eval_cli.py runs it as a subprocess)."""
  return run_main("famjax.eval", list(flags))


def test_cli_runs_both_groups(hf_dir, tmp_path):
  for task in gpt3.group_tasks("gpt3_rank"):
    write_jsonl(tmp_path, task, [{"context": f"{task}?", "options": [" yes", " no"], "label": 1},
                                 {"contexts": ["A x", "A y"], "continuation": " z", "label": 0}])
  for task in gpt3.group_tasks("gpt3_gen"):
    write_jsonl(tmp_path, task, [{"context": f"Q: {task}\nA:", "answers": ["x"]},
                                 {"context": "Q: none\nA:", "answers": []}])
  out = tmp_path / "out"
  # chunks of one token: one compiled program for every text (24 tasks' worth of compiling otherwise);
  # a task named beside its group is evaluated once
  proc = cli(f"--model=m={hf_dir}", "--tasks=gpt3_rank,gpt3_gen,boolq", "--task_examples=1",
             "--max_new_tokens=3", "--chunk_size=1", f"--tfds_data_dir={tmp_path}", f"--out_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  tasks = json.loads((out / "results.json").read_text())["models"]["m"]["tasks"]
  assert set(tasks) == set(gpt3.SPECS)
  for name, spec in gpt3.SPECS.items():
    assert tasks[name]["n"] == 1
    keys = {"accuracy", "accuracy_norm"} if spec.kind == gpt3.RANK else {"exact_match", "f1"}
    assert set(tasks[name]["metrics"]) == keys, name
    if spec.kind == gpt3.RANK:
      [row] = tasks[name]["predictions"]
      assert row["label"] == 1 and len(row["log_likelihoods"]) == 2
      assert tasks[name]["metrics"]["accuracy"] == 100.0 * (row["prediction"] == 1)
  table = (out / "results.md").read_text()
  assert "| hellaswag | accuracy | 1 |" in table and "| triviaqa | f1 | 1 |" in table
  assert proc.stdout.count("m boolq: accuracy ") == 1


def test_cli_missing_data_is_one_line_exit_2(hf_dir, tmp_path):
  proc = cli(f"--model=m={hf_dir}", "--tasks=gpt3_gen", f"--tfds_data_dir={tmp_path}",
             f"--out_dir={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(
      "famjax.eval: error: gpt3_gen: 5 tasks have no data (lambada, natural_questions, squad_v2, "
      "triviaqa, web_questions). lambada: no data at "), lines
  assert str(tmp_path / "gpt3" / "lambada" / "validation.jsonl") in lines[0]
  assert "EleutherAI/lambada_openai" in lines[0]
