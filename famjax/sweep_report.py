"""The results of a sweep (famjax.sweep --report): every point's workdir read into one table.

  files, rows = report(sweep, sweep_path, DIR)   # DIR/sweep.md, DIR/sweep.json, DIR/sweep.png

Each point's DIR/<name>/ holds what famjax.train wrote (config.json, metrics.jsonl) and what the sweep
wrote (sweep_status.json, train.log); a row says the point's config differences, status, steps, final
train loss, best / final eval loss and accuracy, PassKey exact match by length, tokens/s and MFU.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import socket
from pathlib import Path

from famjax.training.metrics import read_history
from famjax.workdir.layout import CONFIG, METRICS

STATUS, LOG = "sweep_status.json", "train.log"  # what the sweep writes into each point's workdir
REPORT_MD, REPORT_JSON, REPORT_PNG = "sweep.md", "sweep.json", "sweep.png"  # what it writes into DIR


def point_workdir(workdir, name: str) -> str:
  """DIR/<name>; a URL (gs://...) stays one ("gs://b/run/fam", not Path's "gs:/b/run/fam")."""
  workdir = str(workdir)
  return f"{workdir.rstrip('/')}/{name}" if "://" in workdir else str(Path(workdir) / name)


def write_json(path: Path, data) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=2) + "\n")
  os.replace(tmp, path)  # a reader never sees half a file


