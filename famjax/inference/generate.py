"""Generation on the streaming path: the prompt in chunks (`read_prompt`), then one token at a time
(`decode`). famjax.evaluation reads its prompts with the same two functions.

In bswa and fam the memory is constant whatever the prompt length (the StreamState has a fixed size);
in full attention the key/value cache grows with the text.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import numpy as np

from famjax.inference.sampling import SamplingConfig, sample
from famjax.model import StreamState, Transformer


@dataclasses.dataclass
class GenerationResult:
  tokens: np.ndarray  # [B, n_generated] int32; after a stop token, rows hold the stop token
  prompt_tokens_per_second: float
  generation_tokens_per_second: float
  stopped: np.ndarray  # [B] bool: the row produced a stop token


@functools.partial(jax.jit, static_argnames=("cfg",))
def _sample_jit(logits, key, cfg):
  return sample(logits, key, cfg)


def generate(model: Transformer, prompt, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
             stop_tokens=(), seed: int = 0, prefill_chunk: int | None = None) -> GenerationResult:
  """Continues `prompt` [B, T] (T >= 1) by up to `max_new_tokens` tokens.

  The prompt is streamed in chunks of `prefill_chunk` tokens (default: 4 blocks; the remainder in
  power-of-two pieces, see `read_prompt`), so an arbitrarily long prompt costs constant memory in
  bswa/fam. Generation stops early once every row produced a stop token. The same seed gives the same
  tokens.
  """
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, length >= 1] token ids, got shape {prompt.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  vocab = model.config.vocab_size
  if prompt.min() < 0 or prompt.max() >= vocab:
    raise ValueError(f"prompt token ids must be in [0, {vocab}), got [{prompt.min()}, {prompt.max()}]")
  chunk = prefill_chunk or 4 * model.config.block_size
  batch, length = prompt.shape

  t0 = time.perf_counter()
  last, state = read_prompt(model, prompt, chunk)
  prompt_seconds = time.perf_counter() - t0

  key = jax.random.key(seed)

  def pick(logits):
    nonlocal key
    key, sub = jax.random.split(key)
    return _sample_jit(logits, sub, sampling)

  t0 = time.perf_counter()
  tokens, stopped = decode(model, state, last, max_new_tokens, pick, stop_tokens)
  generation_seconds = time.perf_counter() - t0
  return GenerationResult(tokens=tokens,
                          prompt_tokens_per_second=batch * length / prompt_seconds,
                          generation_tokens_per_second=tokens.size / generation_seconds,
                          stopped=stopped)


def chunk_bounds(length: int, chunk_size: int) -> list[tuple[int, int]]:
  """(start, end) of the stream calls that read `length` tokens: whole chunks of `chunk_size`, then the
  remainder as descending powers of two. Every call length is then chunk_size or a power of two, so
  prompts or texts that all differ in length compile at most log2(chunk_size) + 2 programs, not one per
  remainder."""
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  whole = length - length % chunk_size
  bounds = [(start, start + chunk_size) for start in range(0, whole, chunk_size)]
  start, rest = whole, length - whole
  while rest:
    size = 1 << (rest.bit_length() - 1)
    bounds.append((start, start + size))
    start, rest = start + size, rest - size
  return bounds


def read_prompt(model: Transformer, tokens: np.ndarray, chunk_size: int,
                on_chunk: Callable[[int], None] | None = None) -> tuple[jax.Array, StreamState]:
  """Streams `tokens` [B, T] (T >= 1 valid ids) through `init_state` + `stream` in the chunks of
  `chunk_bounds`, one chunk in flight; returns the last position's logits [B, V] and the state after it.
  `on_chunk(n)` is called after each chunk with its number of tokens (rows times length)."""
  state = model.init_state(tokens.shape[0])
  logits = None
  for start, end in chunk_bounds(tokens.shape[1], chunk_size):
    chunk = tokens[:, start:end]
    logits, state = model.stream(chunk, state)
    logits = jax.block_until_ready(logits[:, -1])  # one chunk in flight: honest progress, bounded memory
    if on_chunk is not None:
      on_chunk(chunk.size)
  return logits, state


def decode(model: Transformer, state, last_logits, max_new_tokens: int, pick, stop_tokens=()):
  """The token-by-token loop after a read prompt: `pick(logits [B, V]) -> token ids [B]`, fed back one
  at a time. A row that produced a stop token repeats it; the loop ends once every row has stopped.
  Returns (tokens [B, n] int32, stopped [B] bool)."""
  stop = np.asarray(sorted(set(int(t) for t in stop_tokens)), np.int32)
  stopped = np.zeros(last_logits.shape[0], bool)
  out = []
  for i in range(max_new_tokens):
    token = np.asarray(pick(last_logits)).astype(np.int32)
    token = np.where(stopped, out[-1] if out else token, token)  # a stopped row repeats its stop token
    out.append(token)
    stopped |= np.isin(token, stop)
    if stopped.all() or i == max_new_tokens - 1:
      break
    logits, state = model.stream(token[:, None], state)
    last_logits = logits[:, -1]
  tokens = np.stack(out, axis=1) if out else np.zeros((last_logits.shape[0], 0), np.int32)
  return tokens, stopped
