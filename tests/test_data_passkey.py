"""PassKey (spec §8): the key is where the example says, lengths are exact, generation is
deterministic and lazy, and the exact-match metric reads the key out of a generated answer."""

import numpy as np
import pytest

from famjax import data
from famjax.data import passkey, synthetic

# The PassKey and synthetic tasks: the full suite only (make test).
pytestmark = pytest.mark.slow

LONGEST_FILLER_SENTENCE = max(len(s) + 2 for s in passkey.FILLER.split(". "))


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_the_key_is_at_the_stated_depth(depth):
  filler = 3000
  ex = passkey.make_example(np.random.default_rng(5), filler_chars=filler, depth=depth)
  key = str(ex.key)
  assert len(key) == passkey.KEY_DIGITS and ex.answer == f" {key}"
  assert ex.prompt[ex.key_offset:ex.key_offset + len(key)] == key
  assert ex.prompt.count(key) == 2  # "The pass key is K. Remember it. K is the pass key."
  assert ex.prompt.startswith(passkey.INTRO) and ex.prompt.endswith(passkey.QUESTION)
  assert len(ex.prompt) == len(passkey.INTRO) + filler + len(passkey.needle(ex.key)) \
      + len(passkey.QUESTION)
  where = ex.key_offset - len("The pass key is ") - len(passkey.INTRO)  # filler before the key
  assert depth * filler - LONGEST_FILLER_SENTENCE <= where <= depth * filler


def test_examples_are_deterministic_by_seed_and_random_depth_is_uniformish():
  a = passkey.make_example(11, filler_chars=500)
  assert a == passkey.make_example(11, filler_chars=500)
  assert a != passkey.make_example(12, filler_chars=500)
  depths = [passkey.make_example(s, filler_chars=100).depth for s in range(200)]
  assert 0.35 < np.mean(depths) < 0.65 and min(depths) < 0.1 and max(depths) > 0.9


def test_eval_tasks_have_exact_length_and_sweep_the_depth():
  cfg = data.DataConfig(mixture="passkey_2k", seq_len=2048, repeat_segment_len=0)
  vocab = data.get_vocabulary(cfg)
  examples = list(data.get_examples(cfg, split="validation"))
  assert len(examples) == passkey.EVAL_EXAMPLES
  offsets = []
  for ex in examples:
    assert len(ex["inputs"]) + len(ex["targets"]) == 2048  # prompt + answer + EOS
    key = passkey.postprocess(ex["targets_pretokenized"])
    assert ex["inputs_pretokenized"].count(key) == 2
    assert vocab.decode(ex["targets"].tolist()) == f" {key}"
    offsets.append(ex["inputs_pretokenized"].index(key))
  assert offsets == sorted(offsets) and offsets[-1] - offsets[0] > 1500  # depth 0 -> 1
  with data.get_batches(cfg, batch_size=2, num_epochs=1) as it:  # one example per 2k row
    batches = list(it)
  assert len(batches) == 5 and all((b["segment_ids"] == 1).all() for b in batches)


def test_eval_tasks_up_to_1m_are_registered_and_lazy():
  names = data.mixture_names()
  for name in ("passkey_4k", "passkey_64k", "passkey_1m", "passkey_train"):
    assert name in names
  make = passkey.make_eval_examples(passkey.EVAL_LENGTHS["passkey_1m"], data.get_vocabulary("byte"))
  examples = make("validation", 0, 0, 1, None)  # a generator: nothing is built until asked for
  assert not isinstance(examples, (list, tuple))
  assert passkey.filler_chars_for_total(1 << 20, data.get_vocabulary("byte")) > 1_040_000


def test_training_passkey_draws_filler_lengths_from_the_range():
  make = passkey.make_train_examples((100, 300), data.get_vocabulary("byte"))
  stream = make("train", 0, 0, 1, None)
  lengths = [len(next(stream)[0]) for _ in range(50)]
  overhead = len(passkey.INTRO) + len(passkey.needle(10000)) + len(passkey.QUESTION)
  assert all(100 <= n - overhead <= 300 for n in lengths) and len(set(lengths)) > 10


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_short_format_puts_the_key_once_and_can_put_it_next_to_the_question(depth):
  short = passkey.SHORT
  ex = passkey.make_example(np.random.default_rng(3), filler_chars=400, depth=depth, fmt=short)
  key = str(ex.key)
  assert ex.prompt.count(key) == 1 and ex.prompt[ex.key_offset:ex.key_offset + 5] == key
  assert ex.prompt.endswith("\nThe pass key:") and ex.answer == key
  assert ex.prompt.count(":") == 2 and ex.prompt[ex.key_offset - 1] == ":"
  assert len(ex.prompt) == 400 + len(f"The pass key:{key}. ") + len("\nThe pass key:")
  if depth == 1.0:  # the key ends at most a filler sentence + 16 characters before the prompt does
    assert len(ex.prompt) - (ex.key_offset + 5) <= len(". \nThe pass key:") + LONGEST_FILLER_SENTENCE


