"""Recall beyond one key: multi-key PassKey and associative recall at a distance (MQAR-like).

Both are token-level formats in the alphabet of the small-scale PassKey (famjax.data.passkey.RANDOM):
random-letter filler (FILLER_ALPHABET), and named needles "#ab=12345" (a 2-letter lowercase name, "=",
a 5-digit value) that the filler never contains ("#", "=", "?" and digits are not in it). A question is
"?ab=", so the answer is the text that followed "ab=" in its needle.

- MULTIKEY (`multikey_*`): `keys` needles with distinct names and values, each at its own depth of the
  filler, then one question naming one of them:
      filler[:c1] #ab=12345 filler[c1:c2] #cd=67890 ... filler[ck:] ?cd=     answer "67890"
  Training examples put every needle at a uniform depth; evaluation examples put the asked needle at
  evenly spaced depths 0 ... 1 (as PassKey's) and the others at uniform depths.
- MQAR (`mqar_*`): `pairs` needles side by side at the start, then the filler, then `queries` questions
  about distinct pairs, in sequence; the prompt holds every question but the last with its answer:
      #ab=12345#cd=67890#ef=13579#gh=24680 filler ?cd=67890?gh=24680?ab=     answer "12345"
  The seqio task's answer is the last question's value (its metric scores that one); the streaming
  evaluation (famjax.evaluation.recall) scores every question, each with the true answers before it.

Examples are deterministic for (seed, split, index) and exact in length in the byte vocabulary (prompt
+ answer + EOS = the total asked for; every needle and question has the same length, so only the
filler's length depends on the total). `spans` gives where every scored answer lies in prompt + answer.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Union

import numpy as np

from famjax.data import passkey
from famjax.data.passkey import endless  # the same endless, shard-independent example stream

NAME_LETTERS = "abcdefghijklmnopqrstuvwxyz"  # key names: 2 of these (676 names)
NAME_LENGTH = 2
VALUE_DIGITS = passkey.KEY_DIGITS  # 5


@dataclasses.dataclass(frozen=True)
class RecallFormat:
  """One recall task: `keys` needles in the filler (multikey) or `pairs` at the start and `queries`
  questions at the end (mqar)."""

  name: str  # "multikey" or "mqar"
  keys: int  # needles in the example (multikey: keys; mqar: pairs)
  queries: int = 1  # questions at the end (multikey: 1)


MULTIKEY = RecallFormat("multikey", keys=4)
MQAR = RecallFormat("mqar", keys=6, queries=3)
FORMATS = {f.name: f for f in (MULTIKEY, MQAR)}

# Training tasks: name -> (total lengths, one drawn per example, uniformly; format). Rows of 4 to 16
# blocks of 32, as passkey_random_small's without its 64 (too short for 6 pairs and 3 questions).
TRAIN_TOTALS = (128, 256, 512)
TRAIN_TASKS = {"multikey_small": (TRAIN_TOTALS, MULTIKEY), "mqar_small": (TRAIN_TOTALS, MQAR)}
TRAIN_MIXTURE = "recall_small"  # both training tasks at equal rates (configs/recall_small.py)
# Evaluation tasks: `<format>_<length>`, a fixed total length, EVAL_EXAMPLES examples.
EVAL_TOTALS = {"512": 512, "1k": 1 << 10, "2k": 1 << 11, "4k": 1 << 12, "8k": 1 << 13, "16k": 1 << 14,
               "32k": 1 << 15, "64k": 1 << 16}
EVAL_TASKS = {f"{f}_{label}": (total, FORMATS[f]) for f in FORMATS for label, total in EVAL_TOTALS.items()}
EVAL_EXAMPLES = 10


@dataclasses.dataclass(frozen=True)
class RecallExample:
  """prompt + answer is the full text; the scored answers lie at text[start:end] for (start, end) in
  `spans` (characters; tokens too in the byte vocabulary), the last one being `answer`."""

  prompt: str
  answer: str
  spans: tuple[tuple[int, int], ...]
  depth: float  # multikey: the asked needle's depth in the filler, 0 to 1; mqar: 0 (pairs first)


def get_format(name: str) -> RecallFormat:
  if name not in FORMATS:
    raise ValueError(f"unknown recall task {name!r} (known: {', '.join(FORMATS)})")
  return FORMATS[name]


def needle(name: str, value: str) -> str:
  return f"#{name}={value}"


def question(name: str) -> str:
  return f"?{name}="


def overhead_chars(fmt: RecallFormat) -> int:
  """Characters of an example that are not filler: needles, questions and answers."""
  return fmt.keys * len(needle("a" * NAME_LENGTH, "0" * VALUE_DIGITS)) \
      + fmt.queries * (len(question("a" * NAME_LENGTH)) + VALUE_DIGITS)


def filler_chars_for_total(total_tokens: int, fmt: RecallFormat) -> int:
  """Filler that makes prompt + answer + EOS `total_tokens` bytes; an error if the needles do not fit."""
  filler = total_tokens - 1 - overhead_chars(fmt)
  if filler < 0:
    raise ValueError(f"{fmt.name}: {total_tokens} tokens cannot hold {fmt.keys} needles and "
                     f"{fmt.queries} questions (at least {overhead_chars(fmt) + 1})")
  return filler


def make_example(rng: Union[np.random.Generator, int], filler_chars: int, fmt: RecallFormat,
                 depth: float | None = None) -> RecallExample:
  """An example of `fmt` with `filler_chars` of filler. multikey: the asked needle at `depth` of the
  filler (None: uniform), the others at uniform depths; mqar: `depth` must be None or 0."""
  rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  if filler_chars < 0:
    raise ValueError(f"filler_chars must be >= 0, got {filler_chars}")
  if depth is not None and not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  names = _distinct(rng, fmt.keys, len(NAME_LETTERS) ** NAME_LENGTH, _name)
  values = _distinct(rng, fmt.keys, 9 * 10 ** (VALUE_DIGITS - 1), lambda i: str(10 ** (VALUE_DIGITS - 1) + i))
  filler = passkey.filler_text(filler_chars, passkey.RANDOM, rng)
  if fmt.name == "multikey":
    return _multikey(rng, names, values, filler, depth)
  if fmt.name == "mqar":
    if depth not in (None, 0.0):
      raise ValueError(f"mqar puts its pairs at depth 0; got depth {depth}")
    return _mqar(rng, names, values, filler, fmt.queries)
  raise ValueError(f"unknown recall task {fmt.name!r}")


def _multikey(rng, names, values, filler: str, depth: float | None) -> RecallExample:
  asked = int(rng.integers(len(names)))
  cuts = rng.integers(0, len(filler) + 1, len(names))
  depth = float(rng.random()) if depth is None else depth
  cuts[asked] = int(round(depth * len(filler)))
  prompt, at = [], 0
  for k in sorted(range(len(names)), key=lambda k: (cuts[k], k)):
    prompt += [filler[at:cuts[k]], needle(names[k], values[k])]
    at = cuts[k]
  prompt = "".join(prompt + [filler[at:], question(names[asked])])
  return RecallExample(prompt, values[asked], ((len(prompt), len(prompt) + VALUE_DIGITS),), depth)


def _mqar(rng, names, values, filler: str, queries: int) -> RecallExample:
  asked = rng.permutation(len(names))[:queries]
  text = "".join(needle(n, v) for n, v in zip(names, values)) + filler
  spans = []
  for k in asked:
    text += question(names[k])
    spans.append((len(text), len(text) + VALUE_DIGITS))
    text += values[k]
  answer = values[asked[-1]]
  return RecallExample(text[:-len(answer)], answer, tuple(spans), 0.0)


def _distinct(rng: np.random.Generator, n: int, population: int, show) -> list[str]:
  return [show(int(i)) for i in rng.choice(population, n, replace=False)]


def _name(index: int) -> str:
  letters = len(NAME_LETTERS)
  return "".join(NAME_LETTERS[(index // letters ** p) % letters] for p in reversed(range(NAME_LENGTH)))


def make_train_examples(totals: tuple[int, ...], fmt: RecallFormat):
  """ExampleFn (famjax.data.sources) of a training task: endless, each example `totals[j]` bytes long
  (prompt + answer + EOS), j uniform; `.range` gives examples by index, as PassKey's."""
  fillers = [filler_chars_for_total(t, fmt) for t in totals]

  def draw(rng: np.random.Generator) -> tuple[str, str]:
    ex = make_example(rng, fillers[int(rng.integers(len(fillers)))], fmt)
    return ex.prompt, ex.answer

  return endless(21 if fmt.name == "multikey" else 22, draw)


