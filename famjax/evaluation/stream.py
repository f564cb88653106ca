"""The streaming primitives of evaluation: read a prompt in chunks, continue it greedily, take the
argmax prediction at every position of a text, and the log-probabilities of a given continuation.

Everything goes through `Transformer.init_state` + `Transformer.stream`, so in bswa and fam the memory
is that of one chunk whatever the text's length (full attention's key/value cache grows), and the
results equal the parallel forward's for any chunk size (up to float rounding).

Every text starts with BOS_ID, as the decoder inputs of famjax.data's batches do: a model trained by
famjax saw 0 before the first token of every example.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from famjax.evaluation.progress import Progress
from famjax.inference.generate import chunk_bounds, decode
from famjax.inference.generate import read_prompt as _read_prompt
from famjax.model import ModelConfig, StreamState, Transformer

BOS_ID = 0
# Bytes of float32 logits one stream call may return: model.stream gives logits for every token of a
# chunk, [rows, chunk, vocab], which dominates memory for large vocabularies.
LOGITS_BUDGET_BYTES = 1 << 30


def default_chunk_size(cfg: ModelConfig) -> int:
  """Four blocks: few stream calls, and whole blocks keep the `aligned` fast path."""
  return 4 * cfg.block_size


def rows_per_call(chunk_size: int, vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
  """How many texts to stream together so that one chunk's logits stay within `budget_bytes`."""
  return max(1, budget_bytes // (4 * chunk_size * vocab_size))


def equal_length_batches(lengths: Sequence[int], max_rows: int) -> list[list[int]]:
  """Indices of texts grouped by length (order kept), at most `max_rows` per batch: the texts one
  streamed call reads together."""
  groups: dict[int, list[int]] = {}
  for i, n in enumerate(lengths):
    groups.setdefault(n, []).append(i)
  return [ids[k:k + max_rows] for ids in groups.values() for k in range(0, len(ids), max_rows)]


def with_bos(ids: Sequence[int], bos_id: Optional[int] = BOS_ID) -> np.ndarray:
  """[BOS] + ids as int32 (ids unchanged when bos_id is None)."""
  ids = np.asarray(ids, np.int32).reshape(-1)
  return ids if bos_id is None else np.concatenate([np.asarray([bos_id], np.int32), ids])


def read_prompt(model: Transformer, tokens: np.ndarray, chunk_size: int,
                progress: Optional[Progress] = None) -> tuple[jax.Array, StreamState]:
  """Streams `tokens` [B, T] (T >= 1) in chunks; returns the last position's logits [B, V] and the state.
  famjax.inference.generate.read_prompt after checking the ids, with `progress` advanced per chunk."""
  tokens = _check_tokens(model, tokens)
  return _read_prompt(model, tokens, chunk_size, None if progress is None else progress.advance)


def greedy_continue(model: Transformer, state: StreamState, last_logits: jax.Array, max_new_tokens: int,
                    stop_ids: Sequence[int] = ()) -> np.ndarray:
  """Up to `max_new_tokens` argmax tokens [B, n] after a read prompt. A row that produced a stop id
  repeats it; generation ends early once every row has stopped."""
  return decode(model, state, last_logits, max_new_tokens, lambda logits: jnp.argmax(logits, axis=-1),
                stop_ids)[0]


def next_token_argmax(model: Transformer, tokens: np.ndarray, chunk_size: int,
                      progress: Optional[Progress] = None) -> np.ndarray:
  """The argmax prediction after every position of `tokens` [B, T]: [B, T] int32 (position t predicts
  token t + 1), streamed in chunks; only the ids are kept, never the logits of the whole text."""
  tokens = _check_tokens(model, tokens)
  state = model.init_state(tokens.shape[0])
  out = np.zeros(tokens.shape, np.int32)
  for start, end in chunk_bounds(tokens.shape[1], chunk_size):
    logits, state = model.stream(tokens[:, start:end], state)
    out[:, start:end] = np.asarray(jnp.argmax(logits, axis=-1))
    if progress is not None:
      progress.advance((end - start) * tokens.shape[0])
  return out


def continuation_log_probs(model: Transformer, state: StreamState, last_logits: jax.Array,
                           ids: Sequence[int], chunk_size: int, progress: Optional[Progress] = None
                           ) -> np.ndarray:
  """log p(ids[i] | the read text, ids[:i]) for every i: [n] float32, after a prompt read by
  read_prompt (its `last_logits` [1, V] predict ids[0]); ids[:-1] are streamed in chunks from `state`,
  which is left as it was (a state is a value), so several continuations can share one read prompt."""
  ids = np.asarray(ids, np.int32).reshape(-1)
  if ids.size < 1:
    raise ValueError("a continuation needs at least one token")
  _check_tokens(model, ids[None])
  out = np.zeros(ids.shape, np.float32)
  out[0] = np.asarray(jax.nn.log_softmax(last_logits[0].astype(jnp.float32)))[ids[0]]
  feed = ids[None, :-1]
  for start, end in chunk_bounds(feed.shape[1], chunk_size):
    logits, state = model.stream(feed[:, start:end], state)
    log_probs = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1))
    out[start + 1:end + 1] = np.take_along_axis(log_probs, ids[start + 1:end + 1, None], axis=-1)[:, 0]
    if progress is not None:
      progress.advance(end - start)
  return out


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
  """The ids before the first stop id."""
  ids = [int(t) for t in ids]
  for i, t in enumerate(ids):
    if t in stop_ids:
      return ids[:i]
  return ids


def _check_tokens(model: Transformer, tokens) -> np.ndarray:
  tokens = np.asarray(tokens, np.int32)
  if tokens.ndim != 2 or tokens.shape[1] < 1:
    raise ValueError(f"tokens must be [batch, length >= 1], got shape {tokens.shape}")
  vocab = model.config.vocab_size
  if tokens.min() < 0 or tokens.max() >= vocab:
    raise ValueError(f"token ids must be in [0, {vocab}) (the model's vocab_size), got "
                     f"[{tokens.min()}, {tokens.max()}]; is the vocabulary the model's?")
  return tokens
