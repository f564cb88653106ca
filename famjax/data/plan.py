"""The packing plan: which pieces of which tokenized examples make training row r, from the examples'
lengths alone (never their tokens), as index arrays. A pure function of (the tasks' lengths and rates,
the packing fields, the seed); prefix-stable: the plan of more rows begins with the plan of fewer.

1. Slots: the mixture is a sequence of slots, one example of one task each. Task t's j-th draw has the
   time (j + phase_t) / p_t, p_t its share of the rates and phase_t in [0, 1) drawn from the seed; the
   slots are the draws in order of time. After any k slots every task has had k p_t draws, within about
   one: the mixture draws tasks at their rates. With rates proportional to the tasks' sizes (N examples
   in all), the first m N slots hold exactly m passes of every task.
2. Examples: a finite task's draw j is example perm_(t, pass)[j mod n_t], pass = j // n_t, a fresh
   permutation each pass (seeded by seed, task, pass): each pass reads every example once, none is cut
   short, and the counts of any two examples of a task differ by at most one. An endless (generated)
   task's draw j is its example j (they are drawn at random already); it needs as many examples as the
   rows consume (NeedMoreExamples says how many when it has too few).
3. Pieces: an example longer than a row holds is truncated to one contiguous range, the end of the
   prompt and the start of the answer (too_long="truncate"), or skipped ("skip"), as
   famjax.data.packing.truncate does.
4. Rows: greedy packing in slot order, the paper's and famjax.data.packing.Packer's: a piece goes into
   the current row if it fits (starting at the next multiple of pack_align), else it starts the next
   row; pack=False gives one piece per row.
5. The repeated segment: per row, where the copied span starts, uniform over the allowed places (the
   whole row, or its last example under mask_between_examples), from a per-block-of-rows generator.

Slots are produced in windows of time (window_bounds: growing to WINDOW_SLOTS) and packed as they come,
so memory is the tasks' lengths plus one window, whatever the number of rows. Loss weights and decoder
inputs are not in the plan: the reader computes them (famjax.data.rows).

Files of a plan (raw little-endian arrays; dtypes and counts in its manifest):
  row_start       int64 [rows + 1]   first piece of each row (and the end of the last)
  row_repeat      int32 [rows]       where the repeated span starts in the row (-1: no repeated segment)
  piece_task      uint8/uint16       each piece's task (its index in the manifest's task list)
  piece_example   uint32/int64       each piece's example index in its task
  trunc_piece     int64              the pieces that are truncated, ascending ...
  trunc_offset    int32              ... where in the example their tokens start
  trunc_length    int32              ... and how many they are
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Callable, Iterator, Sequence

import numpy as np

PLAN_VERSION = 1  # bump when the plan's math changes: older plans are then not reused
FIRST_WINDOW = 1 << 12  # slots of the first window of the mixture, then twice as many each, up to:
WINDOW_SLOTS = 1 << 20
ROW_BLOCK = 1 << 16  # rows per generator of the repeated segment's starts
_PHASE, _PASS, _REPEAT = 0xFA5E, 0x9A55, 0x5EED
FILES = {"row_start": "<i8", "row_repeat": "<i4", "piece_task": None, "piece_example": None,
         "trunc_piece": "<i8", "trunc_offset": "<i4", "trunc_length": "<i4"}


@dataclasses.dataclass(frozen=True)
class PackingFields:
  """What the plan needs of a DataConfig (the marker as its token count)."""

  seq_len: int
  pack: bool = True
  align: int = 1
  repeat_len: int = 0
  marker_len: int = 0
  mask_between_examples: bool = False
  too_long: str = "truncate"

  @property
  def budget(self) -> int:
    """Tokens of examples a row holds: what the repeated segment and its marker leave."""
    return self.seq_len - (self.marker_len + self.repeat_len if self.repeat_len else 0)


@dataclasses.dataclass
class TaskLengths:
  """One task as the plan sees it."""

  name: str
  lengths: np.ndarray  # int32 [examples]: tokens of each example (prompt + answer + EOS)
  prompts: np.ndarray  # int32 [examples]: prompt tokens of each
  rate: float = 1.0
  endless: bool = False

  def __len__(self) -> int:
    return len(self.lengths)


class NeedMoreExamples(Exception):
  """Endless tasks ran out of tokenized examples before the plan had its rows: {task: examples needed}
  (an estimate with a margin; tokenize that many and plan again)."""

  def __init__(self, needed: dict[str, int]):
    super().__init__(", ".join(f"{t}: {n}" for t, n in needed.items()))
    self.needed = needed


# -- 1 and 2: slots and examples ----------------------------------------------------------------------

def phases(names: Sequence[str], seed: int) -> np.ndarray:
  return np.array([np.random.default_rng([seed, _PHASE, zlib.crc32(n.encode())]).random() for n in names])


def pass_permutation(name: str, size: int, seed: int, pass_: int) -> np.ndarray:
  """The order of a finite task's examples in pass `pass_`."""
  order = np.random.default_rng([seed, _PASS, zlib.crc32(name.encode()), pass_]).permutation(size)
  return order.astype(np.int32 if size < 1 << 31 else np.int64)


