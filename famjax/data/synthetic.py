"""Synthetic instruction tasks that need memory over long context, generated from a seed (no files).

Each task is a pure function `(rng, context_chars) -> (prompt, answer)`: the facts the answer depends
on are spread over `context_chars` characters of distractor text and the question comes last, so a
model must carry them across the whole context (in FAM's case: through its memory).

- kv_lookup:  a table of key=value lines; the value of one key.
- copy:       a random string shown at the start; repeat it after the distractors.
- count:      how often one of three marker words occurred among the distractors.
- arithmetic: variables assigned at random places; the sum or difference of two of them.
- passkey:    famjax.data.passkey's retrieval task (spec §8).

Example `i` of a stream is a function of (seed, split, task, i) only, so any host can generate any
shard, and the stream is identical however it is sharded. The context length of each example is drawn
uniformly from a range: short ranges give tasks a tiny model learns in minutes, long ones (thousands of
tokens) need real long-context memory. With the byte vocabulary one character is one token.
"""

from __future__ import annotations

import dataclasses
import itertools
import zlib
from typing import Callable, Iterator

import numpy as np

from famjax.data import passkey

# Distractor words: short, common, and disjoint from every word a question asks about.
FILLER_WORDS = (
    "the of and to in is was that for on with as by at from his her they this had not are but one "
    "all were when we there can an your which their said if do will each about how up out them then "
    "she many some so these would other into has more two like him see time could no make than first "
    "been its who now people my made over did down only way find use may water long little very after "
    "words called just where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word must because "
    "does part even place well such here take why things help put years different away again off went "
    "old number great tell men say small every found still between name should home big give air line "
    "set own under read last never us left end along while might next sound below saw something "
    "thought both few those always looked show large often together asked house world going want "
    "school important until form food keep children feet land side without boy once animals life enough "
    "took sometimes four head above kind began almost live page got earth need far hand high year "
    "mother light parts country father let night following picture being study second eyes soon times "
    "story boys since white days ever paper hard near sentence better best across during today others "
    "sure means knew its try told young miles sun ways thing whole hear example heard several change "
    "answer room sea against top turned learn point city play toward five using himself usually").split()
COUNT_WORDS = ("apple", "river", "cloud")
LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
VARIABLES = "abcdefghijkmnpqrstuvwxyz"  # no l or o: easily confused with 1 and 0 in a byte vocabulary


@dataclasses.dataclass(frozen=True)
class ContextRange:
  """Characters (byte tokens) of context per example, drawn uniformly from [low, high]."""

  low: int
  high: int

  def __post_init__(self):
    if not 1 <= self.low <= self.high:
      raise ValueError(f"ContextRange needs 1 <= low <= high, got ({self.low}, {self.high})")


