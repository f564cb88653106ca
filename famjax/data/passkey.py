"""PassKey retrieval (spec §8): a numeric key hidden in filler text, asked for at the end.

The text follows the landmark-attention / TransformerFAM setup: an instruction, filler sentences, the
key sentence at a chosen depth of the filler, more filler, then the question. The answer is the key.

- make_example: one example, deterministic for an rng (or seed), with the key at `depth` (0 = just after
  the instruction, 1 = just before the question) or at a random depth.
- Training tasks draw the filler length from a range (`passkey_train`: the paper's 2k-18k tokens) or the
  example's total length from a set (`passkey_random_small`, `passkey_repeated_small`: 64 to 512 tokens,
  the small-scale reproduction of the paper's PassKey result on 2 CPU cores, experiments/passkey_small.py).
- Text formats: PAPER (the instruction, the key twice, "What is the pass key? The pass key is", the
  answer " 12345"); SHORT ("The pass key:12345. " in the filler, "\nThe pass key:" at the end, the
  answer "12345"); and the token-level RANDOM and REPEATED ("#12345" in filler letters, "?" at the end):
  random letters, new in every block, or one 20-letter phrase repeated, the structure of the paper's
  filler. The token-level ones are for small models trained from scratch: with the paper's repeated
  sentences a 2-layer byte model trained from scratch barely learns (docs/passkey_small.md).
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
  filler: str = "sentences"  # "sentences" (FILLER repeated), "random" or "repeated" (see _filler)


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
# Token-level formats for small models trained from scratch: one marker token before the key ("#"),
# one before the answer ("?"), the filler drawn from 50 letters that contain neither markers nor digits.
# RANDOM draws every filler token independently, so every block of filler is new; REPEATED repeats one
# fixed 20-letter phrase (from a random phase), the structure of the paper's filler (one paragraph
# repeated) in the same alphabet, so a model trained on RANDOM reads it without unseen tokens.
FILLER_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX"  # 50 symbols, one byte each
REPEATED_PHRASE = "qHfkUwbRnEtaLxDpgMsJ"  # 20 letters of FILLER_ALPHABET, repeated by REPEATED
RANDOM = PasskeyFormat("random", "", "#{key}", "?", "{key}", filler="random")
REPEATED = PasskeyFormat("repeated", "", "#{key}", "?", "{key}", filler="repeated")
FORMATS = {f.name: f for f in (PAPER, SHORT, RANDOM, REPEATED)}
TRAIN_TASKS = {  # name: (filler tokens, format)
    "passkey_train": (TRAIN_FILLER_TOKENS, PAPER),
}
# Training tasks of a fixed total length drawn per example (prompt + answer + EOS, exact in the byte
# vocabulary): name: (total lengths, format). `passkey_random_small` is the training task of
# experiments/passkey_small.py: rows of 2 to 16 blocks of 32, every key depth equally likely.
TRAIN_TOTAL_TASKS = {
    "passkey_random_small": ((64, 128, 256, 512), RANDOM),
    "passkey_repeated_small": ((64, 128, 256, 512), REPEATED),
    "passkey_random_512": ((512,), RANDOM),
    # The curriculum's second stage (docs/passkey_small.md): rows of 2 to 64 blocks of 32.
    "passkey_random_2k": ((64, 128, 256, 512, 1024, 2048), RANDOM),
}


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
  text = filler_text(filler_chars, fmt, rng)
  cut = int(round(depth * filler_chars))
  if fmt.filler == "sentences":
    boundary = text.rfind(". ", 0, cut)  # the last sentence boundary that ends at or before the cut
    cut = 0 if boundary < 0 or cut == 0 else boundary + 2
  prompt = fmt.intro + text[:cut] + needle(key, fmt) + text[cut:] + fmt.question
  key_offset = len(fmt.intro) + cut + fmt.needle.index("{key}")
  return PasskeyExample(prompt=prompt, answer=fmt.answer.format(key=key), key=key, depth=depth,
                        key_offset=key_offset)


def filler_text(n_chars: int, fmt: PasskeyFormat = PAPER, rng: Optional[np.random.Generator] = None) -> str:
  """`n_chars` of filler: FILLER repeated ("sentences"), letters drawn uniformly from FILLER_ALPHABET
  ("random"), or REPEATED_PHRASE repeated from a random phase ("repeated"). Sentence filler draws nothing
  from `rng`, so its examples do not depend on the filler kind's existence."""
  if fmt.filler == "sentences":
    return (FILLER * (n_chars // len(FILLER) + 1))[:n_chars]
  if rng is None:
    raise ValueError(f"the {fmt.name!r} PassKey format draws its filler: pass an rng")
  if fmt.filler == "random":
    alphabet = np.frombuffer(FILLER_ALPHABET.encode(), np.uint8)
    return alphabet[rng.integers(0, len(alphabet), n_chars)].tobytes().decode()
  if fmt.filler == "repeated":
    shift = int(rng.integers(len(REPEATED_PHRASE)))
    text = REPEATED_PHRASE * (n_chars // len(REPEATED_PHRASE) + 2)
    return text[shift:shift + n_chars]
  raise ValueError(f"PassKey format {fmt.name!r}: unknown filler kind {fmt.filler!r}")


def chars_per_token(vocabulary, fmt: PasskeyFormat = PAPER) -> float:
  """Filler characters per token of `vocabulary` (1.0 for bytes), to size filler in tokens."""
  sample = FILLER * 16 if fmt.filler == "sentences" else FILLER_ALPHABET * 8
  return len(sample) / len(vocabulary.encode(sample))


def filler_chars_for_total(total_tokens: int, vocabulary, fmt: PasskeyFormat = PAPER) -> int:
  """Filler size that makes prompt + answer + EOS `total_tokens` long (exact for the byte vocabulary)."""
  key = 10 ** (KEY_DIGITS - 1)
  overhead_tokens = len(vocabulary.encode(fmt.intro + needle(key, fmt) + fmt.question
                                          + fmt.answer.format(key=key))) + 1  # + EOS
  return max(0, int((total_tokens - overhead_tokens) * chars_per_token(vocabulary, fmt)))


def eval_depth(index: int, n_examples: int = EVAL_EXAMPLES) -> float:
  """Evaluation examples sweep the depth evenly from 0 to 1."""
  return index / (n_examples - 1) if n_examples > 1 else 0.5


def make_train_examples(filler_tokens: tuple[int, int], vocabulary, fmt: PasskeyFormat = PAPER):
  """ExampleFn (famjax.data.sources) of a training task: endless, random depth and filler length."""
  ratio = chars_per_token(vocabulary, fmt)
  low, high = (int(t * ratio) for t in filler_tokens)

  def draw(rng: np.random.Generator) -> tuple[str, str]:
    ex = make_example(rng, int(rng.integers(low, high + 1)), fmt=fmt)
    return ex.prompt, ex.answer

  return endless(7, draw)


def make_train_total_examples(totals: tuple[int, ...], vocabulary, fmt: PasskeyFormat = RANDOM):
  """ExampleFn of a training task whose examples are `totals[j]` tokens long (prompt + answer + EOS),
  j uniform, with the key at a uniformly random depth of the filler."""
  fillers = [filler_chars_for_total(t, vocabulary, fmt) for t in totals]

  def draw(rng: np.random.Generator) -> tuple[str, str]:
    ex = make_example(rng, fillers[int(rng.integers(len(fillers)))], fmt=fmt)
    return ex.prompt, ex.answer

  return endless(11, draw)


def endless(salt: int, draw):
  """ExampleFn of an endless stream: example `i` is draw(rng of (seed, salt, split, i)), whatever the
  sharding; `.range(split, seed, start, stop)` gives examples start, ..., stop - 1 (tokenization units)."""
  return _EndlessExamples(salt, draw)


class _EndlessExamples:
  def __init__(self, salt: int, draw):
    self._salt, self._draw = salt, draw

  def _example(self, split: str, seed: int, index: int) -> tuple[str, str]:
    return self._draw(np.random.default_rng([seed, self._salt, zlib.crc32(split.encode()), index]))

  def __call__(self, split: str, seed: int, shard_index: int, num_shards: int, stats
               ) -> Iterator[tuple[str, str]]:
    del stats
    index = shard_index
    while True:
      yield self._example(split, seed, index)
      index += num_shards

  def range(self, split: str, seed: int, start: int, stop: int) -> Iterator[tuple[str, str]]:
    for index in range(start, stop):
      yield self._example(split, seed, index)


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


def postprocess(output: str, example=None, is_target: bool = False) -> str:
  """The first number in a decoded answer (a model may keep generating after the key)."""
  del example, is_target
  match = re.search(r"\d+", output)
  return match.group(0) if match else output.strip()
