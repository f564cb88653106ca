"""A progress line for long evaluations: tokens done / total, tokens/s and the estimated time left.

On a terminal the line is redrawn in place; otherwise (a log file) a new line is printed at most every
`interval` seconds, and once at the end (`finish`).
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_duration(seconds: float) -> str:
  """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'."""
  seconds = int(round(max(seconds, 0.0)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def progress_line(label: str, done: int, total: int, elapsed: float) -> str:
  """'label: 2,048/8,192 tokens (25%), 1,024 tok/s, ETA 6s' (ETA from the rate so far)."""
  fraction = done / total if total else 1.0
  rate = done / elapsed if elapsed > 0 else 0.0
  eta = format_duration((total - done) / rate) if rate > 0 else "?"
  if done >= total:
    return f"{label}: {done:,} tokens in {format_duration(elapsed)}, {rate:,.0f} tok/s"
  return f"{label}: {done:,}/{total:,} tokens ({100 * fraction:.0f}%), {rate:,.0f} tok/s, ETA {eta}"


class Progress:
  """Counts tokens against a total and reports on `stream` (stderr by default).

    progress = Progress("fam passkey 1m")
    progress.start(total_tokens)
    progress.advance(n)      # after each chunk
    progress.finish()
  """

  def __init__(self, label: str, stream: Optional[TextIO] = None, interval: float = 10.0):
    self.label = label
    self.stream = stream if stream is not None else sys.stderr
    self.interval = interval
    self.total = self.done = 0
    self._t0 = self._last = 0.0
    self._redraw = bool(getattr(self.stream, "isatty", lambda: False)())

  def start(self, total: int) -> None:
    self.total, self.done = int(total), 0
    self._t0 = self._last = time.perf_counter()

  def advance(self, n: int) -> None:
    self.done += int(n)
    now = time.perf_counter()
    if self.done < self.total and (self._redraw or now - self._last >= self.interval):
      self._last = now
      self._write(progress_line(self.label, self.done, self.total, now - self._t0), final=False)

  def finish(self) -> None:
    self._write(progress_line(self.label, self.done, max(self.total, self.done),
                              time.perf_counter() - self._t0), final=True)

  def _write(self, line: str, final: bool) -> None:
    if self._redraw:
      self.stream.write("\r\033[K" + line + ("\n" if final else ""))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()


def as_progress(progress, label: str) -> Optional[Progress]:
  """None or False: no progress; True: a Progress on stderr named `label`; a Progress: itself."""
  if progress is None or progress is False:
    return None
  if progress is True:
    return Progress(label)
  if not isinstance(progress, Progress):
    raise TypeError(f"progress must be None, True or a famjax.evaluation.progress.Progress, got "
                    f"{type(progress).__name__}")
  return progress