def filler(rng: np.random.Generator, n_chars: int) -> str:
  """About `n_chars` characters of distractor words (whole words, at least one)."""
  n_words = max(1, n_chars // 5 + 1)  # the words average a little under 5 characters with the space
  words = np.asarray(FILLER_WORDS)[rng.integers(0, len(FILLER_WORDS), n_words)]
  text = " ".join(words)
  if len(text) > n_chars:
    text = text[:max(1, text.rfind(" ", 0, n_chars + 1))].rstrip()
  return text


def kv_lookup(rng: np.random.Generator, context_chars: int) -> tuple[str, str]:
  n_pairs = max(2, context_chars // 8)  # a line "abc=123\n" is 8 characters
  keys: list[str] = []
  seen: set[str] = set()
  while len(keys) < n_pairs:
    key = "".join(LETTERS[rng.integers(0, 26, 3)])
    if key not in seen:
      seen.add(key)
      keys.append(key)
  values = rng.integers(100, 1000, n_pairs)
  query = int(rng.integers(0, n_pairs))
  table = "".join(f"{k}={v}\n" for k, v in zip(keys, values))
  return f"Remember the table.\n{table}What is {keys[query]}?", f" {values[query]}"


def copy_span(rng: np.random.Generator, context_chars: int) -> tuple[str, str]:
  span = "".join(LETTERS[rng.integers(0, 26, int(rng.integers(4, 13)))])
  return (f"Remember: {span}.\n{filler(rng, context_chars)}\nWhat did you have to remember?",
          f" {span}")


def count(rng: np.random.Generator, context_chars: int) -> tuple[str, str]:
  words = filler(rng, context_chars).split(" ")
  counts = rng.integers(0, 10, len(COUNT_WORDS))
  inserts = [w for w, c in zip(COUNT_WORDS, counts) for _ in range(int(c))]
  rng.shuffle(inserts)
  positions = np.sort(rng.integers(0, len(words) + 1, len(inserts)))
  for offset, (pos, word) in enumerate(zip(positions, inserts)):
    words.insert(int(pos) + offset, word)
  asked = int(rng.integers(0, len(COUNT_WORDS)))
  return (f"{' '.join(words)}\nHow many times did you read {COUNT_WORDS[asked]}?",
          f" {counts[asked]}")


def arithmetic(rng: np.random.Generator, context_chars: int) -> tuple[str, str]:
  n_vars = int(rng.integers(2, 5))
  names = rng.choice(list(VARIABLES), n_vars, replace=False)
  values = rng.integers(0, 100, n_vars)
  words = filler(rng, context_chars).split(" ")
  positions = np.sort(rng.integers(0, len(words) + 1, n_vars))
  for offset, (pos, name, value) in enumerate(zip(positions, names, values)):
    words.insert(int(pos) + offset, f"{name}={value}.")
  i, j = rng.choice(n_vars, 2, replace=False)
  if rng.integers(0, 2):
    question, answer = f"{names[i]}+{names[j]}", values[i] + values[j]
  else:
    question, answer = f"{names[i]}-{names[j]}", values[i] - values[j]
  return f"{' '.join(words)}\nWhat is {question}?", f" {answer}"


def passkey_task(rng: np.random.Generator, context_chars: int) -> tuple[str, str]:
  example = passkey.make_example(rng, filler_chars=context_chars)
  return example.prompt, example.answer


TASKS: dict[str, Callable[[np.random.Generator, int], tuple[str, str]]] = {
    "kv_lookup": kv_lookup, "copy": copy_span, "count": count, "arithmetic": arithmetic,
    "passkey": passkey_task,
}

# The built-in demo mixtures: the same five tasks at three context lengths.
DEMO_MIXTURES: dict[str, ContextRange] = {
    "famjax_demo_short": ContextRange(16, 160),  # fits seq_len 512; a tiny model learns some in minutes
    "famjax_demo": ContextRange(64, 768),  # for seq_len 1024 (1% truncated) to 2048 (none)
    "famjax_demo_long": ContextRange(1024, 8192),  # memory across thousands of tokens
}
VALIDATION_EXAMPLES = 256
_SPLITS = {"train": 0, "validation": 1}


def example(task: str, seed: int, split: str, index: int, context: ContextRange) -> tuple[str, str]:
  """Example `index` of a task's stream: a pure function of its arguments."""
  rng = np.random.default_rng([seed, _SPLITS[split], zlib.crc32(task.encode()), index])
  return TASKS[task](rng, int(rng.integers(context.low, context.high + 1)))


def make_range(task: str, context: ContextRange):
  """Examples start, ..., stop - 1 of a task's training stream (famjax.data.sources.RangeExamplesFn)."""

  def make(split: str, seed: int, start: int, stop: int) -> Iterator[tuple[str, str]]:
    for i in range(start, stop):
      yield example(task, seed, split, i, context)

  return make


def make_examples(task: str, context: ContextRange):
  """The famjax.data.sources.ExampleFn of a task: endless for train, VALIDATION_EXAMPLES otherwise."""

  def make(split: str, seed: int, shard_index: int, num_shards: int, stats) -> Iterator[tuple[str, str]]:
    del stats  # generated examples are never malformed
    if split == "train":
      indices = itertools.count(shard_index, num_shards)
    else:
      indices = range(shard_index, VALIDATION_EXAMPLES, num_shards)
    for i in indices:
      yield example(task, seed, split, i, context)

  return make