def test_short_format_eval_examples_have_the_asked_length():
  vocab = data.get_vocabulary("byte")
  make = passkey.make_eval_examples(1000, vocab, n_examples=3, fmt=passkey.SHORT)
  pairs = list(make("validation", 0, 0, 1, None))
  assert len(pairs) == 3
  for prompt, answer in pairs:
    assert len(vocab.encode(prompt)) + len(vocab.encode(answer)) + 1 == 1000  # + EOS
    assert not prompt.startswith(passkey.INTRO)
  with pytest.raises(ValueError, match="unknown PassKey format 'long'"):
    passkey.get_format("long")


def test_exact_match_metric_reads_the_key_from_generated_text():
  targets = [passkey.postprocess(" 12345"), passkey.postprocess(" 55555")]
  predictions = [passkey.postprocess(" 12345. Remember it."), passkey.postprocess(" 5555")]
  assert data.exact_match(targets, predictions) == {"exact_match": 50.0}


@pytest.mark.parametrize("task", sorted(synthetic.TASKS))
def test_synthetic_answers_are_determined_by_the_prompt(task):
  """Each demo task's answer can be read off its prompt (checked by solving the prompt)."""
  for index in range(20):
    prompt, answer = synthetic.example(task, seed=0, split="train", index=index,
                                       context=synthetic.ContextRange(50, 400))
    assert answer.startswith(" ") and answer.strip() and "\n" not in answer
    assert str(_solve(task, prompt)) == answer.strip(), (task, prompt[-200:], answer)


def _solve(task, prompt):
  question = prompt.rsplit("\n", 1)[1]
  if task == "kv_lookup":
    key = question[len("What is "):-1]
    return dict(line.split("=") for line in prompt.split("\n")[1:-1])[key]
  if task == "copy":
    return prompt[len("Remember: "):prompt.index(".\n")]
  if task == "count":
    word = question.split()[-1][:-1]
    return prompt.rsplit("\n", 1)[0].split(" ").count(word)
  if task == "arithmetic":
    values = {w.split("=")[0]: int(w.split("=")[1][:-1]) for w in prompt.split() if "=" in w}
    expr = question[len("What is "):-1]
    a, op, b = expr[0], expr[1], expr[2]
    return values[a] + values[b] if op == "+" else values[a] - values[b]
  if task == "passkey":
    return passkey.postprocess(prompt[len(passkey.INTRO):])
  raise AssertionError(task)


@pytest.mark.parametrize("fmt", [passkey.RANDOM, passkey.REPEATED])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_token_level_formats_put_the_key_once_at_the_exact_depth(fmt, depth):
  ex = passkey.make_example(np.random.default_rng(3), 400, depth=depth, fmt=fmt)
  key = str(ex.key)
  filler = ex.prompt.replace(f"#{key}", "")[:-1]
  assert ex.prompt.count("#") == 1 and ex.prompt.endswith("?") and ex.prompt.count("?") == 1
  assert ex.prompt[ex.key_offset:ex.key_offset + 5] == key == ex.answer
  assert ex.key_offset - 1 == round(depth * 400)  # no sentence boundary to move to
  assert len(filler) == 400 and set(filler) <= set(passkey.FILLER_ALPHABET)


def test_random_filler_is_new_in_every_block_and_repeated_filler_is_periodic():
  rng = np.random.default_rng(0)
  random = passkey.make_example(rng, 4000, depth=1.0, fmt=passkey.RANDOM).prompt[:4000]
  repeated = passkey.make_example(rng, 4000, depth=1.0, fmt=passkey.REPEATED).prompt[:4000]
  period = len(passkey.REPEATED_PHRASE)
  assert repeated[period:] == repeated[:-period] and repeated[:period] in passkey.REPEATED_PHRASE * 2
  assert len({random[i:i + 32] for i in range(0, 4000, 32)}) == 125
  counts = np.bincount(np.frombuffer(random.encode(), np.uint8))[np.frombuffer(
      passkey.FILLER_ALPHABET.encode(), np.uint8)]
  assert counts.min() > 40 and counts.max() < 130  # uniform over 50 letters: 80 each on average


@pytest.mark.parametrize("fmt", [passkey.RANDOM, passkey.REPEATED])
def test_token_level_eval_examples_have_the_asked_length(fmt):
  vocab = data.get_vocabulary("byte")
  for total in (512, 8192):
    pairs = list(passkey.make_eval_examples(total, vocab, n_examples=4, fmt=fmt)("validation", 0, 0, 1, None))
    assert [len(vocab.encode(p)) + len(vocab.encode(a)) + 1 for p, a in pairs] == [total] * 4


@pytest.mark.parametrize("task", sorted(passkey.TRAIN_TOTAL_TASKS))
def test_total_length_training_tasks_draw_their_lengths_from_the_set(task):
  totals, fmt = passkey.TRAIN_TOTAL_TASKS[task]
  cfg = data.DataConfig(mixture=task, seq_len=max(totals), repeat_segment_len=0)
  lengths, depths = set(), []
  for ex, _ in zip(data.get_examples(cfg, split="train"), range(200)):
    prompt, answer = ex["inputs_pretokenized"], ex["targets_pretokenized"]
    assert prompt.endswith(fmt.question) and prompt[prompt.index("#") + 1:][:5] == answer
    lengths.add(len(ex["inputs"]) + len(ex["targets"]))  # the targets end with EOS
    depths.append(prompt.index("#") / (len(prompt) - 7))
  assert lengths == set(totals)
  assert 0.4 < np.mean(depths) < 0.6 and min(depths) < 0.05 and max(depths) > 0.95
