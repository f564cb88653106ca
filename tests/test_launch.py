"""launch/: the local multi-process launcher (real processes on 127.0.0.1), the TPU pod commands (dry run),
the SLURM script (syntax)."""

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def load(name):
  spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(LAUNCH, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


local = load("local")
tpu_pod = load("tpu_pod")


def launch(tmp_path, snippet, *flags, timeout=60):
  """Runs `snippet` under launch/local.py; returns (exit code, output lines, seconds)."""
  script = tmp_path / "snippet.py"
  script.write_text(textwrap.dedent(snippet))
  start = time.monotonic()
  proc = subprocess.Popen([sys.executable, os.path.join(LAUNCH, "local.py"), *flags, "--", sys.executable,
                           str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every process it started
    out, err = proc.communicate()
    pytest.fail(f"the launcher ran past {timeout} s:\n{out}{err}")
  return proc.returncode, (out + err).splitlines(), time.monotonic() - start


# --- local.py: pure parts -----------------------------------------------------------------------------

def test_process_env():
  env = local.process_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "HOME": "/h"},
                          process_id=1, num_processes=2, port=1234, devices=4)
  assert env["FAMJAX_COORDINATOR"] == "127.0.0.1:1234"
  assert (env["FAMJAX_NUM_PROCESSES"], env["FAMJAX_PROCESS_ID"]) == ("2", "1")
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
  assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == "/h"


def test_exit_code():
  assert [local.exit_code(c) for c in (0, 3, -15, -9)] == [0, 3, 143, 137]


# --- local.py: real processes -------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_of_two_devices_gather_across_processes(tmp_path):
  code, lines, _ = launch(tmp_path, """
      import jax, numpy as np
      from jax.experimental import multihost_utils
      from famjax.parallel import distributed
      spec = distributed.initialize(timeout_s=30)
      local = np.arange(jax.local_device_count()) + 10 * jax.process_index()
      gathered = multihost_utils.process_allgather(local, tiled=True)
      total = jax.jit(lambda x: x.sum())(multihost_utils.host_local_array_to_global_array(
          local, jax.sharding.Mesh(np.array(jax.devices()), ("d",)), jax.sharding.PartitionSpec("d")))
      print(f"process {spec.process_id}/{spec.num_processes} devices {jax.device_count()} "
            f"gathered {gathered.tolist()} sum {int(total)}", flush=True)
      distributed.shutdown()  # both leave together (famjax.train's ending)
      print("left", jax.distributed.is_initialized(), flush=True)
  """, "--num_processes", "2", "--devices_per_process", "2")
  assert code == 0, "\n".join(lines)
  for p in (0, 1):
    assert f"[p{p}] process {p}/2 devices 4 gathered [0, 1, 10, 11] sum 22" in lines
    assert f"[p{p}] left False" in lines


# The processes that must be stopped sleep for SLEEP_S: a launcher that waited for them instead would run
# into the subprocess timeout (the launch() helper's), far below it, and fail; no wall-clock bound needed.
SLEEP_S = 3600


@pytest.mark.slow
def test_a_failing_process_stops_the_others(tmp_path):
  code, lines, _ = launch(tmp_path, f"""
      import os, sys, time
      if os.environ["FAMJAX_PROCESS_ID"] == "1":
        time.sleep(0.5)
        sys.exit(3)
      print("sleeping", flush=True)
      time.sleep({SLEEP_S})
      print("woke up", flush=True)
  """, "--num_processes", "2", timeout=120)
  assert code == 3
  assert "[p0] sleeping" in lines and "[p0] woke up" not in lines
  assert any("process 1 exited with code 3; stopping the others" in line for line in lines)


@pytest.mark.slow
def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path):
  code, lines, seconds = launch(tmp_path, f"""
      import os, signal, sys, time
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
      if os.environ["FAMJAX_PROCESS_ID"] == "1":
        time.sleep(0.3)
        sys.exit(4)
      print("ignoring SIGTERM", flush=True)
      time.sleep({SLEEP_S})
      print("woke up", flush=True)
  """, "--num_processes", "2", "--grace_s", "1", timeout=120)
  assert code == 4 and "[p0] ignoring SIGTERM" in lines and "[p0] woke up" not in lines
  assert seconds >= 1.3  # process 0 outlived SIGTERM: it was killed after the 1 s grace period


