"""Several models; PassKey and the recall suite at several lengths, and long-context tasks, in one run
(famjax.eval's body).

  settings = Settings(passkey_lengths=(2048, 4096), tasks=("scrolls_qasper",))
  plan = prepare([describe("workdirs/fam", "fam"), ...], settings)   # every user error, before any model
  results = run(plan, out_dir)                                         # writes the reports as it goes

`prepare` reads the vocabularies and the task examples (so a missing TFDS dataset fails at once, before
any checkpoint is read); `run` loads one model at a time, evaluates it, and rewrites results.json,
results.md and passkey.png after every length and task, so a long run that stops keeps what it did.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

from famjax.data import passkey as passkey_data
from famjax.data import recall as recall_data
from famjax.evaluation import load as load_lib
from famjax.evaluation import report
from famjax.evaluation.lengths import format_length
from famjax.evaluation.longcontext import evaluate_task, load_tasks
from famjax.evaluation.passkey import evaluate_passkey
from famjax.evaluation.progress import Progress
from famjax.evaluation.recall import TASKS as RECALL_TASKS
from famjax.evaluation.recall import evaluate_recall


@dataclasses.dataclass(frozen=True)
class Settings:
  passkey_lengths: tuple[int, ...] = ()
  passkey_examples: int = 10
  passkey_seed: int = 0
  passkey_format: str = "paper"
  tasks: tuple[str, ...] = ()
  split: str = "validation"
  task_examples: int = 0  # 0: all
  max_new_tokens: int = 128
  tfds_data_dir: str = ""
  chunk_size: int = 0  # 0: four blocks of each model
  bos_id: Optional[int] = 0
  text_tokens: int = 0  # language-modelling tasks (pg19, isabelle): score each text's first N (0: all)
  recall_tasks: tuple[str, ...] = ()  # "multikey", "mqar" (famjax.evaluation.recall), at recall_lengths
  recall_lengths: tuple[int, ...] = ()
  recall_examples: int = 10
  recall_seed: int = 0

  def __post_init__(self):
    if not self.passkey_lengths and not self.tasks and not self.recall_tasks:
      raise ValueError("nothing to evaluate: give --passkey_lengths, --recall_tasks and/or --tasks")
    unknown = sorted(set(self.recall_tasks) - set(RECALL_TASKS))
    if unknown:
      raise ValueError(f"--recall_tasks: unknown {unknown} (known: {', '.join(RECALL_TASKS)})")
    if bool(self.recall_tasks) != bool(self.recall_lengths):
      raise ValueError("--recall_tasks and --recall_lengths go together: give both or neither")
    if self.recall_examples < 1:
      raise ValueError(f"--recall_examples must be >= 1, got {self.recall_examples}")
    for task in self.recall_tasks:  # a length too short for the needles fails here, before any model
      for total in self.recall_lengths:
        recall_data.filler_chars_for_total(total, recall_data.get_format(task))
    if self.passkey_format not in passkey_data.FORMATS:
      raise ValueError(f"--passkey_format must be one of {', '.join(passkey_data.FORMATS)}, got "
                       f"{self.passkey_format!r}")
    for name in ("passkey_examples", "max_new_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    for name in ("task_examples", "chunk_size", "text_tokens"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass
class Plan:
  sources: list  # load.ModelSource
  settings: Settings
  vocabularies: dict  # vocabulary spec -> seqio vocabulary
  tasks: dict  # vocabulary spec -> list of longcontext.TaskData


def prepare(sources, settings: Settings) -> Plan:
  """Vocabularies and task examples for every source; raises LoadError, TfdsNotPreparedError
  (a FileNotFoundError) or ValueError (an unknown task, a split it lacks) before any model loads."""
  names = [s.name for s in sources]
  if not sources:
    raise ValueError("give at least one --model=NAME=PATH")
  if len(set(names)) != len(names):
    raise ValueError(f"two --model flags share a name: {names}; name them NAME=PATH")
  vocabularies, tasks = {}, {}
  for source in sources:
    if source.vocabulary not in vocabularies:
      vocabularies[source.vocabulary] = load_lib.load_vocabulary(source)
      loaded = {}  # task name -> TaskData: a task named alone and in a group (gpt3_rank) runs once
      for name in settings.tasks:
        for data in load_tasks(name, source.vocabulary, settings.split, settings.tfds_data_dir,
                               settings.task_examples):
          loaded.setdefault(data.name, data)
      tasks[source.vocabulary] = list(loaded.values())
  return Plan(list(sources), settings, vocabularies, tasks)


def run(plan: Plan, out_dir, log: Callable[[str], None] = print) -> dict:
  """Evaluates every model of the plan; returns the results (also written to `out_dir`)."""
  s = plan.settings
  results = {"settings": {**dataclasses.asdict(s), "passkey_lengths": list(s.passkey_lengths),
                          "tasks": list(s.tasks), "recall_tasks": list(s.recall_tasks),
                          "recall_lengths": list(s.recall_lengths)},
             "models": {}}
  for source in plan.sources:
    t0 = time.perf_counter()
    model, info = load_lib.load(source)
    vocab = plan.vocabularies[source.vocabulary]
    load_lib.check_vocabulary(model, vocab, source)
    log(f"{source.name}: {info['kind']} {info['path']}" + (f" (step {info['step']})" if "step" in info
                                                          else "")
        + f", loaded in {time.perf_counter() - t0:.1f} s")
    entry = results["models"][source.name] = {"info": info, "passkey": [], "recall": [], "tasks": {}}
    for total in s.passkey_lengths:
      label = f"{source.name} passkey {format_length(total)}"
      r = evaluate_passkey(model, vocab, total, n_examples=s.passkey_examples,
                           chunk_size=s.chunk_size or None, seed=s.passkey_seed,
                           progress=Progress(label), bos_id=s.bos_id, fmt=s.passkey_format)
      entry["passkey"].append(r)
      log(f"{label}: exact match {r['exact_match']:.0f}% of {r['n']} ({r['seconds']:.1f} s, "
          f"{r['tokens_per_second']:,.0f} tok/s)")
      report.write_all(results, out_dir)
    for task in s.recall_tasks:
      for total in s.recall_lengths:
        label = f"{source.name} {task} {format_length(total)}"
        r = evaluate_recall(model, vocab, task, total, n_examples=s.recall_examples,
                            chunk_size=s.chunk_size or None, seed=s.recall_seed, progress=Progress(label),
                            bos_id=s.bos_id)
        entry["recall"].append(r)
        log(f"{label}: exact match {r['exact_match']:.0f}% of {r['n']} questions ({r['seconds']:.1f} s)")
        report.write_all(results, out_dir)
    for task in plan.tasks[source.vocabulary]:
      r = evaluate_task(model, vocab, task, chunk_size=s.chunk_size or None,
                        max_new_tokens=s.max_new_tokens, progress=Progress(f"{source.name} {task.name}"),
                        bos_id=s.bos_id, text_tokens=s.text_tokens)
      entry["tasks"][task.name] = r
      scores = ", ".join(f"{k} {v:.1f}" for k, v in r["metrics"].items())
      log(f"{source.name} {task.name}: {scores} over {r['n']} examples ({r['seconds']:.1f} s)")
      report.write_all(results, out_dir)
    del model
  report.write_all(results, out_dir)
  return results
