"""Evaluation tasks on the streaming path: Scrolls Qasper / QuALITY / NarrativeQA, XLSum, PG-19, Isabelle,
the GPT-3 suite (or any seqio task famjax registers), scored with the task's own seqio metric functions.

  tasks = load_tasks("scrolls_qasper", vocabulary="byte", split="validation", max_examples=100)
  result = evaluate_task(model, vocab, tasks[0], max_new_tokens=128)

- Question answering and summarisation: the whole prompt is streamed in chunks (nothing is truncated,
  whatever the document's length), then up to `max_new_tokens` greedy tokens, stopping at EOS; the
  decoded text goes through the task's postprocessor and metric functions (ROUGE-L, accuracy, exact
  match: famjax.data.metrics).
- Language modelling (a task scored by next-token accuracy, PG-19, Isabelle): the text is streamed in
  chunks and the argmax after every position is compared with the next token, over the answer's tokens
  (all of them, or with `text_tokens` = N the first N of each text: a PG-19 book or an Isabelle theory
  truncated to its first N tokens, as long-context evaluations fix the length they score).
- Rank classification (a task with seqio score metrics, the GPT-3 rank tasks): every option's
  log-likelihood after its context (famjax.evaluation.rank), the scores going to the score metrics.

Examples come from famjax.data.get_examples: TFDS data and the GPT-3 JSON lines are read from the
prepared data directory and never downloaded; data that is not there raises
famjax.data.TfdsNotPreparedError or Gpt3DataNotFoundError (both FileNotFoundErrors) at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable, Optional

import numpy as np

from famjax import data as data_lib
from famjax.data import metrics
from famjax.data import tasks as tasks_lib
from famjax.evaluation import progress as progress_lib
from famjax.evaluation import rank, stream
from famjax.model import Transformer


@dataclasses.dataclass(frozen=True)
class TaskData:
  """One seqio task's evaluation examples and how to score them."""

  name: str  # the seqio task's name (with a vocabulary suffix for SentencePiece vocabularies)
  split: str
  examples: tuple  # dicts with inputs, targets (ids; targets end in EOS), their *_pretokenized texts
  metric_fns: tuple
  postprocess: Callable  # seqio's Task.postprocess_fn(text, example=..., is_target=...)
  score_metric_fns: tuple = ()  # seqio's (targets, scores) metrics: a rank classification task

  @property
  def language_modelling(self) -> bool:
    """Scored by next-token accuracy over the answer rather than by generating it."""
    return any(fn is metrics.next_token_accuracy for fn in self.metric_fns)

  @property
  def rank_classification(self) -> bool:
    """Scored by its options' log-likelihoods (examples carry option_contexts, option_continuations)."""
    return bool(self.score_metric_fns)


def load_tasks(name: str, vocabulary: str = "byte", split: str = "validation", tfds_data_dir: str = "",
               max_examples: int = 0) -> list[TaskData]:
  """The tasks of `name` (a task, or each task of a mixture) with up to `max_examples` (0: all)
  examples each, read in order. Raises TfdsNotPreparedError for a TFDS dataset that is not prepared,
  Gpt3DataNotFoundError for a GPT-3 task's missing file, ValueError for an unknown name, a missing
  split, a malformed GPT-3 line or a task without examples."""
  config = data_lib.DataConfig(mixture=name, vocabulary=vocabulary, tfds_data_dir=tfds_data_dir,
                               repeat_segment_len=0)
  out, missing = [], []
  for task in tasks_lib.tasks_of(tasks_lib.ensure_registered(config)):
    if split not in task.splits:
      raise ValueError(f"{task.name}: no split {split!r} (it has {', '.join(task.splits)})")
    try:
      examples = data_lib.get_examples(config.replace(mixture=task.name), split=split)
      examples = tuple(itertools.islice(examples, max_examples or None))
    except FileNotFoundError as e:  # TfdsNotPreparedError, Gpt3DataNotFoundError: all of them, below
      missing.append((task.name, e))
      continue
    if not examples:
      raise ValueError(f"{task.name}: the {split!r} split has no example")
    out.append(TaskData(task.name, split, examples, tuple(task.predict_metric_fns), task.postprocess_fn,
                        tuple(task.score_metric_fns)))
  if missing:
    raise _missing_data(name, missing)
  return out


def _missing_data(name: str, missing: list) -> FileNotFoundError:
  """One error for the tasks of `name` whose data is missing: their names, then the first one's
  preparation steps (the others' are alike; docs/evaluation.md has them all)."""
  first = missing[0][1]
  if len(missing) == 1:
    return first
  names = ", ".join(task for task, _ in missing)
  return type(first)(f"{name}: {len(missing)} tasks have no data ({names}). {first}")


