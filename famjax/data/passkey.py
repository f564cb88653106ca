"""PassKey retrieval (spec §8): a numeric key hidden in filler text, asked for at the end.

The text follows the landmark-attention / TransformerFAM setup: an instruction, filler sentences, the
key sentence at a chosen depth of the filler, more filler, then the question. The answer is the key.

- make_example: one example, deterministic for an rng (or seed), with the key at `depth` (0 = just after
  the instruction, 1 = just before the question) or at a random depth.
- Training tasks draw the filler length from a range: `passkey_train` the paper's 2k-18k tokens,
  `passkey_train_small` 0-160 tokens in the SHORT format (below), for the small-scale reproduction of the
  paper's PassKey result on 2 CPU cores (experiments/passkey_small.py).
- Two text formats: PAPER (the instruction, the key twice, "What is the pass key? The pass key is", the
  answer " 12345") and SHORT ("The pass key:12345. " in the filler, "\nThe pass key:" at the end, the
  answer "12345"). SHORT is for small byte-level models: the paper's text puts the key at least 75 tokens
  before the answer, SHORT lets it come as close as 20, inside the answer's own block of 32; and ":" occurs
  nowhere else, where "is " also ends three filler phrases ("The grass is green."), so finding the key is
  a one-token match for a byte model as "pass key is" is for a model with a real tokenizer.
- Evaluation tasks `passkey_2k` ... `passkey_1m` have a fixed total length (prompt + answer + EOS, exact
  in the byte vocabulary, within a few tokens otherwise) and EVAL_EXAMPLES examples at evenly spaced
  depths. They are generated lazily, one example at a time: a 1M-token example is 1 MB of text.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Iterator, Optional, Union

import numpy as np


@dataclasses.dataclass(frozen=True)
class PasskeyFormat:
  """The words around the filler: intro + filler[:cut] + needle(key) + filler[cut:] + question."""

  name: str
  intro: str
  needle: str  # a str.format template; the key's first digit goes where "{key}" first appears
  question: str
  answer: str  # a str.format template


INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5

# Training tasks: filler length range in tokens and format. Evaluation tasks: total tokens per example.
TRAIN_FILLER_TOKENS = (2048, 18432)  # the paper's: 2 to 18 blocks of 1024
EVAL_LENGTHS = {
    "passkey_2k": 1 << 11, "passkey_4k": 1 << 12, "passkey_8k": 1 << 13, "passkey_16k": 1 << 14,
    "passkey_32k": 1 << 15, "passkey_64k": 1 << 16, "passkey_128k": 1 << 17, "passkey_256k": 1 << 18,
    "passkey_512k": 1 << 19, "passkey_1m": 1 << 20,
}
EVAL_EXAMPLES = 10

PAPER = PasskeyFormat("paper", INTRO, "The pass key is {key}. Remember it. {key} is the pass key. ",
                      QUESTION, " {key}")
SHORT = PasskeyFormat("short", "", "The pass key:{key}. ", "\nThe pass key:", "{key}")
FORMATS = {f.name: f for f in (PAPER, SHORT)}
TRAIN_TASKS = {  # name: (filler tokens, format)
    "passkey_train": (TRAIN_FILLER_TOKENS, PAPER),
    "passkey_train_small": ((0, 160), SHORT),  # 0 to 5 blocks of 32
}
# The small-scale experiment's digit copying: long rows of it to pretrain on, short examples to mix with
# PassKey (3 examples to 1) so that the copied digits do not outweigh the keys in the loss.
COPY_TASKS = {  # name: (period in digits, repeats)
    "passkey_copy_small": ((8, 16), (12, 24)),
    "passkey_copy_short_small": ((8, 16), (1, 3)),
}
SMALL_MIXTURE = ("passkey_small", (("passkey_train_small", 3.0), ("passkey_copy_short_small", 1.0)))


def get_format(name: str) -> PasskeyFormat:
  if name not in FORMATS:
    raise ValueError(f"unknown PassKey format {name!r} (known: {', '.join(FORMATS)})")
  return FORMATS[name]


def needle(key: int, fmt: PasskeyFormat = PAPER) -> str:
  return fmt.needle.format(key=key)


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
  """prompt + answer is the full text; the key's digits start at prompt[key_offset]."""

  prompt: str
  answer: str
  key: int
  depth: float  # the depth asked for, in [0, 1]
  key_offset: int


