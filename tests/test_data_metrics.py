"""Metrics of the evaluation tasks and the PassKey answer postprocessor against hand-computed values."""

import numpy as np
import pytest

from famjax.data import metrics, passkey

# The metrics: the full suite only (make test; tests/test_evaluation.py's fast tests use them).
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("reference, prediction, lcs, expected", [
    # "the cat on the mat": P = R = 5/6
    ("the cat sat on the mat", "the cat lay on the mat", 5, 5 / 6),
    # LCS "b d": P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7
    ("a b c d", "b d e", 2, 4 / 7),
    # case and punctuation are not tokens: LCS "police killed the gunman" (4 of 4 and of 6)
    ("Police killed the gunman.", "the police KILLED the gunman!", 4, 2 * 1 * (4 / 5) / (1 + 4 / 5)),
    # nothing in common; an empty prediction
    ("x y z", "p q", 0, 0.0),
    ("x y z", "", 0, 0.0),
    # order matters: the reverse shares a single token
    ("one two three", "three two one", 1, 1 / 3),
])
def test_rouge_l_against_hand_values(reference, prediction, lcs, expected):
  assert metrics.lcs_length(metrics.rouge_tokens(reference), metrics.rouge_tokens(prediction)) == lcs
  assert metrics.rouge_l_fmeasure(reference, prediction) == pytest.approx(expected)


def test_rouge_l_averages_examples_and_takes_the_best_reference():
  result = metrics.rouge_l(["a b c d", ["x y z", "the cat sat on the mat"]],
                           ["b d e", "the cat lay on the mat"])
  assert result == {"rougeL": pytest.approx(100 * (4 / 7 + 5 / 6) / 2)}


def test_accuracy_and_next_token_accuracy():
  assert metrics.accuracy(["The Answer", "B"], ["the  answer", "C"]) == {"accuracy": 50.0}
  targets = [np.array([5, 6, 7, 0]), np.array([9, 9])]
  predictions = [np.array([5, 0, 7, 3]), np.array([9, 1])]  # 3 of 5 non-padding tokens right
  assert metrics.next_token_accuracy(targets, predictions) == {"next_token_accuracy": 60.0}
  with pytest.raises(ValueError):
    metrics.rouge_l(["a"], [])


def test_exact_match_and_the_passkey_postprocessor():
  assert metrics.exact_match([" 12345", "abc", "x"], ["12345 ", "abd", " x "]) == {
      "exact_match": pytest.approx(200 / 3)}
  assert passkey.postprocess(" 12345. Remember it.") == "12345"
  assert passkey.postprocess("The pass key is 0042 and 7") == "0042"
  assert passkey.postprocess("  no digits ") == "no digits"
  assert metrics.exact_match([], []) == {"exact_match": 0.0}