def last_line(path: Path) -> str:
  """The last non-empty line of a log (the error of a failed run), "" when there is none."""
  try:
    with open(path, "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 65536))
      text = f.read().decode(errors="replace")
  except OSError:
    return ""
  lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
  return lines[-1] if lines else ""


def _read_json(path: Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _flatten(config: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _number(value):
  """A finite float, or None (missing, "nan", "inf")."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def _length(key: str) -> float:
  """eval_passkey_<length> -> a number to sort by ("512", "1k", "4k", "1m")."""
  m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", key)
  if not m:
    return math.inf
  return float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]


def _pid_alive(status: dict) -> bool:
  """False only when the run's process is known to be gone (same host, no such pid)."""
  if status.get("host") != socket.gethostname() or not status.get("pid"):
    return True
  try:
    os.kill(int(status["pid"]), 0)
  except ProcessLookupError:
    return False
  except (OSError, ValueError):
    return True
  return True


def point_result(name: str, pdir: Path) -> dict:
  """One point's row: status, steps, final / best metrics (None where there are none)."""
  status = _read_json(pdir / STATUS) if pdir.is_dir() else None
  status = status if isinstance(status, dict) else None
  config = _read_json(pdir / CONFIG) if pdir.is_dir() else None
  config = config if isinstance(config, dict) and isinstance(config.get("model"), dict) else None
  history = read_history(pdir / METRICS) if (pdir / METRICS).is_file() else []
  history = [r for r in history if isinstance(r, dict) and isinstance(r.get("step"), (int, float))]
  row = {"name": name, "status": "not started", "note": "", "returncode": None, "seconds": None,
         "step": max((int(r["step"]) for r in history), default=None),
         "steps": config.get("steps") if config else None}

  train = [r for r in history if "loss" in r]
  row["train_loss"] = _number(train[-1]["loss"]) if train else None
  evals = [(r["step"], _number(r["eval_loss"])) for r in history if "eval_loss" in r]
  finite = [e for e in evals if e[1] is not None]
  row["eval_loss_final"] = evals[-1][1] if evals else None
  row["eval_loss_best"] = min(v for _, v in finite) if finite else None
  row["eval_loss_best_step"] = min(finite, key=lambda e: e[1])[0] if finite else None
  accs = [_number(r["eval_accuracy"]) for r in history if "eval_accuracy" in r]
  row["eval_accuracy_final"] = accs[-1] if accs else None
  row["eval_accuracy_best"] = max((a for a in accs if a is not None), default=None)
  passkey = {}
  for r in history:
    for key, value in r.items():
      if key.startswith("eval_passkey_"):
        passkey[key[len("eval_passkey_"):]] = _number(value)  # the last one logged
  row["passkey"] = dict(sorted(passkey.items(), key=lambda kv: (_length(kv[0]), kv[0])))
  speed = [r for r in history if "tokens_per_second" in r]
  speed = speed[1:] if len(speed) > 1 else speed  # the first logged step includes the warm-up
  speed = speed[-5:]
  for key in ("tokens_per_second", "mfu"):
    values = [v for v in (_number(r.get(key)) for r in speed) if v is not None]
    row[key] = sum(values) / len(values) if values else None

  reached = row["step"] is not None and row["steps"] is not None and row["step"] >= row["steps"]
  if status is not None:
    row["returncode"], row["seconds"] = status.get("returncode"), status.get("seconds")
    if row["returncode"] is None:
      if _pid_alive(status):
        row["status"] = "running"
      elif reached:
        row["status"] = "done"
      else:
        row["status"], row["note"] = "failed", "ended without an exit status (the sweep was killed?)"
    elif row["returncode"] != 0:
      row["status"], row["note"] = "failed", last_line(pdir / LOG)
    elif status.get("launcher") and not reached:
      row["status"], row["note"] = "running", "the launcher returned (submitted?); not at its last step here"
    else:
      row["status"] = "done"
      if row["steps"] is not None and not reached:
        row["note"] = "stopped before its last step (SIGTERM?): rerun the sweep to resume it"
  elif config is not None or history:
    row["status"] = "done" if reached else "running"
    row["note"] = "no sweep_status.json (not run by this sweep?)"
  row["_config"], row["_history"] = config, history
  return row


def gather(sweep: dict, workdir) -> list[dict]:
  """Every point's row (in the sweep's order), with `config`: its differences from the other points
  (dotted keys of the config.json of the points that have one; else the sweep file's variant and
  overrides) and `overrides`: what the sweep file sets for it."""
  rows = []
  for point in sweep["points"]:
    row = point_result(point["name"], Path(point_workdir(workdir, point["name"])))
    row["variant"] = point.get("variant") or ""
    row["overrides"] = dict(point.get("overrides", {}))
    rows.append(row)
  flat = {r["name"]: _flatten(r["_config"]) for r in rows if r["_config"] is not None}
  keys = sorted({k for f in flat.values() for k in f})
  def value(f, k):
    return json.dumps(f[k], sort_keys=True, default=str) if k in f else "<absent>"
  differ = [k for k in keys if len({value(f, k) for f in flat.values()}) > 1]
  for row in rows:
    if row["name"] in flat and len(flat) > 1:
      row["config"] = {k: flat[row["name"]].get(k) for k in differ if k in flat[row["name"]]}
      row["config_from"] = CONFIG
    else:
      row["config"] = {**({"variant": row["variant"]} if row["variant"] else {}), **row["overrides"]}
      row["config_from"] = "sweep file"
  return rows


def _cell(value, kind: str = "") -> str:
  if value is None:
    return "–"
  if kind == "pct":
    return f"{100 * value:.1f}%"
  if kind == "loss":
    return f"{value:.4f}"
  if kind == "int":
    return f"{value:,.0f}"
  return str(value)


def _md(text: str, limit: int = 200) -> str:
  text = " ".join(str(text).split()).replace("|", "\\|")
  return text if len(text) <= limit else text[:limit - 1] + "…"


def _config_text(config: dict) -> str:
  return ", ".join(f"{k}={v if isinstance(v, (str, int, float)) else json.dumps(v)}"
                   for k, v in config.items())


def markdown(sweep_path: str, base: str, workdir, rows: list[dict]) -> str:
  lengths = sorted({k for r in rows for k in r["passkey"]}, key=lambda k: (_length(k), k))
  header = (["point", "config", "status", "step", "train loss", "eval loss best", "eval loss final",
             "eval acc best", "eval acc final"] + [f"PassKey {k}" for k in lengths]
            + ["tokens/s", "MFU", "note"])
  lines = [f"# Sweep {sweep_path}", "",
           f"Config `{base}`; workdir `{workdir}`; "
           f"{datetime.datetime.now().isoformat(timespec='seconds')}. Config: each point's differences "
           "from the others (its config.json), or the sweep file's variant and overrides where it has "
           "none. tokens/s and MFU: mean of the last logged steps. Eval best: lowest loss, highest "
           "accuracy; PassKey: exact match at the last evaluation.", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    step = "–" if r["step"] is None else f"{r['step']}" + (f"/{r['steps']}" if r["steps"] else "")
    status = r["status"] + (f" (exit {r['returncode']})" if r["status"] == "failed"
                            and r["returncode"] is not None else "")
    cells = ([r["name"], _md(_config_text(r["config"])) or "–", status, step,
              _cell(r["train_loss"], "loss"), _cell(r["eval_loss_best"], "loss"),
              _cell(r["eval_loss_final"], "loss"), _cell(r["eval_accuracy_best"], "pct"),
              _cell(r["eval_accuracy_final"], "pct")]
             + [_cell(r["passkey"].get(k), "pct") for k in lengths]
             + [_cell(r["tokens_per_second"], "int"), _cell(r["mfu"], "pct"), _md(r["note"])])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
  """Eval loss (train loss when no point has evaluated) against step, one line per point; False when
  matplotlib is not installed."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  key = "eval_loss" if any("eval_loss" in h for r in rows for h in r["_history"]) else "loss"
  fig, ax = plt.subplots(figsize=(8, 5))
  drawn = 0
  for r in rows:
    points = [(h["step"], _number(h[key])) for h in r["_history"] if key in h]
    points = [(s, v) for s, v in points if v is not None]
    if points:
      ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=f"{r['name']} ({r['status']})")
      drawn += 1
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.set_xlabel("step")
  ax.set_ylabel("eval loss" if key == "eval_loss" else "train loss")
  ax.set_title("sweep: " + ("eval loss" if key == "eval_loss" else "train loss (no point has evaluated)"))
  if drawn:
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
  else:
    ax.text(0.5, 0.5, "no point has logged a step yet", ha="center", va="center", transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def report(sweep: dict, sweep_path: str, workdir) -> tuple[list[Path], list[dict]]:
  """Write DIR/sweep.md, sweep.json and sweep.png; (the paths written, the rows)."""
  rows = gather(sweep, workdir)
  out = Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  (out / REPORT_MD).write_text(markdown(sweep_path, sweep["config"], workdir, rows))
  public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
  write_json(out / REPORT_JSON, {"sweep": str(sweep_path), "config": sweep["config"],
                                  "overrides": sweep.get("overrides", {}), "workdir": str(workdir),
                                  "written": datetime.datetime.now().isoformat(timespec="seconds"),
                                  "points": public})
  written = [out / REPORT_MD, out / REPORT_JSON]
  if plot(rows, out / REPORT_PNG):
    written.append(out / REPORT_PNG)
  return written, public
