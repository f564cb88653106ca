"""The small-scale PassKey experiment (configs/passkey_small.py, experiments/passkey_small.py): every
variant validates and has the same size, and the one command trains and evaluates end to end (2 steps per
model here; the real run's numbers are in the README)."""

import json
import subprocess
import sys

import jax
import pytest
from flax import nnx

import famjax
from configs import passkey_small
from famjax.training.config import job_config
from test_train_cli import ROOT, env


def test_variants_validate_and_differ_only_in_attention():
  jobs = {v: job_config(passkey_small.get_config(v), data_vocab_size=lambda: 259)
          for v in (passkey_small.PRETRAIN, *passkey_small.VARIANTS)}
  pretrain = jobs.pop(passkey_small.PRETRAIN)
  assert pretrain.data["mixture"] == "passkey_copy_small" and pretrain.model.attention == "full"
  sizes = {}
  for name, job in jobs.items():
    model = famjax.Transformer(job.model, rngs=nnx.Rngs(0))
    sizes[name] = sum(leaf.size for k, v in model.params_dict().items() if k != "fam_prompt"
                      for leaf in jax.tree.leaves(v))
    assert job.data["mixture"] == "passkey_small" and job.train.steps == jobs["fam"].train.steps
  pretrained = famjax.Transformer(pretrain.model, rngs=nnx.Rngs(0)).params_dict()
  # Every variant has the pretrained model's weights (FAM adds only its prompt).
  assert set(sizes.values()) == {sum(leaf.size for leaf in jax.tree.leaves(pretrained))}, sizes
  assert jobs["fam"].fam.rsp_prob == 0.8 and jobs["fam_norsp"].fam.rsp_prob == 0.0
  assert [jobs[f"bswa_m{m}"].model.mem_segments for m in range(3)] == [0, 1, 2]
  assert jobs["fam"].model.mem_segments == 0 and jobs["fam"].model.fam_len == 8
  with pytest.raises(ValueError, match="unknown variant 'bswa_m9'"):
    passkey_small.get_config("bswa_m9")


def test_one_command_trains_and_evaluates(tmp_path):
  out = tmp_path / "exp"
  proc = subprocess.run(
      [sys.executable, "experiments/passkey_small.py", f"--out={out}", "--steps=2",
       "--pretrain_steps=2", "--variants=fam,bswa_m1", "--lengths=256,512", "--examples=2"],
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  results = json.loads((out / "eval" / "results.json").read_text())
  assert list(results["models"]) == ["fam", "bswa_m1"]
  assert results["settings"]["passkey_format"] == "short"
  for name, entry in results["models"].items():
    assert entry["info"]["step"] == 2
    assert [(r["total_tokens"], r["n"], r["format"]) for r in entry["passkey"]] == [
        (256, 2, "short"), (512, 2, "short")]
  assert (out / "eval" / "passkey.png").read_bytes()[:4] == b"\x89PNG"
  assert "| 512 |" in proc.stdout and "wall time" in proc.stdout
  assert f"initialised the parameters from {out / 'pretrain'}" in (out / "fam" / "train.log").read_text()
  fam_state = (out / "eval" / "fam_state.md").read_text()
  assert "### fam" in fam_state and "| 128 |" in fam_state and "bswa" not in fam_state


def test_bad_variant_is_refused_before_anything_runs(tmp_path):
  proc = subprocess.run([sys.executable, "experiments/passkey_small.py", f"--out={tmp_path}",
                         "--variants=fam,lstm"], cwd=ROOT, env=env(), capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 2 and "unknown ['lstm']" in proc.stderr
  assert not any(tmp_path.iterdir())
