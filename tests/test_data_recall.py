"""The recall suite's data (famjax.data.recall): examples are deterministic, exact in length in the byte
vocabulary, hold their needles and questions where the format says, the answer can be read off the
prompt, and the seqio tasks yield them."""

import re

import numpy as np
import pytest

from famjax import data
from famjax.data import passkey, recall, tasks

VOCAB = data.get_vocabulary("byte")
NEEDLE = re.compile(r"#([a-z]{2})=(\d{5})")


def _solve(prompt: str) -> str:
  """The answer read off a prompt: the value of the needle named by the last question."""
  values = dict(NEEDLE.findall(prompt))
  assert len(values) == len(NEEDLE.findall(prompt))  # names are distinct
  return values[prompt[-3:-1]]


@pytest.mark.parametrize("fmt", [recall.MULTIKEY, recall.MQAR])
def test_examples_are_deterministic_and_answered_by_their_prompt(fmt):
  a = recall.make_example(7, 300, fmt)
  assert a == recall.make_example(7, 300, fmt) and a != recall.make_example(8, 300, fmt)
  for seed in range(30):
    ex = recall.make_example(seed, 300, fmt)
    assert ex.prompt.endswith("=") and ex.prompt[-4] == "?" and _solve(ex.prompt) == ex.answer
    assert len(NEEDLE.findall(ex.prompt)) == fmt.keys and ex.prompt.count("?") == fmt.queries
    assert len({v for _, v in NEEDLE.findall(ex.prompt)}) == fmt.keys  # values are distinct
    filler = re.sub(r"[#?][a-z]{2}=\d{5}", "", ex.prompt + ex.answer)
    assert len(filler) == 300 and set(filler) <= set(passkey.FILLER_ALPHABET)
    text = ex.prompt + ex.answer
    assert text[ex.spans[-1][0]:ex.spans[-1][1]] == ex.answer and ex.spans[-1][1] == len(text)


def test_multikey_puts_the_asked_needle_at_the_depth():
  for depth in (0.0, 0.25, 1.0):
    ex = recall.make_example(np.random.default_rng(1), 400, recall.MULTIKEY, depth)
    start = ex.prompt.index(f"#{ex.prompt[-3:-1]}=")
    before = re.sub(r"#[a-z]{2}=\d{5}", "", ex.prompt[:start])  # the filler before the asked needle
    assert len(before) == round(depth * 400) and ex.depth == depth
  depths = [recall.make_example(s, 100, recall.MULTIKEY).depth for s in range(200)]
  assert min(depths) < 0.1 and max(depths) > 0.9


def test_mqar_pairs_come_first_and_every_question_is_answered_in_sequence():
  ex = recall.make_example(3, 200, recall.MQAR)
  pairs = dict(NEEDLE.findall(ex.prompt[:recall.MQAR.keys * 9]))
  assert len(pairs) == recall.MQAR.keys  # all the pairs before any filler
  text = ex.prompt + ex.answer
  asked = re.findall(r"\?([a-z]{2})=", text)
  assert len(asked) == len(set(asked)) == recall.MQAR.queries
  assert [text[s:e] for s, e in ex.spans] == [pairs[name] for name in asked]
  assert all(text[s - 4] == "?" and text[s - 1] == "=" for s, _ in ex.spans)
  assert ex.spans[0][0] > recall.MQAR.keys * 9 + 200  # the questions come after the filler
  with pytest.raises(ValueError, match="depth 0"):
    recall.make_example(3, 200, recall.MQAR, 0.5)


@pytest.mark.parametrize("fmt", [recall.MULTIKEY, recall.MQAR])
def test_eval_examples_have_the_asked_length_and_are_lazy(fmt):
  for total in (128, 2048):
    pairs = list(recall.make_eval_examples(total, fmt, 4)("validation", 0, 0, 1, None))
    assert [len(VOCAB.encode(p)) + len(VOCAB.encode(a)) + 1 for p, a in pairs] == [total] * 4
  assert not isinstance(recall.make_eval_examples(1 << 20, fmt)("validation", 0, 0, 1, None), list)
  if fmt is recall.MULTIKEY:  # the asked needle sweeps the depth
    assert [ex.depth for ex in recall.eval_examples(2048, fmt, 4)] == pytest.approx([0, 1 / 3, 2 / 3, 1])
  with pytest.raises(ValueError, match="cannot hold"):
    recall.filler_chars_for_total(recall.overhead_chars(fmt), fmt)


def test_seqio_tasks_yield_the_examples():
  for name in ("multikey_small", "mqar_small", "recall_small", "multikey_2k", "mqar_64k"):
    assert name in data.mixture_names()
  assert sorted(rate for _, rate in tasks.rates_of("recall_small")) == [1.0, 1.0]
  assert {t for t, _ in tasks.rates_of("recall_small")} == set(recall.TRAIN_TASKS)
  for task in recall.TRAIN_TASKS:
    cfg = data.DataConfig(mixture=task, seq_len=512, repeat_segment_len=0)
    lengths = set()
    for ex, _ in zip(data.get_examples(cfg, split="train"), range(40)):
      prompt, answer = ex["inputs_pretokenized"], ex["targets_pretokenized"]
      assert _solve(prompt) == answer and VOCAB.decode(ex["targets"].tolist()) == answer
      assert prompt.count("?") == recall.TRAIN_TASKS[task][1].queries
      lengths.add(len(ex["inputs"]) + len(ex["targets"]))  # the targets end with EOS
    assert lengths == set(recall.TRAIN_TOTALS)
  cfg = data.DataConfig(mixture="mqar_512", seq_len=512, repeat_segment_len=0)
  ours = [(ex.prompt, ex.answer) for ex in recall.eval_examples(512, recall.MQAR)]
  theirs = [(e["inputs_pretokenized"], e["targets_pretokenized"])
            for e in data.get_examples(cfg, split="validation")]
  assert theirs == ours and len(ours) == recall.EVAL_EXAMPLES
