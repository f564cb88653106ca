"""famjax.sweep: a sweep file expands into one famjax.train run per point, each with its own workdir."""

import os
import subprocess
import sys

import pytest

from famjax import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_table11_expands_to_bswa_memories_and_fam():
  spec = sweep.load_sweep(os.path.join(ROOT, "configs/sweeps/table11.py"))
  runs = sweep.commands(spec, "/w", extra=["--config.steps=10"])
  names = [name for name, _ in runs]
  assert names == ["bswa_m0", "bswa_m1", "bswa_m2", "bswa_m3", "bswa_m4", "bswa_m6", "bswa_m7",
                   "bswa_m8", "fam"]
  assert runs[3][1] == ["python", "-m", "famjax.train", "--config=configs/fam_1b.py:bswa_m3",
                        "--workdir=/w/bswa_m3", "--config.steps=10"]
  sweep.validate(spec, __import__("pathlib").Path(ROOT))  # every point's config is valid


def test_overrides_and_bad_sweeps(tmp_path):
  spec = sweep.load_sweep(os.path.join(ROOT, "configs/sweeps/demo_attention.py"))
  (name, argv), = sweep.commands(spec, "/w", only=["bswa"])
  assert name == "bswa" and "--config.steps=60" in argv and "--config=configs/demo.py:bswa" in argv
  bad = tmp_path / "bad.py"
  bad.write_text("def get_sweep():\n  return {'config': 'configs/demo.py', 'points': [{'name': 'a'}, "
                 "{'name': 'a'}]}\n")
  with pytest.raises(ValueError, match="unique name"):
    sweep.load_sweep(bad)
  typo = {"config": "configs/demo.py", "points": [{"name": "a", "overrides": {"model.d_modell": 8}}]}
  with pytest.raises(ValueError, match=r"config\.model\.d_modell: unknown field"):
    sweep.validate(typo, __import__("pathlib").Path(ROOT))


def test_dry_run_prints_every_command_through_a_launcher():
  out = subprocess.run([sys.executable, "-m", "famjax.sweep", "--sweep=configs/sweeps/table11.py",
                        "--workdir=/tmp/w", "--dry_run",
                        "--launcher=python launch/local.py --num_processes 2 --",
                        "--", "--config.steps=5"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 9
  assert lines[-1] == ("python launch/local.py --num_processes 2 -- python -m famjax.train "
                       "--config=configs/fam_1b.py:fam --workdir=/tmp/w/fam --config.steps=5")
