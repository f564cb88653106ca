"""Training rows from their pieces, when they are read: targets, segment ids, loss weights and decoder
inputs (numpy, a batch at a time). The plan (famjax.data.plan) says which pieces; this computes what
famjax.data.packing.Packer would have produced for the same pieces:

- pieces placed in order, each at the next multiple of `align`; segment ids 1, 2, ... per piece;
- weights: `instruction_weight` on the prompt tokens a piece holds, 1 on its answer tokens (EOS too);
- the marker (weight 0) and the repeated span (`repeat_weight`), copied from the row's own targets at
  the plan's start, right after the last piece, in the last piece's segment;
- padding: token 0, weight 0, segment 0; inputs: the targets shifted right within each segment.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from famjax.data.packing import shift_right


@dataclasses.dataclass(frozen=True)
class RowFormat:
  """What the reader needs of a DataConfig to turn pieces into rows."""

  seq_len: int
  align: int = 1
  instruction_weight: float = 0.0
  repeat_len: int = 0
  repeat_weight: float = 0.1
  marker: tuple[int, ...] = ()
  mask_between_examples: bool = False


def assemble(tokens: list[np.ndarray], prompts: np.ndarray, offsets: np.ndarray, row_of_piece: np.ndarray,
             repeat_starts: np.ndarray, fmt: RowFormat) -> dict[str, np.ndarray]:
  """Rows of a batch: [len(repeat_starts), seq_len] arrays.

  tokens: each piece's token ids (already cut to the piece); prompts: each piece's example's prompt
  length; offsets: where in its example each piece starts (its tokens are example[offset:offset +
  len]); row_of_piece: each piece's row in the batch (ascending, every row at least one piece);
  repeat_starts: each row's repeated span start (-1: none).
  """
  n_rows, L = len(repeat_starts), fmt.seq_len
  targets = np.zeros((n_rows, L), np.int32)
  weights = np.zeros((n_rows, L), np.float32)
  segment_ids = np.zeros((n_rows, L), np.int32)
  lengths = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
  aligned = -(-lengths // fmt.align) * fmt.align
  before = np.concatenate([[0], np.cumsum(aligned)[:-1]])  # aligned tokens before each piece, batch-wide
  first = np.searchsorted(row_of_piece, np.arange(n_rows))  # each row's first piece
  starts = (before - before[first][row_of_piece]).tolist()  # where each piece starts in its row
  segments = (np.arange(len(tokens)) - first[row_of_piece] + 1).tolist()
  in_prompt = np.clip(np.asarray(prompts) - np.asarray(offsets), 0, lengths).tolist()  # prompt tokens held
  instruction = np.float32(fmt.instruction_weight)
  for ids, r, s, n, segment, p in zip(tokens, row_of_piece.tolist(), starts, lengths.tolist(), segments,
                                      in_prompt):
    targets[r, s:s + n] = ids
    segment_ids[r, s:s + n] = segment
    weights[r, s:s + p] = instruction
    weights[r, s + p:s + n] = 1.0
  if fmt.repeat_len:
    marker = np.asarray(fmt.marker, np.int32)
    last = np.concatenate([first[1:], [len(tokens)]]) - 1  # each row's last piece
    for r in range(n_rows):
      used = starts[last[r]] + int(lengths[last[r]])
      lo = starts[last[r]] if fmt.mask_between_examples else 0
      n = min(fmt.repeat_len, used - lo)
      span = targets[r, repeat_starts[r]:repeat_starts[r] + n].copy()
      pos = used
      for part, weight in ((marker, 0.0), (span, fmt.repeat_weight)):
        targets[r, pos:pos + len(part)] = part
        weights[r, pos:pos + len(part)] = weight
        segment_ids[r, pos:pos + len(part)] = segments[last[r]]
        pos += len(part)
  return {"inputs": shift_right(targets, segment_ids), "targets": targets, "weights": weights,
          "segment_ids": segment_ids}