def window_bounds(window: int) -> tuple[int, int]:
  """The time window [T0, T1) of window `window`: FIRST_WINDOW slots, then twice as many each, up to
  WINDOW_SLOTS (small plans stay quick; any plan is cut into the same windows, so it is prefix-stable)."""
  start, size = 0, FIRST_WINDOW
  for _ in range(window):
    start += size
    size = min(2 * size, WINDOW_SLOTS)
  return start, start + size


def window_slots(shares: np.ndarray, phase: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
  """(task, draw) of the slots of time window `window`, in order: task t's draws j with
  ceil(T0 p_t - phase_t) <= j < ceil(T1 p_t - phase_t), [T0, T1) the window, sorted by time
  (j + phase_t) / p_t, then task."""
  t0, t1 = window_bounds(window)
  lo = np.ceil(t0 * shares - phase).astype(np.int64).clip(0)
  hi = np.ceil(t1 * shares - phase).astype(np.int64).clip(0)
  counts = hi - lo
  task = np.repeat(np.arange(len(shares), dtype=np.int32), counts)
  starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
  draw = np.arange(len(task), dtype=np.int64) + starts
  time = (draw + phase[task]) / shares[task]
  order = np.lexsort((task, time))
  return task[order], draw[order]


def draws_to_examples(task: TaskLengths, draws: np.ndarray, seed: int, cache: dict) -> np.ndarray:
  """The example of each draw of one task (see the module docstring)."""
  if task.endless:
    return draws
  n = len(task)
  passes, positions = np.divmod(draws, n)
  out = np.empty(len(draws), np.int64)
  for p in np.unique(passes):
    key = (task.name, int(p))
    if key not in cache:
      if len(cache) > 64:
        cache.clear()
      cache[key] = pass_permutation(task.name, n, seed, int(p))
    where = passes == p
    out[where] = cache[key][positions[where]]
  return out


# -- 3: pieces ------------------------------------------------------------------------------------------

def piece_spans(lengths: np.ndarray, prompts: np.ndarray, budget: int, too_long: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(keep, offset, length) of each example's piece: whole, truncated to `budget` tokens (the end of the
  prompt and the start of the answer: famjax.data.packing.truncate), or dropped (too_long="skip")."""
  lengths, prompts = np.asarray(lengths, np.int64), np.asarray(prompts, np.int64)
  over = lengths > budget
  keep = (lengths > 0) & ~(over & (too_long == "skip"))
  answer_fills = (lengths - prompts) >= budget
  offset = np.where(over, np.where(answer_fills, prompts, lengths - budget), 0)
  length = np.where(over, budget, lengths)
  return keep, offset, length


# -- 4: rows --------------------------------------------------------------------------------------------

def greedy_rows(lengths: np.ndarray, budget: int, align: int = 1, pack: bool = True, final: bool = True
                ) -> tuple[np.ndarray, np.ndarray, int]:
  """Greedy packing of pieces of `lengths` (each <= budget) in order: (row_first, row_end, consumed).
  Row k holds pieces [row_first[k], row_end[k]). With final=False the last row is left open (it may
  take pieces that come later): `consumed` is where the pieces of finished rows end."""
  n = len(lengths)
  if not pack:
    firsts = np.arange(n, dtype=np.int64)
    return firsts, firsts + 1, n
  aligned = -(-np.asarray(lengths, np.int64) // align) * align
  cumulative = np.zeros(n + 1, np.int64)
  np.cumsum(aligned, out=cumulative[1:])
  lengths = np.asarray(lengths, np.int64)
  firsts, ends = [], []
  i = 0
  search = cumulative.searchsorted
  while i < n:
    limit = cumulative[i] + budget
    # pieces i..k-1 fit when the aligned end of k-1 is within the limit; piece k itself needs only its
    # own length after the aligned start (it may be the row's last)
    k = int(search(limit, side="right")) - 1
    end = k + 1 if k < n and cumulative[k] + lengths[k] <= limit else k
    if end == i:
      raise ValueError(f"piece {i} of {lengths[i]} tokens is longer than a row holds ({budget})")
    if end >= n and not final:
      break
    firsts.append(i)
    ends.append(end)
    i = end
  return np.asarray(firsts, np.int64), np.asarray(ends, np.int64), i


# -- 5: the repeated segment ----------------------------------------------------------------------------

def repeat_starts(rows: np.ndarray, used: np.ndarray, last_start: np.ndarray, fields: PackingFields,
                  seed: int) -> np.ndarray:
  """Where each row's repeated span starts (-1 without a repeated segment): uniform over the starts
  that keep `min(repeat_len, used - lo)` tokens inside [lo, used), lo = 0, or the last example's start
  under mask_between_examples (the only example the copy may see)."""
  if not fields.repeat_len:
    return np.full(len(rows), -1, np.int32)
  lo = last_start if fields.mask_between_examples else np.zeros_like(used)
  n = np.minimum(fields.repeat_len, used - lo)
  u = np.empty(len(rows))
  for block in np.unique(rows // ROW_BLOCK):
    where = rows // ROW_BLOCK == block
    u[where] = np.random.default_rng([seed, _REPEAT, int(block)]).random(ROW_BLOCK)[rows[where] % ROW_BLOCK]
  return (lo + np.floor(u * (used - lo - n + 1)).astype(np.int64)).astype(np.int32)


# -- the whole plan -------------------------------------------------------------------------------------

@dataclasses.dataclass
class PlanChunk:
  """The rows a window finished: the arrays of FILES (row_start holds each row's first piece only)."""

  row_start: np.ndarray
  row_repeat: np.ndarray
  piece_task: np.ndarray
  piece_example: np.ndarray
  trunc_piece: np.ndarray
  trunc_offset: np.ndarray
  trunc_length: np.ndarray


def build(tasks: Sequence[TaskLengths], fields: PackingFields, seed: int, rows: int,
          emit: Callable[[PlanChunk], None], progress: Callable[[int], None] = lambda rows_done: None
          ) -> dict:
  """Computes the first `rows` rows of the plan, handing them to `emit` window by window (in order);
  returns the counters (per task: read (draws), truncated, skipped_too_long; packing: examples, rows,
  tokens, repeat_tokens, fill; pieces). Raises NeedMoreExamples when an endless task has too few
  examples (what was emitted is then incomplete: plan again after tokenizing more)."""
  if rows < 1:
    raise ValueError(f"a plan needs at least one row, got {rows}")
  names = [t.name for t in tasks]
  rates = np.array([t.rate for t in tasks], np.float64)
  if not len(tasks) or np.any(rates <= 0) or not np.all(np.isfinite(rates)):
    raise ValueError(f"every task needs a rate > 0, got {dict(zip(names, rates.tolist()))}")
  for t in tasks:
    if not len(t) and not t.endless:
      raise ValueError(f"task {t.name!r} has no example")
  shares, phase = rates / rates.sum(), phases(names, seed)
  budget = fields.budget
  cache: dict = {}
  counts = {name: {"read": 0, "truncated": 0, "skipped_too_long": 0} for name in names}
  totals = {"examples": 0, "rows": 0, "tokens": 0, "repeat_tokens": 0}
  carry = _Pieces.empty()  # the open row's pieces
  pieces_written = slots_done = window = 0
  while totals["rows"] < rows:
    task, draw = window_slots(shares, phase, window)
    task, draw, exhausted = _available(tasks, task, draw)
    slots_done += len(task)
    example = np.empty(len(draw), np.int64)
    lengths = np.empty(len(draw), np.int64)
    prompts = np.empty(len(draw), np.int64)
    by_task = np.argsort(task, kind="stable")
    bounds = np.searchsorted(task[by_task], np.arange(len(tasks) + 1))
    for t in np.flatnonzero(np.diff(bounds)):
      where = by_task[bounds[t]:bounds[t + 1]]
      example[where] = draws_to_examples(tasks[t], draw[where], seed, cache)
      lengths[where] = tasks[t].lengths[example[where]]
      prompts[where] = tasks[t].prompts[example[where]]
    keep, offset, length = piece_spans(lengths, prompts, budget, fields.too_long)
    read = np.bincount(task, minlength=len(tasks))
    truncated = np.bincount(task[keep & (lengths > budget)], minlength=len(tasks))
    skipped = np.bincount(task[~keep & (lengths > 0)], minlength=len(tasks))
    for t in np.flatnonzero(read):
      counts[names[t]]["read"] += int(read[t])
      counts[names[t]]["truncated"] += int(truncated[t])
      counts[names[t]]["skipped_too_long"] += int(skipped[t])
    pieces = _Pieces.concat(carry, _Pieces(task[keep], example[keep], offset[keep], length[keep],
                                           length[keep] < lengths[keep]))
    firsts, ends, _ = greedy_rows(pieces.length, budget, fields.align, fields.pack, final=False)
    take = min(len(firsts), rows - totals["rows"])
    firsts, ends = firsts[:take], ends[:take]
    end_piece = int(ends[-1]) if take else 0
    used, last_start = _used(pieces.length, firsts, ends, fields.align)
    row_index = np.arange(totals["rows"], totals["rows"] + take, dtype=np.int64)
    repeat = repeat_starts(row_index, used, last_start, fields, seed)
    done = pieces.slice(0, end_piece)
    trunc = np.flatnonzero(done.truncated)
    emit(PlanChunk(row_start=firsts + pieces_written, row_repeat=repeat, piece_task=done.task,
                   piece_example=done.example, trunc_piece=trunc + pieces_written,
                   trunc_offset=done.offset[trunc].astype(np.int32),
                   trunc_length=done.length[trunc].astype(np.int32)))
    lo = last_start if fields.mask_between_examples else np.zeros_like(used)
    repeated = np.minimum(fields.repeat_len, used - lo) if fields.repeat_len else np.zeros_like(used)
    totals["rows"] += take
    totals["examples"] += end_piece
    totals["tokens"] += int(done.length.sum() + repeated.sum() +
                            (fields.marker_len * take if fields.repeat_len else 0))
    totals["repeat_tokens"] += int(repeated.sum())
    pieces_written += end_piece
    carry = pieces.slice(end_piece, len(pieces))
    window += 1
    progress(totals["rows"])
    if exhausted and totals["rows"] < rows:
      raise NeedMoreExamples(_estimate(tasks, shares, slots_done, totals["rows"], rows))
  totals["fill"] = round(totals["tokens"] / (totals["rows"] * fields.seq_len), 4)
  return {"tasks": counts, "packing": totals, "pieces": pieces_written}


def _available(tasks: Sequence[TaskLengths], task: np.ndarray, draw: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, bool]:
  """The window's slots up to the first draw of an endless task beyond its examples."""
  available = np.array([len(t) if t.endless else np.iinfo(np.int64).max for t in tasks], np.int64)
  beyond = np.flatnonzero(draw >= available[task])
  if not beyond.size:
    return task, draw, False
  return task[:beyond[0]], draw[:beyond[0]], True


def _estimate(tasks: Sequence[TaskLengths], shares: np.ndarray, slots_done: int, rows_done: int,
              rows: int) -> dict[str, int]:
  """Examples each endless task needs for `rows` rows, from the slots the rows so far took (+10%)."""
  needed = {}
  for t, spec in enumerate(tasks):
    if not spec.endless:
      continue
    if rows_done:
      estimate = math.ceil(rows * slots_done / rows_done * shares[t] * 1.1) + 64
    else:
      estimate = 2 * max(len(spec), 64)
    if estimate > len(spec):
      needed[spec.name] = estimate
  return needed


def _used(lengths: np.ndarray, firsts: np.ndarray, ends: np.ndarray, align: int
          ) -> tuple[np.ndarray, np.ndarray]:
  """Each row's used length and where its last piece starts."""
  aligned = -(-np.asarray(lengths, np.int64) // align) * align
  cumulative = np.zeros(len(lengths) + 1, np.int64)
  np.cumsum(aligned, out=cumulative[1:])
  last = ends - 1
  last_start = cumulative[last] - cumulative[firsts]
  return last_start + np.asarray(lengths, np.int64)[last], last_start


@dataclasses.dataclass
class _Pieces:
  task: np.ndarray
  example: np.ndarray
  offset: np.ndarray
  length: np.ndarray
  truncated: np.ndarray

  @classmethod
  def empty(cls) -> _Pieces:
    return cls(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
               np.zeros(0, bool))

  @classmethod
  def concat(cls, a: _Pieces, b: _Pieces) -> _Pieces:
    return cls(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in
                 ("task", "example", "offset", "length", "truncated")))

  def slice(self, start: int, stop: int) -> _Pieces:
    return _Pieces(self.task[start:stop], self.example[start:stop], self.offset[start:stop],
                   self.length[start:stop], self.truncated[start:stop])

  def __len__(self) -> int:
    return len(self.task)


def piece_dtypes(num_tasks: int, max_examples: int) -> dict[str, str]:
  return {"piece_task": "<u1" if num_tasks <= 256 else "<u2",
          "piece_example": "<u4" if max_examples < 1 << 32 else "<i8"}


def slot_sequence(tasks: Sequence[TaskLengths], seed: int, slots: int) -> Iterator[tuple[int, int]]:
  """(task index, example) of the first `slots` slots (tests: the mixture before packing)."""
  shares = np.array([t.rate for t in tasks], np.float64)
  shares /= shares.sum()
  phase, cache, window, given = phases([t.name for t in tasks], seed), {}, 0, 0
  while given < slots:
    task, draw = window_slots(shares, phase, window)
    for t, d in zip(task.tolist(), draw.tolist()):
      if given == slots:
        return
      yield t, int(draws_to_examples(tasks[t], np.array([d]), seed, cache)[0])
      given += 1
    window += 1
