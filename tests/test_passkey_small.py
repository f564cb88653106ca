"""The small-scale PassKey experiment (configs/passkey_small.py, experiments/passkey_small.py): every
variant validates and has the same size, data and steps, and the one command trains and evaluates end to
end (2 steps per model here; the real run's numbers are in the README and docs/passkey_small.md)."""

import importlib.util
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

# The PassKey experiment's command end to end: the full suite only (make test).
pytestmark = pytest.mark.slow


def test_variants_validate_and_differ_only_in_attention():
  jobs = {v: job_config(passkey_small.get_config(v), vocab_size=259)
          for v in (*passkey_small.VARIANTS, *passkey_small.EXTRA_VARIANTS)}
  sizes = {}
  for name, job in jobs.items():
    model = famjax.Transformer(job.model, rngs=nnx.Rngs(0))
    params = model.params_dict()
    gate = {k: params["layers"].pop(k) for k in ("fam_gate", "fam_gate_bias") if k in params["layers"]}
    assert bool(gate) == (name == "fam_gate") and sum(g.size for g in gate.values()) in (0, 2 * (64 + 8))
    sizes[name] = sum(leaf.size for k, v in params.items() if k != "fam_prompt" for leaf in jax.tree.leaves(v))
    assert job.train.steps == jobs["fam"].train.steps and job.train.batch_size == jobs["fam"].train.batch_size
    assert job.model.init_std == 64 ** -0.5  # the width's fan-in scale, not GPT-2's 0.02
    expected = "passkey_repeated_small" if name == "fam_repeated" else "passkey_random_small"
    assert job.data.mixture == expected and job.train.seq_len == passkey_small.TRAIN_LENGTH
  assert len(set(sizes.values())) == 1, sizes  # FAM adds only its prompt (and the gate its 144 weights)
  fam = jobs["fam"]
  assert (fam.model.attention, fam.model.mem_segments, fam.model.fam_len) == ("fam", 0, 8)
  assert fam.fam.rsp_prob == 0.0 and not fam.fam.rpo and not fam.model.fam_gate
  assert jobs["fam_gate"].model.fam_gate and jobs["fam_gate"].model.replace(fam_gate=False) == fam.model
  assert jobs["fam_rsp"].fam.rsp_prob == 0.8 and jobs["fam_rsp"].fam.rsp_start_step == 0
  assert jobs["fam_rsp_late"].fam.rsp_start_step == fam.train.steps // 2
  assert [jobs[f"bswa_m{m}"].model.mem_segments for m in range(3)] == [0, 1, 2]
  assert {jobs[f"bswa_m{m}"].model.block_size for m in range(3)} == {fam.model.block_size}
  with pytest.raises(ValueError, match="unknown variant 'bswa_m9'"):
    passkey_small.get_config("bswa_m9")


def test_one_command_trains_and_evaluates(tmp_path):
  out = tmp_path / "exp"
  proc = subprocess.run(
      [sys.executable, "experiments/passkey_small.py", f"--out={out}", "--steps=2",
       "--variants=fam", "--lengths=512,1k", "--examples=2"],  # several models: test_eval_cli
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  results = json.loads((out / "eval" / "results.json").read_text())
  assert list(results["models"]) == ["fam"]
  assert results["settings"]["passkey_format"] == "random"
  for name, entry in results["models"].items():
    assert entry["info"]["step"] == 2
    assert [(r["total_tokens"], r["n"], r["format"]) for r in entry["passkey"]] == [
        (512, 2, "random"), (1024, 2, "random")]
  repeated = json.loads((out / "eval" / "repeated" / "results.json").read_text())
  assert list(repeated["models"]) == ["fam"] and repeated["settings"]["passkey_format"] == "repeated"
  assert (out / "eval" / "passkey.png").read_bytes()[:4] == b"\x89PNG"
  assert "| 1k |" in proc.stdout and "wall time" in proc.stdout
  for fmt in ("random", "repeated"):
    fam_state = (out / "eval" / f"fam_state_{fmt}.md").read_text()
    assert "### fam" in fam_state and "| 128 |" in fam_state


def test_bad_variant_is_refused_before_anything_runs(tmp_path, capsys):
  """The script's main in this process (the test above runs it as a subprocess)."""
  spec = importlib.util.spec_from_file_location("passkey_small_experiment",
                                                f"{ROOT}/experiments/passkey_small.py")
  experiment = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(experiment)
  with pytest.raises(SystemExit) as exit_:
    experiment.main([f"--out={tmp_path}", "--variants=fam,lstm"])
  assert exit_.value.code == 2 and "unknown ['lstm']" in capsys.readouterr().err
  assert not any(tmp_path.iterdir())
