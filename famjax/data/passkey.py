"""PassKey retrieval (spec §8): a numeric key hidden in filler text, asked for at the end.

The text follows the landmark-attention / TransformerFAM setup: an instruction, filler sentences, the
key sentence at a chosen depth of the filler, more filler, then the question. The answer is the key.

- make_example: one example, deterministic for an rng (or seed), with the key at `depth` (0 = just after
  the instruction, 1 = just before the question) or at a random depth.
- Training tasks draw the filler length from a range (the paper: 2k-18k tokens).
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

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
KEY_DIGITS = 5

# Training: filler length range in tokens (the paper's 2k-18k). Evaluation: total tokens per example.
TRAIN_FILLER_TOKENS = (2048, 18432)
EVAL_LENGTHS = {
    "passkey_2k": 1 << 11, "passkey_4k": 1 << 12, "passkey_8k": 1 << 13, "passkey_16k": 1 << 14,
    "passkey_32k": 1 << 15, "passkey_64k": 1 << 16, "passkey_128k": 1 << 17, "passkey_256k": 1 << 18,
    "passkey_512k": 1 << 19, "passkey_1m": 1 << 20,
}
EVAL_EXAMPLES = 10


def needle(key: int) -> str:
  return f"The pass key is {key}. Remember it. {key} is the pass key. "


@dataclasses.dataclass(frozen=True)
class PasskeyExample:
  """prompt + answer is the full text; the key's digits start at prompt[key_offset]."""

  prompt: str
  answer: str
  key: int
  depth: float  # the depth asked for, in [0, 1]
  key_offset: int


def make_example(rng: Union[np.random.Generator, int], filler_chars: int,
                 depth: Optional[float] = None, key_digits: int = KEY_DIGITS) -> PasskeyExample:
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
  prompt = INTRO + text[:cut] + needle(key) + text[cut:] + QUESTION
  key_offset = len(INTRO) + cut + len("The pass key is ")
  return PasskeyExample(prompt=prompt, answer=f" {key}", key=key, depth=depth, key_offset=key_offset)


def _filler(n_chars: int) -> str:
  return (FILLER * (n_chars // len(FILLER) + 1))[:n_chars]


def chars_per_token(vocabulary) -> float:
  """Filler characters per token of `vocabulary` (1.0 for bytes), to size filler in tokens."""
  sample = FILLER * 16
  return len(sample) / len(vocabulary.encode(sample))


def filler_chars_for_total(total_tokens: int, vocabulary) -> int:
  """Filler size that makes prompt + answer + EOS `total_tokens` long (exact for the byte vocabulary)."""
  overhead_tokens = len(vocabulary.encode(INTRO + needle(10 ** (KEY_DIGITS - 1)) + QUESTION
                                          + " " + "1" * KEY_DIGITS)) + 1  # + EOS
  return max(0, int((total_tokens - overhead_tokens) * chars_per_token(vocabulary)))


def eval_depth(index: int, n_examples: int = EVAL_EXAMPLES) -> float:
  """Evaluation examples sweep the depth evenly from 0 to 1."""
  return index / (n_examples - 1) if n_examples > 1 else 0.5


def make_train_examples(filler_tokens: tuple[int, int], vocabulary):
  """ExampleFn (famjax.data.sources) of a training task: endless, random depth and filler length."""
  ratio = chars_per_token(vocabulary)
  low, high = (int(t * ratio) for t in filler_tokens)

  def make(split: str, seed: int, shard_index: int, num_shards: int, stats) -> Iterator[tuple[str, str]]:
    del stats
    index = shard_index
    while True:
      rng = np.random.default_rng([seed, 7, zlib.crc32(split.encode()), index])
      ex = make_example(rng, int(rng.integers(low, high + 1)))
      yield ex.prompt, ex.answer
      index += num_shards

  return make


def make_eval_examples(total_tokens: int, vocabulary, n_examples: int = EVAL_EXAMPLES):
  """ExampleFn of an evaluation task: `n_examples` of `total_tokens`, depths from 0 to 1."""
  filler_chars = filler_chars_for_total(total_tokens, vocabulary)

  def make(split: str, seed: int, shard_index: int, num_shards: int, stats) -> Iterator[tuple[str, str]]:
    del split, stats
    for i in range(shard_index, n_examples, num_shards):
      ex = make_example(np.random.default_rng([seed, 8, total_tokens, i]), filler_chars,
                        depth=eval_depth(i, n_examples))
      yield ex.prompt, ex.answer

  return make


def postprocess(output: str, example=None, is_target: bool = False) -> str:
  """The first number in a decoded answer (a model may keep generating after the key)."""
  del example, is_target
  match = re.search(r"\d+", output)
  return match.group(0) if match else output.strip()
