"""famjax.workdir: a workdir's layout, its checkpoint steps, and one checkpoint read as a model on this
host (LoRA merged) equal to what the trainer restores on its mesh."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_train_loop import run, tiny_job  # noqa: E402  (a LoRA bswa run on the synthetic stream)

from famjax.training import export  # noqa: E402
from famjax.training.config import incompatible_fields  # noqa: E402
from famjax.workdir import WorkdirError, layout  # noqa: E402
from famjax.workdir import model as workdir_model  # noqa: E402


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """6 steps of a LoRA run, checkpoints at 2, 4, 6."""
  workdir = tmp_path_factory.mktemp("lora_run")
  result, _ = run(tiny_job(), workdir)
  assert result.status == "done"
  return workdir


def test_layout(lora_run, tmp_path):
  assert layout.steps(lora_run) == layout.steps(lora_run / "checkpoints") == [2, 4, 6]
  assert layout.steps(tmp_path) == []
  assert layout.split_step(lora_run / "checkpoints" / "4") == (lora_run, 4)
  assert layout.split_step(lora_run) == (lora_run, None)
  assert layout.checkpoint_dir(lora_run / "checkpoints" / "4") == (lora_run / "checkpoints", 4)
  assert layout.read_config(lora_run)["lora"]["rank"] == 2
  with pytest.raises(WorkdirError, match="no run there"):
    layout.read_config(tmp_path)


def test_a_checkpoint_on_this_host_equals_the_trainers_restore(lora_run):
  job = tiny_job()
  for step in (None, 4):
    want_step, want = export.restore_params(job, lora_run, step)  # sharded, through the Trainer
    got_step, got, config = workdir_model.restore_params(lora_run, step)
    assert got_step == want_step == (6 if step is None else 4)
    assert config["lora"]["rank"] == 2 and "lora" not in got  # merged
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6), got, want)
  model, step = workdir_model.load_model(lora_run / "checkpoints" / "2")
  assert step == 2 and model.config == job.model


def test_a_missing_step_and_no_checkpoint_are_one_line_errors(lora_run, tmp_path):
  with pytest.raises(WorkdirError, match=r"no checkpoint of step 5 \(there are: \[2, 4, 6\]\)"):
    workdir_model.restore_params(lora_run, 5)
  with pytest.raises(WorkdirError, match="no checkpoint to read"):
    workdir_model.restore_params(tmp_path)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_and_left_in_place(lora_run, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(lora_run, copy)
  for f in (copy / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\0" * 8)
  with pytest.warns(RuntimeWarning, match="could not be read"):
    step, _, _ = workdir_model.restore_params(copy)
  assert step == 4 and layout.steps(copy) == [2, 4, 6]  # reading moves nothing
  with pytest.raises(WorkdirError, match="unreadable checkpoint"):
    workdir_model.restore_params(copy, 6)


def test_prepare_refuses_another_run_unless_restart(tmp_path):
  job = tiny_job().to_dict()
  assert layout.prepare(tmp_path, job, False, incompatible_fields) is None
  assert json.loads((tmp_path / "config.json").read_text()) == job
  other = {**job, "seq_len": 64}
  with pytest.raises(WorkdirError, match=r"different config \(seq_len \(32 -> 64\)\)"):
    layout.prepare(tmp_path, other, False, incompatible_fields)
  note = layout.prepare(tmp_path, other, True, incompatible_fields)
  assert note.startswith("--restart: moved the previous run to") and \
      len(list(tmp_path.glob("previous_*/config.json"))) == 1
