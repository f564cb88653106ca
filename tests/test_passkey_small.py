"""The small-scale PassKey experiment (configs/passkey_small.py, experiments/passkey_small.py): every
variant validates and has the same size, data and steps, the one command trains and evaluates end to
end (2 steps per model here; the real run's numbers are in the README and docs/passkey_small.md), and
--seeds builds one run per seed and summarises them as mean (min-max) per variant and length."""

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


def _experiment():
  """experiments/passkey_small.py as a module (it is a script, not a package)."""
  spec = importlib.util.spec_from_file_location("passkey_small_experiment",
                                                f"{ROOT}/experiments/passkey_small.py")
  experiment = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(experiment)
  return experiment


@pytest.mark.slow  # six models built: the full suite only (make test)
def test_variants_validate_and_differ_only_in_attention():
  jobs = {v: job_config(passkey_small.get_config(v), vocab_size=259)
          for v in (*passkey_small.VARIANTS, *passkey_small.EXTRA_VARIANTS)}
  sizes = {}
  for name, job in jobs.items():
    model = famjax.Transformer(job.model, rngs=nnx.Rngs(0))
    params = model.params_dict()
    gate = {k: params["layers"].pop(k) for k in ("fam_gate", "fam_gate_bias") if k in params["layers"]}
    assert bool(gate) == name.startswith("fam_gate") and sum(g.size for g in gate.values()) in (0, 2 * (64 + 8))
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


@pytest.mark.slow  # the PassKey experiment's command end to end: the full suite only (make test)
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


