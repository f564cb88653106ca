"""The recall suite (multi-key PassKey, MQAR-like associative recall) on the streaming path.

  result = evaluate_recall(model, vocabulary, "mqar", total_tokens=8192, n_examples=10)
  result["exact_match"]   # percent of questions whose value the model gives exactly

The examples are those of famjax.data's `multikey_*` / `mqar_*` evaluation tasks for the same total
length and seed (famjax.data.recall.eval_examples). Each example's whole text (prompt + answer) is read
once, in chunks, and a question counts as answered when the argmax after every position of its value
is the value's next token: with the true text before it (teacher forcing), which is exactly when greedy
decoding from the question would write the value. So MQAR's questions are scored each with the true
answers of the earlier ones before it, and multi-key's single question as PassKey's greedy answer
(without PassKey's check that no digit follows). Examples of equal token length are streamed together.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Optional

import numpy as np

from famjax.data import metrics
from famjax.data import recall as recall_data
from famjax.evaluation import progress as progress_lib
from famjax.evaluation import stream
from famjax.model import Transformer

TASKS = tuple(recall_data.FORMATS)  # "multikey", "mqar"


def recall_examples(vocabulary, task: str, total_tokens: int,
                    n_examples: int = recall_data.EVAL_EXAMPLES, seed: int = 0) -> list[dict]:
  """The examples of the eval task: dicts with `text_ids` (prompt + answer, no EOS), `spans` (token
  [start, end) of every scored value in text_ids), `values` (their text) and `depth`.

  The text is encoded piece by piece, cut at the spans, so a span is whole tokens in any vocabulary;
  in the byte vocabulary the ids are the seqio task's."""
  if total_tokens < 1 or n_examples < 1:
    raise ValueError(f"total_tokens and n_examples must be >= 1, got {total_tokens}, {n_examples}")
  out = []
  for ex in recall_data.eval_examples(total_tokens, recall_data.get_format(task), n_examples, seed):
    text = ex.prompt + ex.answer
    ids, spans, at = [], [], 0
    for start, end in ex.spans:
      ids += vocabulary.encode(text[at:start])
      value = vocabulary.encode(text[start:end])
      spans.append((len(ids), len(ids) + len(value)))
      ids += value
      at = end
    ids += vocabulary.encode(text[at:])
    out.append({"text_ids": np.asarray(ids, np.int32), "spans": spans, "depth": ex.depth,
                "values": [text[s:e] for s, e in ex.spans]})
  return out


def score(values: list[str], outputs: list[str]) -> float:
  """Exact match (%) of the predicted values, as the seqio tasks score them (first number, exactly)."""
  targets = [recall_data.postprocess(v, is_target=True) for v in values]
  predictions = [recall_data.postprocess(o) for o in outputs]
  return metrics.exact_match(targets, predictions)["exact_match"]


def evaluate_recall(model: Transformer, vocabulary, task: str, total_tokens: int, n_examples: int = 10,
                    chunk_size: Optional[int] = None, seed: int = 0, progress=None,
                    bos_id: Optional[int] = stream.BOS_ID) -> dict:
  """Exact match of `model` on the questions of `n_examples` examples of `task` ("multikey" or "mqar")
  of `total_tokens` tokens (prompt + answer + EOS in the byte vocabulary).

  Returns a JSON-able dict: task, total_tokens, n_examples, n (questions), exact_match (percent over the
  questions), per_depth (multikey: the asked needle's depth) or per_query (mqar: the question's place,
  0 = first), predictions (per question: example, query, depth, target, prediction, correct),
  chunk_size, seconds, tokens_per_second.
  """
  chunk_size = chunk_size or stream.default_chunk_size(model.config)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  t0 = time.perf_counter()
  examples = recall_examples(vocabulary, task, total_tokens, n_examples, seed)
  reporter = progress_lib.as_progress(progress, f"{task} {total_tokens:,} tokens")
  if reporter is not None:
    reporter.start(sum(len(ex["text_ids"]) - 1 + (bos_id is not None) for ex in examples))
  outputs = answer(model, vocabulary, examples, chunk_size, bos_id, reporter)
  if reporter is not None:
    reporter.finish()

  rows = []
  for i, (ex, said) in enumerate(zip(examples, outputs)):
    for q, (value, output) in enumerate(zip(ex["values"], said)):
      rows.append({"example": i, "query": q, "depth": ex["depth"], "target": value, "prediction": output,
                   "correct": score([value], [output]) == 100.0})
  seconds = time.perf_counter() - t0
  read = sum(len(ex["text_ids"]) for ex in examples)
  group = "depth" if task == "multikey" else "query"
  return {"task": task, "total_tokens": int(total_tokens), "n_examples": len(examples), "n": len(rows),
          "exact_match": score([r["target"] for r in rows], [r["prediction"] for r in rows]),
          f"per_{group}": _per(rows, group), "predictions": rows, "chunk_size": int(chunk_size),
          "seconds": seconds, "tokens_per_second": read / seconds if seconds > 0 else 0.0}


def answer(model: Transformer, vocabulary, examples: list[dict], chunk_size: int,
           bos_id: Optional[int] = stream.BOS_ID, progress=None) -> list[list[str]]:
  """Per example, per span: the decoded argmax predictions of the span's tokens, each made after the
  true text before it (one streamed read of every text, equal lengths batched together)."""
  outputs: list[Optional[list[str]]] = [None] * len(examples)
  rows = stream.rows_per_call(chunk_size, model.config.vocab_size)
  for batch in stream.equal_length_batches([len(ex["text_ids"]) for ex in examples], rows):
    # [BOS] + text without its last token: position p of the argmax predicts text token p.
    tokens = np.stack([stream.with_bos(examples[i]["text_ids"], bos_id)[:-1] for i in batch])
    shift = 0 if bos_id is not None else 1  # without BOS, position p predicts token p + 1
    argmax = stream.next_token_argmax(model, tokens, chunk_size, progress)
    for i, predicted in zip(batch, argmax):
      outputs[i] = [vocabulary.decode(predicted[s - shift:e - shift].tolist())
                    for s, e in examples[i]["spans"]]
  return outputs


def _per(rows: list[dict], key: str) -> list[dict]:
  by: dict[float, list[bool]] = defaultdict(list)
  for row in rows:
    by[row[key]].append(row["correct"])
  return [{key: k, "n": len(hits), "exact_match": 100.0 * float(np.mean(hits))}
          for k, hits in sorted(by.items())]
