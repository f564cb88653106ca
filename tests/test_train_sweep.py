"""famjax.sweep: a sweep file expands into one famjax.train run per point, each with its own workdir."""

import json
import os
import subprocess
import sys

import pytest

from cli import run_main
from famjax import sweep, sweep_report
from testenv import subprocess_env

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


ABLATION_SWEEPS = {  # configs/sweeps/<file>: point names (docs/ablations.md)
    "fam_length.py": ["fam4", "fam8", "fam16", "fam32", "fam64"],
    "fam_length_1b.py": ["fam4", "fam16", "fam64", "fam256", "fam1024"],
    "fam_position.py": ["last", "between", "zero"],
    "fam_init.py": ["prompt", "prefix"],
    "fam_history.py": ["history1", "history2", "history4"],
    "rpo_rsp.py": ["plain", "rpo", "rsp", "rpo_rsp", "rpo_rsp050", "rpo_rsp100"],
}


@pytest.mark.parametrize("name", sorted(ABLATION_SWEEPS))
def test_ablation_sweeps_build_a_valid_config_for_every_point(name):
  """Every point of the ablation sweeps builds a valid job config, and sets what it says it sets."""
  from famjax.training.config import job_config  # pylint: disable=import-outside-toplevel
  spec = sweep.load_sweep(os.path.join(ROOT, "configs/sweeps", name))
  assert [p["name"] for p in spec["points"]] == ABLATION_SWEEPS[name]
  sweep.validate(spec, __import__("pathlib").Path(ROOT))
  config_module = __import__("importlib").import_module(spec["config"][:-3].replace("/", "."))
  for point in spec["points"]:
    config = config_module.get_config(point["variant"])
    for key, value in {**spec.get("overrides", {}), **point["overrides"]}.items():
      section, field = (config, key) if "." not in key else (config[key.split(".")[0]], key.split(".")[1])
      section[field] = value
    job = job_config(config, vocab_size=259)
    for key, value in point["overrides"].items():
      group, field = key.split(".")
      assert getattr(getattr(job, group), field) == value, (point["name"], key)
  runs = sweep.commands(spec, "/w")
  assert all(f"--workdir=/w/{p['name']}" in argv for p, (_, argv) in zip(spec["points"], runs))


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
  with pytest.raises(ValueError, match=r"point a: config\.model\.d_modell: unknown field"):
    sweep.validate(typo, __import__("pathlib").Path(ROOT))


@pytest.mark.parametrize("overrides,extra,message", [
    ({"steps": "ten"}, [], "point a: flag --config.steps=ten: invalid literal for int()"),  # wrongly typed
    ({"model.fam_len": 1.5}, [], "point a: flag --config.model.fam_len=1.5"),
    ({}, ["--config.steps=ten"], "point a: flag --config.steps=ten"),            # ... after `--`
    ({}, ["--confg.steps=5"], "point a: Unknown command line flag 'confg.steps'"),  # an unknown flag
    ({}, ["--config.eval_passkey_lengths=1k"], "point a: config.eval_passkey_lengths='1k' has no effect"),
])
def test_bad_overrides_and_flags_are_refused_before_any_point_starts(tmp_path, capsys, overrides, extra,
                                                                   message):
  """As famjax.train parses the point's command line; main exits with one line, no workdir written."""
  spec = write_sweep(tmp_path / "s.py", [{"name": "a", "variant": "full", "overrides": overrides},
                                         {"name": "b", "variant": "full"}])
  with pytest.raises(ValueError) as e:
    sweep.validate(sweep.load_sweep(spec), __import__("pathlib").Path(ROOT), extra)
  assert message in str(e.value)
  proc = run_main("famjax.sweep", [f"--sweep={spec}", f"--workdir={tmp_path / 'w'}", "--", *extra])
  assert proc.returncode == 1 and proc.stderr.startswith("famjax.sweep: error: point a: ")
  assert message in proc.stderr and proc.stderr.count("\n") == 1 and not (tmp_path / "w").exists()


