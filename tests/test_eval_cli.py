"""`python -m famjax.eval` as a user runs it: a trained workdir and a Hugging Face directory evaluated
in one call (PassKey at two lengths and a task) write results.json, results.md and passkey.png (a real
subprocess); one checkpoint of a workdir, and a missing workdir, checkpoint or dataset and a bad length
spec are one line naming the problem, exit status 2 (famjax.eval's main in this process, tests/cli.py)."""

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

import famjax
from cli import run_main
from test_train_cli import ROOT, TINY, env

# Real famjax.train and famjax.eval runs: the full suite only (make test).
pytestmark = pytest.mark.slow


def run(module, *flags, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A famjax run of 2 steps: a FAM model over the byte vocabulary's 259 ids."""
  path = tmp_path_factory.mktemp("eval_cli") / "run"
  proc = run("famjax.train", *TINY, "--config.model.vocab_size=259", "--config.steps=2",
             "--config.log_every=1", "--config.checkpoint_every=1", f"--workdir={path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  cfg = famjax.ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                           attention="bswa", block_size=8, mem_segments=1, fam_len=0, dtype="float32",
                           remat="none")
  return famjax.to_hf(famjax.Transformer(cfg, rngs=nnx.Rngs(1)), tmp_path_factory.mktemp("hf") / "hf")


def test_two_models_in_one_call(workdir, hf_dir, tmp_path):
  out = tmp_path / "out"
  proc = run("famjax.eval", f"--model=run={workdir}", f"--model=hf={hf_dir}",
             "--passkey_lengths=256,512", "--passkey_examples=1", "--tasks=famjax_demo_short_kv_lookup",
             "--task_examples=1", "--max_new_tokens=4", f"--out_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert list(results["models"]) == ["run", "hf"]
  fam, bswa = results["models"]["run"], results["models"]["hf"]
  assert fam["info"]["step"] == 2 and fam["info"]["model"]["attention"] == "fam"
  assert bswa["info"]["model"]["attention"] == "bswa"
  for entry in (fam, bswa):
    assert [(r["total_tokens"], r["n"]) for r in entry["passkey"]] == [(256, 1), (512, 1)]
    task = entry["tasks"]["famjax_demo_short_kv_lookup"]
    assert task["n"] == 1 and set(task["metrics"]) == {"exact_match"}
  table = (out / "results.md").read_text()
  assert "| tokens | filler tokens | run | hf |" in table and "| 512 |" in table
  assert "| famjax_demo_short_kv_lookup | exact_match | 1 |" in table
  assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG"
  assert "run passkey 512: 506 tokens in" in proc.stderr  # the progress line's last report
  assert "run passkey 256: exact match" in proc.stdout


def test_one_checkpoint_of_a_workdir(workdir, tmp_path):
  proc = run_main("famjax.eval", [f"--model=first={workdir / 'checkpoints' / '1'}", f"--model=last={workdir}",
                                "--passkey_lengths=256", "--passkey_examples=1", f"--out_dir={tmp_path}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  models = json.loads((tmp_path / "results.json").read_text())["models"]
  assert (models["first"]["info"]["step"], models["last"]["info"]["step"]) == (1, 2)
  proc = run_main("famjax.eval", [f"--model=x={workdir / 'checkpoints' / '7'}", "--passkey_lengths=256",
                                f"--out_dir={tmp_path / 'none'}"])
  assert proc.returncode == 2 and "no such directory" in proc.stderr


@pytest.mark.parametrize("case", ["missing_workdir", "no_checkpoint", "bad_length", "missing_dataset",
                                  "negative_text_tokens"])
def test_user_errors_are_one_line_exit_2(case, hf_dir, tmp_path):
  flags = {
      "missing_workdir": [f"--model=x={tmp_path / 'nowhere'}", "--passkey_lengths=2k"],
      "no_checkpoint": [f"--model=x={tmp_path}", "--passkey_lengths=2k"],
      "bad_length": [f"--model=x={hf_dir}", "--passkey_lengths=2k,3x"],
      "missing_dataset": [f"--model=x={hf_dir}", "--tasks=scrolls_qasper",
                          f"--tfds_data_dir={tmp_path / 'tfds'}"],
      "negative_text_tokens": [f"--model=x={hf_dir}", "--tasks=pg19", "--text_tokens=-5"],
  }[case]
  named = {"missing_workdir": f"{tmp_path / 'nowhere'}: no such directory",
           "no_checkpoint": f"{tmp_path}: no checkpoint to read",
           "bad_length": "bad length '3x'",
           "missing_dataset": f"is not prepared in {tmp_path / 'tfds'}",
           "negative_text_tokens": "--text_tokens must be >= 0, got -5"}[case]
  (tmp_path / "config.json").write_text(json.dumps({"model": {}, "data": {}}))
  proc = run_main("famjax.eval", [*flags, f"--out_dir={tmp_path / 'out'}"])
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("famjax.eval: error: ") and named in lines[0], lines
  assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "out" / "results.json")