@pytest.mark.slow
def test_ctrl_c_is_forwarded_to_every_process(tmp_path):
  script = tmp_path / "snippet.py"
  script.write_text(textwrap.dedent("""
      import time
      try:  # "up" inside the try: a SIGINT right after it must still be caught
        print("up", flush=True)
        time.sleep(120)
      except KeyboardInterrupt:
        print("interrupted", flush=True)
  """))
  launcher = subprocess.Popen([sys.executable, os.path.join(LAUNCH, "local.py"), "--num_processes", "2", "--",
                               sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
  seen = []
  while sum(line.endswith("] up\n") for line in seen) < 2 and len(seen) < 20:  # both processes are up
    seen.append(launcher.stdout.readline())
  assert sum(line.endswith("] up\n") for line in seen) == 2, seen
  launcher.send_signal(signal.SIGINT)
  rest = launcher.communicate(timeout=20)[0]
  assert launcher.returncode == 128 + signal.SIGINT
  assert "[p0] interrupted" in rest and "[p1] interrupted" in rest


@pytest.mark.slow
def test_processes_with_different_configs_are_named(tmp_path):
  code, lines, _ = launch(tmp_path, """
      import os
      from famjax.parallel import distributed
      distributed.initialize(timeout_s=30)
      layers = 2 if os.environ["FAMJAX_PROCESS_ID"] == "0" else 3
      distributed.check_same_config({"model": {"layers": layers, "heads": 4}, "seed": 0})
  """, "--num_processes", "2")
  assert code == 1
  text = "\n".join(lines)
  assert "ConfigMismatchError" in text
  assert "processes [1]: config" in text and "model.layers = 3 (process 0: 2)" in text


@pytest.mark.slow
def test_every_process_reporting_id_zero_is_caught(tmp_path):
  code, lines, _ = launch(tmp_path, """
      import os
      os.environ["FAMJAX_PROCESS_ID"] = "0"  # a launcher that forgot to number its processes
      from famjax.parallel import distributed
      distributed.initialize(timeout_s=30)
  """, "--num_processes", "2", timeout=120)
  assert code == 1  # the roll call's verdict, not jax's abort after its own timeout (exit 134)
  assert any("also started as process 0" in line for line in lines), lines


# --- tpu_pod.py ---------------------------------------------------------------------------------------

def dry_run(capsys, monkeypatch, argv):
  def refuse(*args, **kwargs):
    raise AssertionError(f"--dry_run ran a command: {args}")
  monkeypatch.setattr(tpu_pod.subprocess, "run", refuse)
  monkeypatch.setattr(tpu_pod.subprocess, "Popen", refuse)
  split = argv.index("--") if "--" in argv else len(argv)
  assert tpu_pod.main([*argv[:split], "--dry_run", *argv[split:]]) == 0
  return capsys.readouterr().out.splitlines()


def test_tpu_pod_dry_run_single_slice(capsys, monkeypatch):
  lines = dry_run(capsys, monkeypatch, [
      "--name", "fam", "--zone", "us-east5-a", "--project", "proj", "--accelerator_type", "v5p-64", "--create",
      "--ship", "--delete", "--", "python3", "-m", "famjax.train", "--config", "configs/base.py", "--workdir",
      "gs://bucket/run 1"])
  where = "--zone=us-east5-a --project=proj"
  install = (f"python3 -m pip install -q -r requirements.txt 'jax[tpu]=={tpu_pod.jax_version()}' && "
             f"python3 -m pip install -q --no-deps -e .")
  assert lines == [
      f"gcloud compute tpus queued-resources create fam --accelerator-type=v5p-64 "
      f"--runtime-version=v2-alpha-tpuv5 --node-id=fam {where}",
      f"gcloud compute tpus queued-resources describe fam {where} '--format=value(state.state)'",
      shlex.join(tpu_pod.tar_command()),
      f"gcloud compute tpus tpu-vm scp /tmp/famjax.tar.gz fam:famjax.tar.gz --worker=all {where}",
      shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fam", "--worker=all", "--zone=us-east5-a",
                  "--project=proj", "--command=rm -rf ~/famjax && mkdir -p ~/famjax && tar -xzf famjax.tar.gz "
                  f"-C ~/famjax && cd ~/famjax && {install}"]),
      shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fam", "--worker=all", "--zone=us-east5-a",
                  "--project=proj", "--command=cd ~/famjax && python3 -m famjax.train --config configs/base.py "
                  "--workdir 'gs://bucket/run 1'"]),
      f"gcloud compute tpus queued-resources delete fam --force --quiet {where}",
  ]


def test_tpu_pod_dry_run_multislice(capsys, monkeypatch):
  lines = dry_run(capsys, monkeypatch, ["--name", "fam", "--zone", "z", "--accelerator_type", "v5p-128",
                                        "--num_slices", "2", "--spot", "--create", "--", "python3", "-m",
                                        "famjax.train"])
  assert lines[0] == ("gcloud compute tpus queued-resources create fam --accelerator-type=v5p-128 "
                      "--runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=fam --spot --zone=z")
  assert lines[2:] == [f"gcloud compute tpus tpu-vm ssh fam-{k} --worker=all --zone=z "
                       f"'--command=cd ~/famjax && python3 -m famjax.train'" for k in (0, 1)]


def test_tpu_pod_needs_something_to_do():
  with pytest.raises(SystemExit):
    tpu_pod.parse_args(["--name", "fam", "--zone", "z"])


def test_slurm_script_is_valid_bash_and_runs_the_trainer_under_srun():
  path = os.path.join(LAUNCH, "slurm_gpu.sbatch")
  subprocess.run(["bash", "-n", path], check=True)
  text = open(path).read()
  assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
  assert 'srun --kill-on-bad-exit=1 --label "$PYTHON" -m famjax.train "$@"' in text
