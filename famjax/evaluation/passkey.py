"""PassKey retrieval (spec §8) on the streaming path: the examples of the `passkey_*` evaluation tasks,
read in chunks, answered greedily, scored by exact match of the key.

  result = evaluate_passkey(model, vocabulary, total_tokens=1 << 20, n_examples=10)
  result["exact_match"]   # percent of examples whose first generated number is the key

The examples are those of famjax.data's passkey eval tasks for the same `total_tokens` and seed (the
task's own generator, `famjax.data.passkey.make_eval_examples`), so the numbers are the seqio task's.
Examples of equal token length (all of them in the byte vocabulary) are streamed together as one batch.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Optional

import numpy as np

from famjax.data import metrics
from famjax.data import passkey as passkey_data
from famjax.evaluation import progress as progress_lib
from famjax.evaluation import stream
from famjax.model import Transformer

EXTRA_TOKENS = 2  # generated beyond the answer's length: room for a space or a stray token


def passkey_examples(vocabulary, total_tokens: int, n_examples: int = passkey_data.EVAL_EXAMPLES,
                     seed: int = 0, fmt: str = "paper") -> list[dict]:
  """The examples of the eval task of `total_tokens` (prompt + answer + EOS): dicts with `prompt`,
  `answer`, `depth` (of the key in the filler, 0 to 1) and `prompt_ids`."""
  if total_tokens < 1 or n_examples < 1:
    raise ValueError(f"total_tokens and n_examples must be >= 1, got {total_tokens}, {n_examples}")
  make = passkey_data.make_eval_examples(total_tokens, vocabulary, n_examples,
                                         passkey_data.get_format(fmt))
  pairs = make("validation", seed, 0, 1, None)  # (split, seed, shard 0 of 1, no stats)
  return [{"prompt": prompt, "answer": answer, "depth": passkey_data.eval_depth(i, n_examples),
           "prompt_ids": np.asarray(vocabulary.encode(prompt), np.int32)}
          for i, (prompt, answer) in enumerate(pairs)]


def filler_tokens(vocabulary, total_tokens: int, fmt: str = "paper") -> int:
  """Tokens of filler in an example of `total_tokens` (the rest is instruction, key and question)."""
  form = passkey_data.get_format(fmt)
  chars = passkey_data.filler_chars_for_total(total_tokens, vocabulary, form)
  return int(round(chars / passkey_data.chars_per_token(vocabulary, form)))


def score(answers: list[str], outputs: list[str]) -> tuple[list[str], list[str], float]:
  """(targets, predictions, exact match %) as the seqio task scores them: both postprocessed to the
  first number, then compared exactly."""
  targets = [passkey_data.postprocess(a, is_target=True) for a in answers]
  predictions = [passkey_data.postprocess(o) for o in outputs]
  return targets, predictions, metrics.exact_match(targets, predictions)["exact_match"]


def evaluate_passkey(model: Transformer, vocabulary, total_tokens: int, n_examples: int = 10,
                     chunk_size: Optional[int] = None, seed: int = 0, progress=None,
                     bos_id: Optional[int] = stream.BOS_ID, fmt: str = "paper") -> dict:
  """PassKey exact match of `model` on `n_examples` examples of `total_tokens` tokens.

  Args:
    model: a famjax.Transformer (any attention; constant memory in bswa/fam).
    vocabulary: a seqio vocabulary (famjax.data.get_vocabulary), the model's.
    total_tokens: prompt + answer + EOS per example, as the passkey_2k ... passkey_1m tasks (2**11 ...
      2**20); any value works.
    n_examples: examples at evenly spaced key depths 0 ... 1 (the tasks have 10).
    chunk_size: tokens per stream call (default 4 blocks).
    seed: the data seed (DataConfig.seed of the seqio task; 0 by default).
    progress: None, True (a progress line on stderr) or a famjax.evaluation.progress.Progress.
    bos_id: prepended to every prompt (0, as in famjax's training batches); None for none.
    fmt: the text format, "paper" or "short" (famjax.data.passkey.FORMATS; the model's training one).

  Returns a JSON-able dict: total_tokens, filler_tokens, n, exact_match (percent), per_depth (a list of
  {depth, n, exact_match}), predictions (per example: depth, target, prediction, output (the decoded
  continuation), correct), chunk_size, seconds, tokens_per_second.
  """
  chunk_size = chunk_size or stream.default_chunk_size(model.config)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  t0 = time.perf_counter()
  examples = passkey_examples(vocabulary, total_tokens, n_examples, seed, fmt)
  new_tokens = max(len(vocabulary.encode(ex["answer"])) for ex in examples) + EXTRA_TOKENS
  reporter = progress_lib.as_progress(progress, f"passkey {total_tokens:,} tokens")
  if reporter is not None:
    reporter.start(sum(len(ex["prompt_ids"]) + (bos_id is not None) for ex in examples))

  outputs = answer(model, vocabulary, examples, chunk_size, new_tokens, bos_id, reporter)
  if reporter is not None:
    reporter.finish()

  targets, predictions, exact = score([ex["answer"] for ex in examples], outputs)
  seconds = time.perf_counter() - t0
  read = sum(len(ex["prompt_ids"]) for ex in examples)
  rows_out = [{"depth": ex["depth"], "target": t, "prediction": p, "output": o, "correct": t == p}
              for ex, t, p, o in zip(examples, targets, predictions, outputs)]
  return {"total_tokens": int(total_tokens), "format": fmt,
          "filler_tokens": filler_tokens(vocabulary, total_tokens, fmt), "n": len(examples),
          "exact_match": exact, "per_depth": _per_depth(rows_out),
          "predictions": rows_out, "chunk_size": int(chunk_size), "seconds": seconds,
          "tokens_per_second": read / seconds if seconds > 0 else 0.0}


def answer(model: Transformer, vocabulary, examples: list[dict], chunk_size: int, new_tokens: int,
           bos_id: Optional[int] = stream.BOS_ID, progress=None) -> list[str]:
  """The decoded greedy continuation (up to `new_tokens`, cut at EOS) of every example's `prompt_ids`,
  read on the streaming path in chunks of `chunk_size`, examples of equal length batched together."""
  eos = vocabulary.eos_id
  outputs: list[Optional[str]] = [None] * len(examples)
  rows = stream.rows_per_call(chunk_size, model.config.vocab_size)
  for batch in stream.equal_length_batches([len(ex["prompt_ids"]) for ex in examples], rows):
    tokens = np.stack([stream.with_bos(examples[i]["prompt_ids"], bos_id) for i in batch])
    last, state = stream.read_prompt(model, tokens, chunk_size, progress)
    generated = stream.greedy_continue(model, state, last, new_tokens, stop_ids=(eos,))
    for i, ids in zip(batch, generated):
      outputs[i] = vocabulary.decode(stream.cut_at_stop(ids, (eos,)))
  return outputs


def _per_depth(rows: list[dict]) -> list[dict]:
  by_depth: dict[float, list[bool]] = defaultdict(list)
  for row in rows:
    by_depth[row["depth"]].append(row["correct"])
  return [{"depth": d, "n": len(hits), "exact_match": 100.0 * float(np.mean(hits))}
          for d, hits in sorted(by_depth.items())]
