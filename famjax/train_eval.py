"""The evaluation edge of famjax.train: PassKey exact match during training (config.eval_passkey_*).

famjax.training may not import famjax.evaluation or famjax.data; this module joins them for the loop,
which calls `passkey_eval(job, data)(params)` at every evaluation step (famjax/training/loop.py).
"""

from __future__ import annotations

import jax

from famjax.training.config import ConfigError


def passkey_lengths(job, data) -> list[int]:
  """The lengths of the PassKey check during training, checked (ConfigError naming the field)."""
  from famjax.data import passkey as passkey_data  # pylint: disable=import-outside-toplevel
  from famjax.evaluation.lengths import parse_lengths  # pylint: disable=import-outside-toplevel
  t = job.train
  try:
    lengths = parse_lengths(t.eval_passkey_lengths)
  except ValueError as e:
    raise ConfigError(f"config.eval_passkey_lengths={t.eval_passkey_lengths!r}: {e}") from None
  try:
    passkey_data.get_format(t.eval_passkey_format)
  except ValueError as e:
    raise ConfigError(f"config.eval_passkey_format: {e}") from None
  if data.synthetic:
    raise ConfigError("config.eval_passkey_lengths: PassKey needs the data's vocabulary; the synthetic "
                      "stream has none")
  if jax.process_count() > 1:
    raise ConfigError("config.eval_passkey_lengths: the PassKey check during training runs in "
                      "single-process jobs only (evaluate the checkpoints with famjax.eval)")
  return lengths


def passkey_eval(job, data):
  """params -> {eval_passkey_<length>: exact match in [0, 1]}: famjax.eval's PassKey, on the streaming
  path, `eval_passkey_examples` examples per length at evenly spaced depths (the same ones every time)."""
  from famjax import Transformer  # pylint: disable=import-outside-toplevel
  from famjax.data import get_vocabulary  # pylint: disable=import-outside-toplevel
  from famjax.evaluation.lengths import format_length  # pylint: disable=import-outside-toplevel
  from famjax.evaluation.passkey import evaluate_passkey  # pylint: disable=import-outside-toplevel
  lengths, vocabulary, t = passkey_lengths(job, data), get_vocabulary(data.config), job.train

  def check(params: dict) -> dict:
    model = Transformer(job.model, params=params)
    return {f"eval_passkey_{format_length(n)}":
            evaluate_passkey(model, vocabulary, n, t.eval_passkey_examples, fmt=t.eval_passkey_format)[
                "exact_match"] / 100 for n in lengths}
  return check
