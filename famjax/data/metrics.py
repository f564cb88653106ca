"""Evaluation metrics of the famjax tasks, as seqio metric functions `(targets, predictions) -> dict`.

All values are percentages (as in T5/seqio). rouge-score is not a dependency, so ROUGE-L is computed
here: the F-measure of the longest common subsequence of tokens, with rouge-score's default tokenizer
(lowercase, runs of [a-z0-9] are tokens) and no stemming; with several references, the best one counts.

- rouge_l: Scrolls Qasper, NarrativeQA, XLSum.
- accuracy: Scrolls QuALITY (the answer text, compared after normalising case and spaces).
- exact_match: PassKey (predictions are postprocessed to the key first).
- next_token_accuracy: PG-19 and Isabelle, over token ids from a teacher-forced forward pass.
- squad: the GPT-3 generation tasks (TriviaQA, Natural Questions, WebQuestions, SQuAD v2, LAMBADA):
  exact match and token F1 after SQuAD's answer normalisation, the best over the references.
- rank_classification: the GPT-3 rank tasks (HellaSwag, PIQA, ARC, ...): a seqio score metric, the
  option with the highest log-likelihood against the label (and the same per byte of the option).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence, Union

import numpy as np

_TOKEN = re.compile(r"[a-z0-9]+")

Reference = Union[str, Sequence[str]]


def rouge_tokens(text: str) -> list[str]:
  return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence (dynamic programming, one row at a time)."""
  if len(a) < len(b):
    a, b = b, a
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def rouge_l_fmeasure(reference: str, prediction: str) -> float:
  """ROUGE-L F1 in [0, 1]: 2PR/(P+R) with P = LCS/len(prediction), R = LCS/len(reference)."""
  ref, pred = rouge_tokens(reference), rouge_tokens(prediction)
  if not ref or not pred:
    return 0.0
  lcs = lcs_length(ref, pred)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(pred), lcs / len(ref)
  return 2 * precision * recall / (precision + recall)


def _references(target: Reference) -> list[str]:
  return [target] if isinstance(target, str) else list(target)


def rouge_l(targets: Sequence[Reference], predictions: Sequence[str]) -> dict[str, float]:
  """Mean over examples of the best ROUGE-L F-measure against the example's references."""
  _same_length(targets, predictions)
  scores = [max(rouge_l_fmeasure(r, p) for r in _references(t)) for t, p in zip(targets, predictions)]
  return {"rougeL": 100.0 * float(np.mean(scores)) if scores else 0.0}


def _normalise(text: str) -> str:
  return " ".join(text.lower().split())


def accuracy(targets: Sequence[Reference], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to a reference, ignoring case and runs of whitespace."""
  _same_length(targets, predictions)
  hits = [any(_normalise(r) == _normalise(p) for r in _references(t))
          for t, p in zip(targets, predictions)]
  return {"accuracy": 100.0 * float(np.mean(hits)) if hits else 0.0}


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions identical to their target after stripping surrounding whitespace."""
  _same_length(targets, predictions)
  hits = [str(t).strip() == str(p).strip() for t, p in zip(targets, predictions)]
  return {"exact_match": 100.0 * float(np.mean(hits)) if hits else 0.0}


def next_token_accuracy(targets: Sequence[np.ndarray], predictions: Sequence[np.ndarray]
                        ) -> dict[str, float]:
  """Percentage of target token ids equal to the argmax prediction at the same position, over all
  tokens of all examples (the padding id 0 is not counted)."""
  _same_length(targets, predictions)
  correct = total = 0
  for t, p in zip(targets, predictions):
    t, p = np.asarray(t), np.asarray(p)
    if t.shape != p.shape:
      raise ValueError(f"next_token_accuracy: target shape {t.shape} != prediction shape {p.shape}")
    mask = t != 0
    correct += int(np.sum((t == p) & mask))
    total += int(np.sum(mask))
  return {"next_token_accuracy": 100.0 * correct / total if total else 0.0}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD's answer normalisation: lowercase, drop ASCII punctuation, drop the articles a/an/the, and
  collapse whitespace (in that order, as the official evaluation script does)."""
  text = text.lower().translate(_PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1(reference: str, prediction: str) -> float:
  """Token F1 in [0, 1] of the normalised texts (bag of words); 1.0 when both are empty."""
  ref, pred = normalize_answer(reference).split(), normalize_answer(prediction).split()
  if not ref or not pred:
    return float(ref == pred)
  common = sum((collections.Counter(ref) & collections.Counter(pred)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Reference], predictions: Sequence[str]) -> dict[str, float]:
  """Exact match and token F1 (percent) after normalize_answer, each the best over an example's
  references, averaged over examples. An example without references (SQuAD v2's unanswerable) has
  the empty answer as its reference."""
  _same_length(targets, predictions)
  exact, f1 = [], []
  for target, prediction in zip(targets, predictions):
    references = _references(target) or [""]
    exact.append(max(float(normalize_answer(r) == normalize_answer(prediction)) for r in references))
    f1.append(max(answer_f1(r, prediction) for r in references))
  return {"exact_match": 100.0 * float(np.mean(exact)) if exact else 0.0,
          "f1": 100.0 * float(np.mean(f1)) if f1 else 0.0}


def rank_classification(targets: Sequence[tuple[int, Sequence[int]]],
                        scores: Sequence[Sequence[float]]) -> dict[str, float]:
  """A seqio score metric. targets[i] = (label, the options' lengths in UTF-8 bytes); scores[i] = the
  options' log-likelihoods (sums over their tokens). `accuracy`: the argmax option is the label;
  `accuracy_norm`: the same with each log-likelihood divided by its option's byte length
  (lm-evaluation-harness's acc_norm). Ties go to the first option. Percentages."""
  if len(targets) != len(scores):
    raise ValueError(f"{len(targets)} targets but {len(scores)} scores")
  hits, hits_norm = [], []
  for (label, lengths), lls in zip(targets, scores):
    lls = np.asarray(lls, np.float64)
    if lls.shape != (len(lengths),) or not 0 <= label < len(lengths):
      raise ValueError(f"rank_classification: {len(lls)} scores for {len(lengths)} options, label "
                       f"{label}")
    hits.append(int(np.argmax(lls)) == label)
    hits_norm.append(int(np.argmax(lls / np.maximum(np.asarray(lengths, np.float64), 1))) == label)
  return {"accuracy": 100.0 * float(np.mean(hits)) if hits else 0.0,
          "accuracy_norm": 100.0 * float(np.mean(hits_norm)) if hits_norm else 0.0}


def _same_length(targets, predictions):
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
