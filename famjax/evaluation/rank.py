"""Rank classification on the streaming path (the GPT-3 rank tasks: HellaSwag, PIQA, ARC, ...): each
option of an example is a (context, continuation) pair, its score the sum of the continuation tokens'
log-probabilities after `[BOS] + context`, and the prediction the option with the highest score.

  lls = option_log_likelihoods(model, vocab, contexts, continuations, chunk_size=32)

Tokens: the context alone, and the continuation as the tokens of `context + continuation` after the
context's (lm-evaluation-harness's rule, so a SentencePiece word that spans the boundary is scored the
way the model would read the whole text); when the joint encoding does not start with the context's
tokens, the continuation is encoded alone. Options that share a context (the usual form) read it once.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from famjax.evaluation import stream
from famjax.model import Transformer


def split_ids(vocabulary, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) of `context + continuation` (see the module docstring)."""
  context_ids = list(vocabulary.encode(context)) if context else []
  whole = list(vocabulary.encode(context + continuation))
  if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
    return context_ids, whole[len(context_ids):]
  return context_ids, list(vocabulary.encode(continuation))


def option_log_likelihoods(model: Transformer, vocabulary, contexts: Sequence[str],
                           continuations: Sequence[str], chunk_size: int,
                           bos_id: Optional[int] = stream.BOS_ID, progress=None) -> np.ndarray:
  """The log-likelihood (float64 sum over its tokens) of each continuation after its context: [n]."""
  out = np.zeros(len(contexts), np.float64)
  read_key, read = None, None
  for i, (context, continuation) in enumerate(zip(contexts, continuations)):
    context_ids, continuation_ids = split_ids(vocabulary, context, continuation)
    prompt = stream.with_bos(context_ids, bos_id)
    if prompt.size == 0:
      raise ValueError("an empty context without a BOS id leaves the first token unpredicted")
    if read_key != tuple(prompt):
      read_key, read = tuple(prompt), stream.read_prompt(model, prompt[None], chunk_size, progress)
    last, state = read
    out[i] = float(np.sum(stream.continuation_log_probs(model, state, last, continuation_ids,
                                                        chunk_size, progress), dtype=np.float64))
  return out


def tokens_read(vocabulary, contexts: Sequence[str], continuations: Sequence[str],
                bos_id: Optional[int] = stream.BOS_ID) -> int:
  """The tokens option_log_likelihoods streams for one example (for progress lines)."""
  total, previous = 0, None
  for context, continuation in zip(contexts, continuations):
    context_ids, continuation_ids = split_ids(vocabulary, context, continuation)
    if context != previous:
      total += len(context_ids) + (bos_id is not None)
      previous = context
    total += len(continuation_ids) - 1
  return total
