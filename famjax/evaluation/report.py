"""The outputs of an evaluation: results.json, results.md (markdown tables) and passkey.png.

`results` is the dict famjax.eval builds:

  {"models": {name: {"info": {...}, "passkey": [evaluate_passkey(...) dicts],
                     "recall": [evaluate_recall(...) dicts], "tasks": {task: dict}}},
   "settings": {...}}

In the tables a PassKey row is one length (total tokens of an example, and its filler tokens), a recall
row one task at one length, and a task row is one metric of one task; the columns are the models.
"""

from __future__ import annotations

import json
from pathlib import Path

from famjax.evaluation.lengths import format_length

RESULTS_JSON, RESULTS_MD, PASSKEY_PNG = "results.json", "results.md", "passkey.png"


def write_json(results: dict, path) -> Path:
  path = Path(path)
  path.write_text(json.dumps(results, indent=2) + "\n")  # models in the order given
  return path


def passkey_table(results: dict) -> str:
  """Markdown: rows = PassKey lengths, columns = models, cells = exact match (%)."""
  names = [n for n, m in results["models"].items() if m.get("passkey")]
  if not names:
    return ""
  by_length: dict[int, dict] = {}
  for name in names:
    for row in results["models"][name]["passkey"]:
      by_length.setdefault(row["total_tokens"], {"filler": row["filler_tokens"]})[name] = row
  lines = ["| tokens | filler tokens | " + " | ".join(names) + " |",
           "|---|---:|" + "---:|" * len(names)]
  for total in sorted(by_length):
    cells = [_percent(by_length[total].get(name), "exact_match") for name in names]
    lines.append(f"| {format_length(total)} | {by_length[total]['filler']:,} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


DEPTH_BINS = 4  # the depth table's rows: the key in the first quarter of the filler, ..., the last


def passkey_depth_table(results: dict) -> str:
  """Markdown: rows = quarters of the key's depth in the filler (0 = farthest from the question), columns
  = models, cells = exact match (%) at each model's longest PassKey length; "" if no PassKey."""
  names = [n for n, m in results["models"].items() if m.get("passkey")]
  if not names:
    return ""
  longest = {n: max(results["models"][n]["passkey"], key=lambda r: r["total_tokens"]) for n in names}
  lengths = sorted({format_length(r["total_tokens"]) for r in longest.values()})
  lines = [f"| key depth ({', '.join(lengths)} tokens) | " + " | ".join(names) + " |",
           "|---|" + "---:|" * len(names)]
  for b in range(DEPTH_BINS):
    low, high = b / DEPTH_BINS, (b + 1) / DEPTH_BINS
    cells = []
    for name in names:
      rows = [d for d in longest[name]["per_depth"]
              if low <= d["depth"] < high or (high == 1.0 and d["depth"] == 1.0)]
      n = sum(d["n"] for d in rows)
      hits = sum(d["exact_match"] * d["n"] / 100.0 for d in rows)
      cells.append(f"{100.0 * hits / n:.3g} ({n})" if n else "-")
    lines.append(f"| {low:.2f}-{high:.2f} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def recall_table(results: dict) -> str:
  """Markdown: rows = (recall task, length), columns = models, cells = exact match (%) over the
  questions; "" if no recall results."""
  names = [n for n, m in results["models"].items() if m.get("recall")]
  if not names:
    return ""
  rows: dict[tuple[str, int], dict] = {}
  for name in names:
    for row in results["models"][name]["recall"]:
      rows.setdefault((row["task"], row["total_tokens"]), {"n": row["n"]})[name] = row
  lines = ["| task | tokens | questions | " + " | ".join(names) + " |",
           "|---|---|---:|" + "---:|" * len(names)]
  for (task, total), cells in sorted(rows.items()):
    values = [_percent(cells.get(name), "exact_match") for name in names]
    lines.append(f"| {task} | {format_length(total)} | {cells['n']} | " + " | ".join(values) + " |")
  return "\n".join(lines)


def tasks_table(results: dict) -> str:
  """Markdown: rows = (task, metric), columns = models."""
  names = [n for n, m in results["models"].items() if m.get("tasks")]
  if not names:
    return ""
  rows: dict[tuple[str, str], dict] = {}
  for name in names:
    for task, result in results["models"][name]["tasks"].items():
      for metric, value in result["metrics"].items():
        rows.setdefault((task, metric), {"n": result["n"]})[name] = value
  lines = ["| task | metric | examples | " + " | ".join(names) + " |",
           "|---|---|---:|" + "---:|" * len(names)]
  for (task, metric), cells in rows.items():
    values = [f"{cells[n]:.1f}" if n in cells else "-" for n in names]
    lines.append(f"| {task} | {metric} | {cells['n']} | " + " | ".join(values) + " |")
  return "\n".join(lines)


def markdown(results: dict) -> str:
  parts = ["# famjax evaluation", ""]
  models = results["models"]
  for name, m in models.items():
    info = m.get("info", {})
    step = f", step {info['step']}" if "step" in info else ""
    model = info.get("model", {})
    parts.append(f"- **{name}**: {info.get('kind', '?')} {info.get('path', '?')}{step}; "
                 f"attention {model.get('attention', '?')}, block {model.get('block_size', '?')}, "
                 f"memory segments {model.get('mem_segments', '?')}, FAM {model.get('fam_len', '?')}")
  table = passkey_table(results)
  if table:
    examples = results.get("settings", {}).get("passkey_examples", "?")
    parts += ["", f"## PassKey exact match (%, {examples} examples per length)", "", table,
              "", "## PassKey exact match (%) by key depth at the longest length (examples in brackets)",
              "", passkey_depth_table(results)]
  table = recall_table(results)
  if table:
    examples = results.get("settings", {}).get("recall_examples", "?")
    parts += ["", f"## Recall exact match (%, {examples} examples per task and length)", "", table]
  table = tasks_table(results)
  if table:
    parts += ["", "## Tasks", "", table]
  return "\n".join(parts) + "\n"


def plot_passkey(results: dict, path) -> Path | None:
  """PassKey exact match against filler tokens (log2 axis), one line per model; None if no PassKey."""
  # The object-oriented API (no pyplot): the Agg canvas, no display, no global figure state.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  series = {n: sorted(m["passkey"], key=lambda r: r["filler_tokens"])
            for n, m in results["models"].items() if m.get("passkey")}
  if not series:
    return None
  fig = Figure(figsize=(7, 4.2), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ticks = set()
  for name, rows in series.items():
    x = [max(r["filler_tokens"], 1) for r in rows]
    ax.plot(x, [r["exact_match"] for r in rows], marker="o", label=name)
    ticks.update(x)
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted(ticks), [short_count(t) for t in sorted(ticks)])
  ax.minorticks_off()
  ax.set_ylim(-5, 105)
  ax.set_xlabel("filler tokens (log2)")
  ax.set_ylabel("PassKey exact match (%)")
  ax.set_title("PassKey retrieval")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  return Path(path)


def write_all(results: dict, out_dir) -> list[Path]:
  """results.json, results.md and (with PassKey results) passkey.png in `out_dir`."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = [write_json(results, out_dir / RESULTS_JSON)]
  (out_dir / RESULTS_MD).write_text(markdown(results))
  written.append(out_dir / RESULTS_MD)
  png = plot_passkey(results, out_dir / PASSKEY_PNG)
  if png is not None:
    written.append(png)
  return written


def short_count(n: int) -> str:
  """1802 -> '1.76k', 1048330 -> '1m', 500 -> '500' (binary k and m, three digits)."""
  for unit, size in (("m", 1 << 20), ("k", 1 << 10)):
    if n >= size * 0.999:
      return f"{n / size:.3g}{unit}"
  return str(n)


def _percent(row, key) -> str:
  if row is None:
    return "-"
  value = row[key]
  return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