def test_bad_arguments_are_refused_before_anything_runs(tmp_path, capsys):
  """The script's main in this process (the test above runs it as a subprocess)."""
  experiment = _experiment()
  for args, message in ((["--variants=fam,lstm"], "unknown ['lstm']"),
                        (["--seeds=0"], "--seeds must be >= 1 (runs per variant), got 0")):
    with pytest.raises(SystemExit) as exit_:
      experiment.main([f"--out={tmp_path}", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
  assert not any(tmp_path.iterdir())


def test_seeds_build_one_run_per_seed(tmp_path):
  """--seeds=1 is the command without seeds (no --config.seed, OUT/VARIANT); --seeds=N gives every run
  --config.seed=s and OUT/VARIANT/seed{s}, named VARIANT_s{s} in the evaluation."""
  experiment = _experiment()
  py, train = sys.executable, ["-m", "famjax.train"]
  one = experiment.train_commands(tmp_path, ["fam", "bswa_m1"], None, seeds=1)
  assert one == {v: [py, *train, f"--config=configs/passkey_small.py:{v}", f"--workdir={tmp_path / v}"]
                 for v in ("fam", "bswa_m1")}
  three = experiment.train_commands(tmp_path, ["fam", "bswa_m1"], 7, seeds=3)
  assert list(three) == ["fam_s0", "fam_s1", "fam_s2", "bswa_m1_s0", "bswa_m1_s1", "bswa_m1_s2"]
  assert three["bswa_m1_s2"] == [py, *train, "--config=configs/passkey_small.py:bswa_m1",
                                 f"--workdir={tmp_path / 'bswa_m1' / 'seed2'}", "--config.steps=7",
                                 "--config.seed=2"]
  assert all(cmd[-1] == f"--config.seed={name[-1]}" for name, cmd in three.items())
  runs = experiment.runs(tmp_path, ["fam"], 2)
  assert runs == {"fam_s0": ("fam", 0, tmp_path / "fam" / "seed0"),
                  "fam_s1": ("fam", 1, tmp_path / "fam" / "seed1")}
  models = {name: workdir for name, (_, _, workdir) in runs.items()}
  assert experiment.eval_command(models, "512", 2, "random", tmp_path / "eval")[3:5] == [
      f"--model=fam_s0={tmp_path / 'fam' / 'seed0'}", f"--model=fam_s1={tmp_path / 'fam' / 'seed1'}"]


def _passkey(*rows):
  """famjax.eval's PassKey rows: (total tokens, exact match) -> the fields the summary reads."""
  return {"passkey": [{"total_tokens": t, "filler_tokens": t - 13, "exact_match": e} for t, e in rows]}


# Made-up per-seed results: fam_gate at 50 / 75 / 100 % (512 tokens) and 40 / 60 / 80 % (8k); fam at
# 25 / 50 / 75 % and 0 / 0 / 10 %; bswa_m0 (one seed evaluated at 512 only) at 5 %.
RESULTS = {"models": {"fam_gate_s0": _passkey((512, 50.0), (8192, 40.0)),
                      "fam_gate_s1": _passkey((512, 100.0), (8192, 80.0)),
                      "fam_gate_s2": _passkey((512, 75.0), (8192, 60.0)),
                      "fam_s0": _passkey((512, 25.0), (8192, 0.0)),
                      "fam_s1": _passkey((512, 75.0), (8192, 10.0)),
                      "fam_s2": _passkey((512, 50.0), (8192, 0.0)),
                      "bswa_m0_s0": _passkey((512, 5.0))},
           "settings": {"passkey_examples": 4}}
GROUPS = {"fam": ["fam_s0", "fam_s1", "fam_s2"], "fam_gate": ["fam_gate_s0", "fam_gate_s1", "fam_gate_s2"],
          "bswa_m0": ["bswa_m0_s0", "bswa_m0_s1"], "bswa_m2": ["bswa_m2_s0"]}


def test_seed_summary_is_mean_min_max_per_variant_and_length():
  experiment = _experiment()
  summary = experiment.seed_summary(RESULTS, GROUPS)
  assert list(summary) == ["fam", "fam_gate", "bswa_m0"]  # bswa_m2: no run in the results
  assert summary["fam_gate"] == [
      {"total_tokens": 512, "filler_tokens": 499, "mean": 75.0, "min": 50.0, "max": 100.0, "seeds": 3},
      {"total_tokens": 8192, "filler_tokens": 8179, "mean": 60.0, "min": 40.0, "max": 80.0, "seeds": 3}]
  assert [(r["mean"], r["min"], r["max"]) for r in summary["fam"]] == [(50.0, 25.0, 75.0),
                                                                       (10 / 3, 0.0, 10.0)]
  assert summary["bswa_m0"] == [
      {"total_tokens": 512, "filler_tokens": 499, "mean": 5.0, "min": 5.0, "max": 5.0, "seeds": 1}]


def test_a_difference_is_claimed_only_where_ranges_do_not_overlap():
  experiment = _experiment()
  summary = experiment.seed_summary(RESULTS, GROUPS)
  at = {v: {r["total_tokens"]: r for r in rows} for v, rows in summary.items()}
  assert experiment.ranges_overlap(at["fam_gate"][512], at["fam"][512])  # 50-100 and 25-75
  assert not experiment.ranges_overlap(at["fam_gate"][8192], at["fam"][8192])  # 40-80 and 0-10
  assert experiment.ranges_overlap({"min": 10, "max": 20}, {"min": 20, "max": 30})  # touching
  assert experiment.clearly_best({v: at[v][512] for v in at}) == set()
  assert experiment.clearly_best({v: at[v][8192] for v in ("fam", "fam_gate")}) == {"fam_gate"}
  assert experiment.clearly_best({"fam": at["fam"][512]}) == set()
  table = experiment.seed_table(summary).splitlines()
  assert table[0] == "| tokens | filler tokens | fam | fam_gate | bswa_m0 |"
  assert table[2] == "| 512 | 499 | 50 (25-75) | 75 (50-100) | 5 (5-5) |"
  assert table[3] == "| 8k | 8,179 | 3.3 (0-10) | **60 (40-80)** | - |"


def test_seed_summary_files(tmp_path):
  """write_seed_summary over famjax.eval's outputs: the table before the per-run report, the band plot
  as passkey.png, the per-run plot as passkey_runs.png, results.json untouched."""
  experiment = _experiment()
  (tmp_path / "results.json").write_text(json.dumps(RESULTS))
  (tmp_path / "results.md").write_text("# famjax evaluation\n")
  (tmp_path / "passkey.png").write_bytes(b"per run")
  experiment.write_seed_summary(tmp_path, GROUPS)
  md = (tmp_path / "results.md").read_text()
  assert md.startswith("# PassKey over 3 seeds") and md.endswith("# famjax evaluation\n")
  assert "4 examples per length" in md and "| 8k | 8,179 | 3.3 (0-10) | **60 (40-80)** | - |" in md
  assert (tmp_path / "passkey_runs.png").read_bytes() == b"per run"
  assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((tmp_path / "results.json").read_text()) == RESULTS