def make_example(rng: Union[np.random.Generator, int], filler_chars: int,
                 depth: Optional[float] = None, key_digits: int = KEY_DIGITS,
                 fmt: PasskeyFormat = PAPER) -> PasskeyExample:
  """An example with `filler_chars` characters of filler and the key sentence at `depth` of it.

  The key sentence goes at the sentence boundary at or before depth * filler_chars, so it never splits
  a word: the key lies at most one filler sentence (23 characters) before the exact depth.
  """
  rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
  key = int(rng.integers(10 ** (key_digits - 1), 10 ** key_digits))
  if depth is None:
    depth = float(rng.random())
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  if filler_chars < 0:
    raise ValueError(f"filler_chars must be >= 0, got {filler_chars}")
  text = _filler(filler_chars)
  cut = int(round(depth * filler_chars))
  boundary = text.rfind(". ", 0, cut)  # the last sentence boundary that ends at or before the cut
  cut = 0 if boundary < 0 or cut == 0 else boundary + 2
  prompt = fmt.intro + text[:cut] + needle(key, fmt) + text[cut:] + fmt.question
  key_offset = len(fmt.intro) + cut + fmt.needle.index("{key}")
  return PasskeyExample(prompt=prompt, answer=fmt.answer.format(key=key), key=key, depth=depth,
                        key_offset=key_offset)


def _filler(n_chars: int) -> str:
  return (FILLER * (n_chars // len(FILLER) + 1))[:n_chars]


def chars_per_token(vocabulary) -> float:
  """Filler characters per token of `vocabulary` (1.0 for bytes), to size filler in tokens."""
  sample = FILLER * 16
  return len(sample) / len(vocabulary.encode(sample))


def filler_chars_for_total(total_tokens: int, vocabulary, fmt: PasskeyFormat = PAPER) -> int:
  """Filler size that makes prompt + answer + EOS `total_tokens` long (exact for the byte vocabulary)."""
  key = 10 ** (KEY_DIGITS - 1)
  overhead_tokens = len(vocabulary.encode(fmt.intro + needle(key, fmt) + fmt.question
                                          + fmt.answer.format(key=key))) + 1  # + EOS
  return max(0, int((total_tokens - overhead_tokens) * chars_per_token(vocabulary)))


def eval_depth(index: int, n_examples: int = EVAL_EXAMPLES) -> float:
  """Evaluation examples sweep the depth evenly from 0 to 1."""
  return index / (n_examples - 1) if n_examples > 1 else 0.5


def make_train_examples(filler_tokens: tuple[int, int], vocabulary, fmt: PasskeyFormat = PAPER):
  """ExampleFn (famjax.data.sources) of a training task: endless, random depth and filler length."""
  ratio = chars_per_token(vocabulary)
  low, high = (int(t * ratio) for t in filler_tokens)

  def draw(rng: np.random.Generator) -> tuple[str, str]:
    ex = make_example(rng, int(rng.integers(low, high + 1)), fmt=fmt)
    return ex.prompt, ex.answer

  return _endless(7, draw)


def _endless(salt: int, draw):
  """ExampleFn of an endless stream: example `i` is draw(rng of (seed, salt, split, i)), whatever the
  sharding."""
  def make(split: str, seed: int, shard_index: int, num_shards: int, stats) -> Iterator[tuple[str, str]]:
    del stats
    index = shard_index
    while True:
      yield draw(np.random.default_rng([seed, salt, zlib.crc32(split.encode()), index]))
      index += num_shards

  return make


def make_eval_examples(total_tokens: int, vocabulary, n_examples: int = EVAL_EXAMPLES,
                       fmt: PasskeyFormat = PAPER):
  """ExampleFn of an evaluation task: `n_examples` of `total_tokens`, depths from 0 to 1."""
  filler_chars = filler_chars_for_total(total_tokens, vocabulary, fmt)

  def make(split: str, seed: int, shard_index: int, num_shards: int, stats) -> Iterator[tuple[str, str]]:
    del split, stats
    for i in range(shard_index, n_examples, num_shards):
      ex = make_example(np.random.default_rng([seed, 8, total_tokens, i]), filler_chars,
                        depth=eval_depth(i, n_examples), fmt=fmt)
      yield ex.prompt, ex.answer

  return make


def make_digit_copy_examples(period: tuple[int, int], repeats: tuple[int, int]):
  """ExampleFn of a dense copying task: `period` random digits, then the same digits again `repeats`
  times; the answer is the repetitions. Every answer token is a copy target, where PassKey gives one
  5-digit answer per example: a small model trained from scratch on PassKey alone stays at chance for
  thousands of steps, mixed with this it starts retrieving (`passkey_small`; docs/passkey_small.md)."""
  def draw(rng: np.random.Generator) -> tuple[str, str]:
    digits = "".join(map(str, rng.integers(0, 10, int(rng.integers(period[0], period[1] + 1)))))
    return digits, digits * int(rng.integers(repeats[0], repeats[1] + 1))

  return _endless(9, draw)


def postprocess(output: str, example=None, is_target: bool = False) -> str:
  """The first number in a decoded answer (a model may keep generating after the key)."""
  del example, is_target
  match = re.search(r"\d+", output)
  return match.group(0) if match else output.strip()
