"""Packing examples into fixed-length rows with per-token loss weights (spec §7), in numpy.

An example is its prompt tokens (instruction and few-shot exemplars: weight `instruction_weight`, 0
in the paper) followed by its answer tokens (weight 1, EOS included). Rows are filled greedily in
stream order: an example goes into the current row if it fits, otherwise the row is finished and the
example starts the next one. Each finished training row then gets the paper's augmentation: the marker
"[repeat random segment]:" (weight 0) and `repeat_len` consecutive tokens copied from a random place
in the row (weight `repeat_weight`). The rest is padding: token 0, weight 0, segment 0.

Why numpy and not seqio.utils.trim_and_pack_dataset: seqio's packer finds lengths by counting non-zero
values, so it would cut every weight-0 token, it casts everything to int32, and it batches `seq_len`
examples per call (8704 x 8704 ids at the paper's length). Here weights are carried next to the tokens
and the code is a few lines that tests can check directly.

With `align` > 1 every example of a row starts at a multiple of `align` (padding between examples):
with align = the model's block size, a FAM model under boundary masks computes every packed example
exactly as if it were alone (famjax.model.fam.fam_restarts).

Segment ids number the examples of a row from 1. The repeated segment carries the id of the row's last
example: under boundary masks (mask_between_examples) it may only see that example, so it is copied
from it; without masks (the paper) it is copied from anywhere in the row. Decoder inputs are the
targets shifted right by one within each segment, with 0 (BOS) at the start of every segment.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from famjax.data.stats import SourceStats

ROW_KEYS = ("inputs", "targets", "weights", "segment_ids")


@dataclasses.dataclass(frozen=True)
class PackingSpec:
  seq_len: int
  pack: bool = True
  mask_between_examples: bool = False
  repeat_len: int = 0
  repeat_weight: float = 0.1
  marker: tuple[int, ...] = ()
  instruction_weight: float = 0.0
  too_long: str = "truncate"
  align: int = 1

  @property
  def budget(self) -> int:
    """Tokens of examples a row holds: what the repeated segment and its marker leave."""
    return self.seq_len - (len(self.marker) + self.repeat_len if self.repeat_len else 0)


def example_weights(n_tokens: int, n_prompt: int, instruction_weight: float) -> np.ndarray:
  weights = np.ones(n_tokens, np.float32)
  weights[:n_prompt] = instruction_weight
  return weights


def truncate(tokens: np.ndarray, weights: np.ndarray, n_prompt: int, budget: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Keep the end of the prompt (where the question is) and the start of the answer."""
  if len(tokens) - n_prompt >= budget:
    return tokens[n_prompt:n_prompt + budget], weights[n_prompt:n_prompt + budget]
  return tokens[-budget:], weights[-budget:]


def shift_right(targets: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """Decoder inputs: inputs[t] = targets[t - 1] within a segment, 0 at each segment start. Rows are
  the last axis ([seq_len] or [rows, seq_len])."""
  inputs = np.zeros_like(targets)
  inputs[..., 1:] = targets[..., :-1]
  starts = np.ones(targets.shape, bool)
  starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
  inputs[starts | (segment_ids == 0)] = 0
  return inputs


class Packer:
  """Turns a stream of examples into rows of `spec.seq_len` tokens (see the module docstring)."""

  def __init__(self, spec: PackingSpec, rng: np.random.Generator, stats: Optional[SourceStats] = None,
               repeat: bool = True):
    """repeat: append the repeated segment (training only); rng chooses where it is copied from."""
    self.spec, self._rng, self._stats = spec, rng, stats or SourceStats()
    self._repeat = repeat and spec.repeat_len > 0
    self._budget = spec.budget if self._repeat else spec.seq_len
    self._parts: list[tuple[np.ndarray, np.ndarray]] = []
    self._used = 0
    # examples packed; rows finished; their non-padding tokens, of which repeated ones
    self.counts = {"examples": 0, "rows": 0, "tokens": 0, "repeat_tokens": 0}

  def add(self, tokens: np.ndarray, n_prompt: int, source: str) -> list[dict[str, np.ndarray]]:
    """Adds one example; returns the rows it finished (none, or one)."""
    weights = example_weights(len(tokens), n_prompt, self.spec.instruction_weight)
    if len(tokens) > self._budget:
      if self.spec.too_long == "skip":
        self._stats.add(source, "skipped_too_long")
        return []
      tokens, weights = truncate(tokens, weights, n_prompt, self._budget)
      self._stats.add(source, "truncated")
    if not len(tokens):
      return []
    rows = []
    start = -(-self._used // self.spec.align) * self.spec.align
    if self._parts and (not self.spec.pack or start + len(tokens) > self._budget):
      rows.append(self._finish())
      start = 0
    self._parts.append((tokens, weights, start))
    self._used = start + len(tokens)
    self.counts["examples"] += 1
    return rows

  def flush(self) -> list[dict[str, np.ndarray]]:
    """The partly filled row, if any (at the end of a finite stream)."""
    return [self._finish()] if self._parts else []

  def _finish(self) -> dict[str, np.ndarray]:
    L = self.spec.seq_len
    targets = np.zeros(L, np.int32)
    weights = np.zeros(L, np.float32)
    segment_ids = np.zeros(L, np.int32)
    pos = last_start = 0
    for segment, (t, w, start) in enumerate(self._parts, start=1):
      last_start, pos = start, start + len(t)
      targets[start:pos], weights[start:pos] = t, w
      segment_ids[start:pos] = segment
    self.counts["tokens"] += sum(len(t) for t, _, _ in self._parts)
    if self._repeat:
      pos = self._append_repeat(targets, weights, segment_ids, pos, last_start)
    self._parts, self._used = [], 0
    self.counts["rows"] += 1
    return {"inputs": shift_right(targets, segment_ids), "targets": targets, "weights": weights,
            "segment_ids": segment_ids}

  def _append_repeat(self, targets, weights, segment_ids, end: int, last_start: int) -> int:
    """Marker then a copied span, both in the last example's segment; returns the new end."""
    lo = last_start if self.spec.mask_between_examples else 0
    n = min(self.spec.repeat_len, end - lo)
    start = lo + int(self._rng.integers(0, end - lo - n + 1))
    span = targets[start:start + n].copy()
    marker = np.asarray(self.spec.marker, np.int32)
    segment = segment_ids[end - 1]
    pos = end
    for piece, weight in ((marker, 0.0), (span, self.spec.repeat_weight)):
      targets[pos:pos + len(piece)] = piece
      weights[pos:pos + len(piece)] = weight
      segment_ids[pos:pos + len(piece)] = segment
      pos += len(piece)
    self.counts["repeat_tokens"] += n
    self.counts["tokens"] += len(marker) + n
    return pos


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
  """An all-padding row (weight 0), to fill the last batch of a finite stream."""
  return {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
          "weights": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32)}