def eval_examples(total_tokens: int, fmt: RecallFormat, n_examples: int = EVAL_EXAMPLES,
                  seed: int = 0) -> Iterator[RecallExample]:
  """The `n_examples` examples of the evaluation task of `total_tokens`, lazily (multikey: the asked
  needle's depth from 0 to 1, passkey.eval_depth)."""
  filler = filler_chars_for_total(total_tokens, fmt)
  salt = 23 if fmt.name == "multikey" else 24
  for i in range(n_examples):
    depth = passkey.eval_depth(i, n_examples) if fmt.name == "multikey" else None
    yield make_example(np.random.default_rng([seed, salt, total_tokens, i]), filler, fmt, depth)


def make_eval_examples(total_tokens: int, fmt: RecallFormat, n_examples: int = EVAL_EXAMPLES):
  """ExampleFn of an evaluation task: `eval_examples` as (prompt, answer), sharded."""

  def make(split: str, seed: int, shard_index: int, num_shards: int, stats) -> Iterator[tuple[str, str]]:
    del split, stats
    for i, ex in enumerate(eval_examples(total_tokens, fmt, n_examples, seed)):
      if i % num_shards == shard_index:
        yield ex.prompt, ex.answer

  return make


def postprocess(output: str, example=None, is_target: bool = False) -> str:
  """The first number of a decoded answer, as PassKey's."""
  return passkey.postprocess(output, example, is_target)
