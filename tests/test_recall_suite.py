"""experiments/recall_suite.py without training: its famjax commands (full attention evaluated only up to
the lengths it fits, in a call of its own) and its table (rows in the paper's Table 11 order, columns
task x length, "-" where a model was not evaluated); configs/recall_small.py's variants validate."""

import importlib.util
from pathlib import Path

import pytest

from configs import recall_small
from famjax.training.config import job_config

ROOT = Path(__file__).resolve().parent.parent


def _experiment():
  spec = importlib.util.spec_from_file_location("recall_suite", ROOT / "experiments" / "recall_suite.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_commands_train_every_variant_and_evaluate_full_only_where_it_fits(tmp_path):
  exp = _experiment()
  cmd = exp.train_command("bswa_m1", tmp_path / "bswa_m1", 2)
  assert cmd[1:] == ["-m", "famjax.train", "--config=configs/recall_small.py:bswa_m1",
                     f"--workdir={tmp_path / 'bswa_m1'}", "--config.steps=2"]
  lengths = [512, 8192, 32768]
  evals = exp.eval_commands(tmp_path, recall_small.VARIANTS, lengths, 4)
  assert set(evals) == {"eval", "eval_full"}
  assert [a for a in evals["eval"] if a.startswith("--model=")] == [
      f"--model={v}={tmp_path / v}" for v in recall_small.VARIANTS if v != "full"]
  assert "--recall_tasks=multikey,mqar" in evals["eval"]
  assert "--recall_lengths=512,8192,32768" in evals["eval"]
  assert f"--model=full={tmp_path / 'full'}" in evals["eval_full"]
  assert f"--recall_lengths=512,{recall_small.FULL_MAX_LENGTH}" in evals["eval_full"]
  assert f"--out_dir={tmp_path / 'eval' / 'full'}" in evals["eval_full"]
  assert set(exp.eval_commands(tmp_path, ["full"], [32768], 4)) == set()


def test_table_rows_follow_table_11_and_columns_task_by_length():
  exp = _experiment()

  def result(name, rows):
    return {"models": {name: {"recall": [{"task": t, "total_tokens": n, "exact_match": e}
                                         for t, n, e in rows]}}}

  results = [result("fam", [("mqar", 512, 50.0), ("multikey", 512, 100.0), ("multikey", 2048, 12.5)]),
             result("bswa_m0", [("multikey", 512, 25.0)]), result("full", [("mqar", 512, 75.0)])]
  lines = exp.table(results, [512, 2048]).splitlines()
  assert lines[0] == "| model | multikey 512 | multikey 2k | mqar 512 | mqar 2k |"
  assert lines[2:] == ["| bswa_m0 | 25 | - | - | - |", "| fam | 100 | 12.5 | 50 | - |",
                       "| full | - | - | 75 | - |"]


def test_variants_validate_and_differ_in_attention_only():
  jobs = {v: job_config(recall_small.get_config(v), vocab_size=259) for v in recall_small.VARIANTS}
  assert {j.data.mixture for j in jobs.values()} == {"recall_small"}
  assert [(jobs[v].model.attention, jobs[v].model.mem_segments) for v in ("bswa_m0", "bswa_m1", "bswa_m2")] \
      == [("bswa", 0), ("bswa", 1), ("bswa", 2)]
  assert jobs["full"].model.attention == "full" and jobs["fam"].model.fam_len == 8
  assert jobs["full"].model.replace(attention="bswa") == jobs["bswa_m0"].model
  assert len({(j.train.steps, j.train.batch_size, j.train.seq_len) for j in jobs.values()}) == 1
  with pytest.raises(ValueError, match="unknown variant"):
    recall_small.get_config("bswa_m9")