@pytest.mark.slow
def test_dry_run_prints_every_command_through_a_launcher():
  out = subprocess.run([sys.executable, "-m", "famjax.sweep", "--sweep=configs/sweeps/table11.py",
                        "--workdir=/tmp/w", "--dry_run",
                        "--launcher=python launch/local.py --num_processes 2 --",
                        "--", "--config.steps=5"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=subprocess_env())
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 9
  assert lines[-1] == ("python launch/local.py --num_processes 2 -- python -m famjax.train "
                       "--config=configs/fam_1b.py:fam --workdir=/tmp/w/fam --config.steps=5")


# Results and runs in parallel. The tiny model of test_train_cli.py, 3 steps, with full attention (its
# step compiles in a third of FAM's time).
TINY = {"steps": 3, "log_every": 1, "checkpoint_every": 3, "tensorboard": False,
        "data.mixture": "synthetic", "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
        "model.n_kv_heads": 1, "model.mlp_dim": 64, "model.block_size": 8, "seq_len": 32, "batch_size": 2}


def run_sweep(sweep_file, workdir, *flags, timeout=300):
  return subprocess.run([sys.executable, "-m", "famjax.sweep", f"--sweep={sweep_file}",
                         f"--workdir={workdir}", *flags], cwd=ROOT, env=subprocess_env(), capture_output=True,
                        text=True, timeout=timeout)


def write_sweep(path, points, overrides=None):
  spec = {"config": "configs/demo.py", "overrides": overrides or {}, "points": points}
  path.write_text(f"def get_sweep():\n  return {spec!r}\n")
  return path


def results(workdir):
  return {p["name"]: p for p in json.loads((workdir / "sweep.json").read_text())["points"]}


@pytest.mark.slow
def test_parallel_sweep_reports_every_point_and_a_failed_one(tmp_path):
  spec = write_sweep(tmp_path / "s.py", [{"name": n, "variant": "full", "overrides": {"seed": s}}
                                         for n, s in (("broken", 3), ("a", 1), ("b", 2))], TINY)
  work = tmp_path / "w"
  (work / "broken").mkdir(parents=True)
  (work / "broken" / "config.json").write_text("{not json")  # fails at run time, in famjax.train
  out = run_sweep(spec, work, "--parallel=2")
  assert out.returncode == 1, out.stderr
  assert "sweep done: 2 of 3 runs succeeded; failed: broken" in out.stdout, out.stdout
  rows = results(work)
  assert list(rows) == ["broken", "a", "b"]
  for name, seed in (("a", 1), ("b", 2)):
    row = rows[name]
    assert row["status"] == "done" and row["step"] == 3 and row["steps"] == 3, row
    assert row["config"] == {"seed": seed} and row["config_from"] == "config.json"
    assert row["train_loss"] > 0 and row["tokens_per_second"] > 0 and row["mfu"] > 0
    assert row["eval_loss_best"] is None and row["passkey"] == {}
    assert "step 3/3" in (work / name / "train.log").read_text()
  broken = rows["broken"]
  assert broken["status"] == "failed" and broken["returncode"] == 2
  assert broken["config"] == {"variant": "full", "seed": 3}
  assert broken["note"].startswith("famjax.train: error: workdir ")
  table = (work / "sweep.md").read_text()
  assert "| a | seed=1 | done | 3/3 |" in table and "| b | seed=2 | done | 3/3 |" in table
  assert "| broken | variant=full, seed=3 | failed (exit 2) |" in table
  assert "famjax.train: error: workdir" in table
  assert (work / "sweep.png").read_bytes()[:4] == b"\x89PNG"
  a, b = (json.loads((work / n / "sweep_status.json").read_text()) for n in ("a", "b"))
  assert a["started"] < b["finished"] and b["started"] < a["finished"]  # side by side


@pytest.mark.slow
def test_launcher_starts_every_point_at_once_and_bad_input(tmp_path):
  spec = write_sweep(tmp_path / "s.py", [{"name": n} for n in ("p", "q", "r")])
  work = tmp_path / "w"
  out = run_sweep(spec, work, "--launcher=sh -c 'echo started {name}; sleep 2; echo boom {name} >&2; exit 3'")
  assert out.returncode == 1 and "sweep done: 0 of 3 runs succeeded" in out.stdout, out.stderr
  statuses = [json.loads((work / n / "sweep_status.json").read_text()) for n in "pqr"]
  assert max(s["started"] for s in statuses) < min(s["finished"] for s in statuses)  # all at once
  rows = results(work)
  for n in "pqr":
    assert rows[n]["status"] == "failed" and rows[n]["note"] == f"boom {n}"
    assert (work / n / "train.log").read_text().splitlines()[1:] == [f"started {n}", f"boom {n}"]
  assert "| p | – | failed (exit 3) |" in (work / "sweep.md").read_text()

  empty = tmp_path / "empty"
  out = run_sweep(spec, empty, "--report")
  assert out.returncode == 0, out.stderr
  assert "3 not started" in out.stdout
  assert {r["status"] for r in results(empty).values()} == {"not started"}

  out = run_sweep(spec, work, "--parallel=0")
  assert out.returncode == 1 and out.stderr.strip() == (
      "famjax.sweep: error: --parallel=0: must be >= 1 (points run at once)")


def test_report_reads_eval_and_passkey_metrics_and_running_points(tmp_path):
  spec = {"config": "configs/demo.py", "points": [
      {"name": "fam", "variant": "fam"}, {"name": "bswa", "variant": "bswa"}, {"name": "new"}]}
  records = [{"step": 10, "loss": 3.0, "tokens_per_second": 10.0, "mfu": 0.1},
             {"step": 20, "loss": 2.5, "tokens_per_second": 100.0, "mfu": 0.2, "eval_loss": 2.0,
              "eval_accuracy": 0.4, "eval_passkey_4k": 0.0, "eval_passkey_1k": 0.5},
             {"step": 30, "loss": 2.0, "tokens_per_second": 200.0, "mfu": 0.4, "eval_loss": 2.2,
              "eval_accuracy": 0.3, "eval_passkey_4k": 0.25, "eval_passkey_1k": 1.0}]
  for name, attention in (("fam", "fam"), ("bswa", "bswa")):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"steps": 100, "model": {"attention": attention}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4')
  (tmp_path / "fam" / "sweep_status.json").write_text(json.dumps(
      {"name": "fam", "host": __import__("socket").gethostname(), "pid": os.getpid(), "returncode": None}))
  rows = {r["name"]: r for r in sweep_report.gather(spec, tmp_path)}
  fam = rows["fam"]
  assert fam["status"] == "running" and fam["step"] == 30 and fam["train_loss"] == 2.0
  assert (fam["eval_loss_best"], fam["eval_loss_best_step"], fam["eval_loss_final"]) == (2.0, 20, 2.2)
  assert (fam["eval_accuracy_best"], fam["eval_accuracy_final"]) == (0.4, 0.3)
  assert list(fam["passkey"].items()) == [("1k", 1.0), ("4k", 0.25)]
  assert fam["tokens_per_second"] == 150.0 and fam["mfu"] == pytest.approx(0.3)  # first record skipped
  assert fam["config"] == {"model.attention": "fam"} and rows["bswa"]["status"] == "running"
  assert rows["new"]["status"] == "not started" and rows["new"]["config"] == {}
  (written, _) = sweep_report.report(spec, "s.py", tmp_path)
  table = (tmp_path / "sweep.md").read_text()
  assert "| PassKey 1k | PassKey 4k |" in table
  assert "| fam | model.attention=fam | running | 30/100 | 2.0000 | 2.0000 | 2.2000 | 40.0% | 30.0% " \
         "| 100.0% | 25.0% | 150 | 30.0% |" in table
  assert [p.name for p in written] == ["sweep.md", "sweep.json", "sweep.png"]
