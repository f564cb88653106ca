"""What the user sees of a run: a console progress line, WORKDIR/metrics.jsonl and TensorBoard events.

metrics.jsonl has one JSON object per logged step: step, loss, learning_rate, grad_norm,
tokens_per_second, mfu, step_time, loss_avg (the mean loss since the previous record), and the step's
other metrics (ce, z_loss, accuracy, ...); at an evaluation step also eval_loss, eval_accuracy and
eval_passkey_<length> (exact match in [0, 1]). On resume
the lines after the restored step are dropped, so the file is always one consistent history.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from famjax.training.tensorboard import EventWriter

PASSKEY_PREFIX = "eval_passkey_"  # + a length ("1k"): PassKey exact match in [0, 1] during training


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(step: int, total: int, m: dict, eta: float, width: int = 20) -> str:
  """`[#####.....] step 120/500 | loss 2.3456 (avg 2.4012) | 12,345 tok/s | 0.41 s/step | MFU 43.1% |
  ETA 2m36s`; avg: the mean loss of the steps since the previous logged one."""
  filled = int(width * step / max(total, 1))
  bar = "#" * filled + "." * (width - filled)
  avg = f" (avg {m['loss_avg']:.4f})" if "loss_avg" in m else ""
  line = (f"[{bar}] step {step}/{total} | loss {m['loss']:.4f}{avg} | "
          f"{m['tokens_per_second']:,.0f} tok/s | "
          f"{m['step_time']:.3g} s/step | MFU {100 * m['mfu']:.1f}% | ETA {format_duration(eta)}")
  if "eval_loss" in m:
    line += f" | eval loss {m['eval_loss']:.4f} acc {100 * m['eval_accuracy']:.1f}%"
  passkey = [f"{k[len(PASSKEY_PREFIX):]} {100 * v:.0f}%" for k, v in m.items() if k.startswith(PASSKEY_PREFIX)]
  if passkey:
    line += " | passkey " + " ".join(passkey)
  return line


def truncate_history(path: Path, last_step: int) -> None:
  """Drop the lines of metrics.jsonl logged after `last_step` (they belong to a run that was cut)."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      continue  # a line cut by a kill
  path.write_text("".join(k + "\n" for k in kept))


def read_history(path) -> list[dict]:
  """The records of a metrics.jsonl, skipping a half-written last line."""
  out = []
  for line in Path(path).read_text().splitlines():
    try:
      out.append(json.loads(line))
    except ValueError:
      continue
  return out


class MetricsLogger:
  """Writes each logged step to the console, metrics.jsonl and (optionally) TensorBoard."""

  def __init__(self, workdir: Path, total_steps: int, tensorboard: bool = True, stream=None,
               files: bool = True):
    """`files`: write metrics.jsonl and events (False on the non-primary hosts of a multi-host job)."""
    self.total = total_steps
    self.stream = stream or sys.stdout
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.jsonl_path = workdir / "metrics.jsonl"
    self._jsonl = open(self.jsonl_path if files else os.devnull, "a")
    self._events = EventWriter(workdir / "tensorboard") if tensorboard and files else None
    self._bar_shown = False

  def progress(self, step: int, metrics: dict, eta: float) -> None:
    """Redraw the progress line (terminals only)."""
    if self.tty:
      self.stream.write("\r" + progress_line(step, self.total, metrics, eta) + "\033[K")
      self.stream.flush()
      self._bar_shown = True

  def log(self, step: int, metrics: dict, eta: float) -> None:
    """A line on the console, a record in metrics.jsonl, scalars in TensorBoard."""
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._events is not None:
      self._events.scalars(step, {k: float(v) for k, v in metrics.items()})
      self._events.flush()
    self.message(progress_line(step, self.total, metrics, eta))

  def message(self, text: str) -> None:
    if self._bar_shown:
      self.stream.write("\r\033[K")
      self._bar_shown = False
    self.stream.write(text + "\n")
    self.stream.flush()

  def close(self) -> None:
    self._jsonl.close()
    if self._events is not None:
      self._events.close()


def _plain(value) -> float:
  value = float(value)
  return value if math.isfinite(value) else str(value)