def evaluate_task(model: Transformer, vocabulary, task: TaskData, chunk_size: Optional[int] = None,
                  max_new_tokens: int = 128, progress=None, bos_id: Optional[int] = stream.BOS_ID,
                  text_tokens: int = 0) -> dict:
  """The task's metrics for `model` (percentages), streaming every example in chunks of `chunk_size`
  tokens (default 4 blocks). `text_tokens` > 0: a language-modelling task scores the first that many
  tokens of each answer (0: all; other tasks ignore it).

  Returns a JSON-able dict: task, split, n, metrics ({name: value}), predictions (per example:
  prompt_tokens and target/prediction/generated_tokens; or tokens and next_token_accuracy; or label,
  log_likelihoods, prediction and prediction_norm for rank classification), seconds, tokens_per_second.
  """
  chunk_size = chunk_size or stream.default_chunk_size(model.config)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if text_tokens < 0:
    raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
  if text_tokens and task.language_modelling:
    task = dataclasses.replace(task, examples=tuple({**ex, "targets": ex["targets"][:text_tokens]}
                                                    for ex in task.examples))
  reporter = progress_lib.as_progress(progress, task.name)
  t0 = time.perf_counter()
  read = sum(_tokens_read(ex, task, vocabulary, bos_id) for ex in task.examples)
  if reporter is not None:
    reporter.start(read)
  if task.rank_classification:
    scores, rows = _rank_scores(model, vocabulary, task, chunk_size, reporter, bos_id)
  elif task.language_modelling:
    scores, rows = _next_token_scores(model, task, chunk_size, reporter, bos_id)
  else:
    scores, rows = _generation_scores(model, vocabulary, task, chunk_size, max_new_tokens, reporter,
                                      bos_id)
  if reporter is not None:
    reporter.finish()
  seconds = time.perf_counter() - t0
  return {"task": task.name, "split": task.split, "n": len(task.examples), "metrics": scores,
          "predictions": rows, "chunk_size": int(chunk_size), "seconds": seconds,
          "tokens_per_second": read / seconds if seconds > 0 else 0.0}


def _generation_scores(model, vocabulary, task: TaskData, chunk_size, max_new_tokens, reporter, bos_id):
  eos = vocabulary.eos_id
  targets, predictions, rows = [], [], []
  for ex in task.examples:
    tokens = stream.with_bos(ex["inputs"], bos_id)[None]
    last, state = stream.read_prompt(model, tokens, chunk_size, reporter)
    generated = stream.cut_at_stop(stream.greedy_continue(model, state, last, max_new_tokens, (eos,))[0],
                                   (eos,))
    output = vocabulary.decode(generated)
    target = task.postprocess(ex["targets_pretokenized"], example=ex, is_target=True)
    prediction = task.postprocess(output, example=ex, is_target=False)
    targets.append(target)
    predictions.append(prediction)
    rows.append({"prompt_tokens": int(len(ex["inputs"])), "target": target, "prediction": prediction,
                 "generated_tokens": len(generated)})
  scores = {}
  for fn in task.metric_fns:
    scores.update(fn(targets, predictions))
  return scores, rows


def _rank_scores(model, vocabulary, task: TaskData, chunk_size, reporter, bos_id):
  targets, all_scores, rows = [], [], []
  for ex in task.examples:
    contexts, continuations = _options(ex)
    lls = rank.option_log_likelihoods(model, vocabulary, contexts, continuations, chunk_size, bos_id,
                                      reporter)
    target = task.postprocess(ex["targets_pretokenized"], example=ex, is_target=True)
    targets.append(target)
    all_scores.append(task.postprocess(lls, example=ex, is_target=False))
    per_byte = lls / np.maximum([len(c.encode("utf-8")) for c in continuations], 1)
    rows.append({"label": int(ex["label"]), "log_likelihoods": [float(x) for x in lls],
                 "prediction": int(np.argmax(lls)), "prediction_norm": int(np.argmax(per_byte))})
  scores = {}
  for fn in task.score_metric_fns:
    scores.update(fn(targets, all_scores))
  return scores, rows


def _options(ex: dict) -> tuple[list[str], list[str]]:
  texts = lambda values: [v.decode("utf-8") for v in values]  # noqa: E731
  return texts(ex["option_contexts"]), texts(ex["option_continuations"])


def _next_token_scores(model, task: TaskData, chunk_size, reporter, bos_id):
  all_targets, all_predictions, rows = [], [], []
  for ex in task.examples:
    targets, predictions = _teacher_forced(model, ex, chunk_size, reporter, bos_id)
    all_targets.append(targets)
    all_predictions.append(predictions)
    rows.append({"tokens": int(len(targets)),
                 **metrics.next_token_accuracy([targets], [predictions])})
  scores = {}
  for fn in task.metric_fns:
    scores.update(fn(all_targets, all_predictions))
  return scores, rows


def _teacher_forced(model, ex: dict, chunk_size: int, reporter, bos_id) -> tuple[np.ndarray, np.ndarray]:
  """(the answer's token ids, the argmax predictions of each of them), from one streamed pass."""
  text = stream.with_bos(np.concatenate([ex["inputs"], ex["targets"]]), bos_id)
  first = len(text) - len(ex["targets"])  # index in `text` of the answer's first token
  if first == 0:  # no BOS and no prompt: the first token has nothing to be predicted from
    first = 1
  predicted = stream.next_token_argmax(model, text[None, :-1], chunk_size, reporter)[0]
  return np.asarray(text[first:], np.int32), predicted[first - 1:]


def _tokens_read(ex: dict, task: TaskData, vocabulary, bos_id) -> int:
  if task.rank_classification:
    return rank.tokens_read(vocabulary, *_options(ex), bos_id)
  n = len(ex["inputs"]) + (bos_id is not None)
  return n + len(ex["targets"]) - 1 if task.language_modelling else n
