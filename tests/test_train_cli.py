"""`python -m famjax.train` as a user runs it: bad input fails in one line before compiling; a run killed
with SIGKILL, resumed, stopped with SIGTERM and resumed again logs exactly the losses of an
uninterrupted run (FAM with RSP and RPO, so the RNG and the RSP state go through the checkpoints)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from testenv import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--config=configs/demo.py", "--config.data.mixture=synthetic", "--config.model.d_model=32",
        "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.n_kv_heads=1",
        "--config.model.mlp_dim=64", "--config.model.block_size=8", "--config.model.fam_len=2",
        "--config.seq_len=32", "--config.batch_size=2", "--config.tensorboard=False",
        "--config.fam.rsp_prob=0.8", "--config.fam.rpo=True"]


def env():
  """A training process's environment: one CPU device, whatever this process has; the suite's
  compilation cache (tests/conftest.py), so runs of one config compile their step once."""
  return subprocess_env()


def train(workdir, *flags):
  return subprocess.Popen([sys.executable, "-m", "famjax.train", *TINY, f"--workdir={workdir}", *flags],
                          cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


BAD_INPUT = [
    ("--config.model.fam_len=100", "config.model.fam_len"),
    ("--config.optimizer.nesterov=True", "config.optimizer.nesterov: unknown field"),
    ("--config.model.d_modell=8", 'config.model.d_modell: unknown field (did you mean "d_model"'),
    ("--config.steps=ten", "--config.steps=ten"),
    ("--config.mesh.data=3", "config.mesh"),
    ("--config.eval_every=-1", "config.eval_every=-1 must be >= 0"),
    ("--config.microbatches=3", "config.microbatches=3 must be >= 1 and divide batch_size=2"),
    ("--config.profile_steps=5,500", "config.profile_steps='5,500' must lie inside the run"),
    (("--config.model.attention_impl=cudnn", "--config.model.dtype=bfloat16"),
     "config.model.attention_impl='cudnn' needs a GPU"),  # this test runs on CPU
    ("--config.model.remat=offload_qkv_proj", "config.model.remat='offload_qkv_proj' offloads to host"),
    (("--config.data.mixture=famjax_demo", "--config.data.repeat_segment_len=0", "--config.eval_every=5",
      "--config.eval_mixture=nope"), "config.eval_mixture='nope'"),
    (("--config.data.mixture=famjax_demo", "--config.data.repeat_segment_len=0", "--config.eval_every=5",
      "--config.eval_passkey_lengths=2x"), "config.eval_passkey_lengths='2x'"),
    # evaluation fields that would do nothing (famjax.training.config.check_evaluation)
    ("--config.eval_passkey_lengths=1k", "config.eval_passkey_lengths='1k' has no effect with eval_every=0"),
    ("--config.eval_mixture=famjax_demo", "config.eval_mixture='famjax_demo' has no effect with eval_every=0"),
    ("--config.eval_steps=5", "config.eval_steps=5 has no effect with eval_every=0"),
    (("--config.eval_every=5", "--config.eval_steps=0"), "config.eval_every=5 evaluates nothing"),
    (("--config.eval_every=5", "--config.eval_steps=0", "--config.eval_passkey_lengths=1k",
      "--config.eval_mixture=famjax_demo"), "config.eval_mixture='famjax_demo' has no effect with eval_steps=0"),
    (("--config.eval_every=5", "--config.eval_passkey_examples=4"),
     "config.eval_passkey_examples=4 has no effect without eval_passkey_lengths"),
]


def train_in_process(capsys, workdir, *flags):
  """famjax.train's main on its own flags in this process: (exit status, stdout, stderr)."""
  from absl import flags as absl_flags
  from famjax import train as train_module
  argv = ["famjax.train", *TINY, f"--workdir={workdir}", *flags]
  flag_values = absl_flags.FlagValues()
  holders = train_module.define_flags(flag_values, argv)
  with pytest.raises(SystemExit) as exit_:
    train_module.main(train_module.parse_flags(argv, flag_values), holders)
  out, err = capsys.readouterr()
  return exit_.value.code, out, err


@pytest.mark.parametrize("flag,field", [case if "--config.data.mixture=famjax_demo" not in case[0] else
                                        pytest.param(*case, marks=pytest.mark.slow) for case in BAD_INPUT])
def test_bad_input_is_one_line_before_compiling(capsys, tmp_path, flag, field):
  code, out, err = train_in_process(capsys, tmp_path / "w", *((flag,) if isinstance(flag, str) else flag))
  assert code == 2, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("famjax.train: error: ") and field in lines[0], err
  assert "Traceback" not in err and "compiling" not in out and not (tmp_path / "w").exists()


@pytest.mark.slow
def test_bad_input_from_the_command_line(tmp_path):
  """The same through `python -m famjax.train` (absl's app.run): one line, exit status 2."""
  proc = train(tmp_path / "w", "--config.steps=ten")
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("famjax.train: error: ") and "--config.steps=ten" in lines[0]


def steps_logged(workdir):
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
  return max(steps, default=0)


def losses(workdir):
  records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
  return {r["step"]: r["loss"] for r in records}


def wait_for_step(proc, workdir, step, timeout=120):
  deadline = time.monotonic() + timeout
  while steps_logged(workdir) < step:
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, "the run did not get there in time"
    time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_give_the_uninterrupted_losses(tmp_path):
  steps = ["--config.steps=150", "--config.checkpoint_every=5", "--config.log_every=1"]
  straight, run = tmp_path / "straight", tmp_path / "interrupted"
  reference = train(straight, *steps)  # side by side: compiling is single-threaded
  proc = train(run, *steps)
  wait_for_step(proc, run, 12)
  proc.send_signal(signal.SIGKILL)  # at any moment: mid-step, mid-save, mid-log
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  out, err = reference.communicate(timeout=300)
  assert reference.returncode == 0, err[-3000:]
  assert "resume or train further" in out and "evaluate:" in out

  proc = train(run, *steps)
  wait_for_step(proc, run, 60)
  proc.send_signal(signal.SIGTERM)  # the preemption notice: save and exit cleanly
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-3000:]
  assert "resumed from checkpoint" in out and "SIGTERM: saved checkpoint" in out
  stopped_at = int(out.split("SIGTERM: saved checkpoint ")[1].split()[0])
  assert stopped_at < 150 and (run / "checkpoints" / str(stopped_at)).is_dir()

  proc = train(run, *steps)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"resumed from checkpoint {stopped_at}" in out
  assert losses(run) == losses(straight)
  assert sorted(losses(run)) == list(range(1, 151))
