"""Resuming a run on another topology: a checkpoint written by 2 processes x 2 CPU devices restores on
1 process x 4 devices with another mesh and continues, and the other way round.

One run, three topologies, every one a real `python -m famjax.train` (through launch/local.py for two
processes), on the same workdir:

  steps 1-3  2 processes x 2 devices, mesh fsdp=2 x tensor=2     -> checkpoint 3
  steps 4-5  1 process  x 4 devices, mesh data=2 x fsdp=2        -> restores 3, checkpoint 5
  steps 6-7  2 processes x 2 devices, mesh fsdp=2 x tensor=2     -> restores 5, checkpoint 7

and a reference that runs the 7 steps uninterrupted on 1 process x 4 devices. (The third run's programs
are the first run's, and the reference's the second's: a compilation cache shared by the runs keeps the
test short.) Every logged loss of the
resumed run must match the reference's: that needs the parameters, the optimizer state, the RNG, the RSP
state and the data position all restored exactly onto the new shardings (the loss of a step is computed
from the restored state). The schedule is constant so that raising `steps` does not change it.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from famjax.parallel import MeshConfig
from famjax.training import loop
from famjax.training.config import incompatible_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--config=configs/demo.py", "--config.data.mixture=synthetic", "--config.model.d_model=32",
        "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
        "--config.model.mlp_dim=64", "--config.model.block_size=8", "--config.model.fam_len=2",
        "--config.seq_len=32", "--config.batch_size=4", "--config.tensorboard=False",
        "--config.fam.rsp_prob=0.8", "--config.fam.rpo=True", "--config.optimizer.schedule=constant",
        "--config.optimizer.warmup_steps=0", "--config.log_every=1"]


def env(cache_dir, devices=None):
  e = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
       "JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  e.pop("XLA_FLAGS", None)
  if devices:
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return e


def train(workdir, cache_dir, steps, mesh, processes=1, devices=4):
  """Runs famjax.train to `steps` on `processes` x `devices` CPU devices; returns its output."""
  start, where = time.monotonic(), f"{processes} x {devices} devices, mesh {mesh}, to step {steps}"
  command = [sys.executable, "-m", "famjax.train", *TINY, f"--workdir={workdir}", f"--config.steps={steps}",
             f"--config.checkpoint_every={steps}",
             *(f"--config.mesh.{axis}={size}" for axis, size in mesh.items())]
  if processes > 1:
    command = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes", str(processes),
               "--devices_per_process", str(devices), "--", *command]
    devices = None  # the launcher sets them
  returncode, text = run_once(command, env(cache_dir, devices), where)
  if returncode != 0 and processes > 1 and "CoordinationService" in text:
    # Seen once in 6 full-suite runs on 2 loaded cores: jax's coordination service failed a barrier
    # (outside famjax). The run resumes from its last checkpoint, as a user would rerun it.
    print(f"{where}: coordination-service failure, rerunning once\n{text[-1500:]}")
    returncode, text = run_once(command, env(cache_dir, devices), where)
  assert returncode == 0, f"{where}\n{text[-6000:]}"
  print(f"{where}: {time.monotonic() - start:.1f} s")
  return text


def run_once(command, environment, where):
  proc = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    text = proc.communicate(timeout=300)[0]
  except subprocess.TimeoutExpired:
    proc.terminate()  # launch/local.py passes SIGTERM on to its processes
    text = proc.communicate(timeout=30)[0]
    pytest.fail(f"{where}: timed out after 300 s\n{text[-6000:]}")
  return proc.returncode, text


def logged(workdir):
  return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def data_item(workdir, step):
  return json.loads((workdir / "checkpoints" / str(step) / "data" / "metadata").read_text())


def test_each_process_resumes_from_its_own_data_position(monkeypatch):
  # Orbax writes a checkpoint's JSON items from process 0 only: the loop gathers every process's position
  saved = {"process_positions": [{"process_index": 0, "batches": 5}, {"process_index": 1, "batches": 5}]}
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert loop.own_position(saved) == {"process_index": 1, "batches": 5}
  monkeypatch.setattr(jax, "process_count", lambda: 4)  # another layout: process 0's, for the source to judge
  assert loop.own_position(saved) == {"process_index": 0, "batches": 5}
  assert loop.own_position({"index": 3}) == {"index": 3}  # a checkpoint from before the gathering
  assert loop.own_position(None) is None


def test_the_mesh_may_change_when_a_run_resumes():
  saved = {"steps": 3, "seed": 0, "mesh": MeshConfig().as_dict()}
  moved = {"steps": 5, "seed": 0, "mesh": MeshConfig(data=1, fsdp=-1, tensor=2, dcn_data=2).as_dict()}
  assert incompatible_fields(saved, moved) == []
  assert incompatible_fields(saved, {**moved, "seed": 1}) == ["seed (0 -> 1)"]


def test_a_run_resumes_across_process_counts_and_meshes(tmp_path):
  work, ref, cache = tmp_path / "run", tmp_path / "reference", tmp_path / "jax_cache"
  fsdp2_tensor2 = {"data": 1, "fsdp": 2, "tensor": 2}
  data2_fsdp2 = {"data": 2, "fsdp": 2, "tensor": 1}

  out = train(work, cache, 3, fsdp2_tensor2, processes=2, devices=2)
  assert "[p0] compiling the train step (fam, 4 device(s), mesh {'data': 1, 'fsdp': 2, 'tensor': 2})" in out
  assert checkpoint_steps(work) == [3]
  assert data_item(work, 3) == {"process_positions": [{"index": 3}, {"index": 3}]}  # both processes'

  out = train(work, cache, 5, data2_fsdp2)  # 2 x 2 -> 1 x 4
  assert f"resumed from checkpoint 3 in {work / 'checkpoints'}" in out, out[-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out
  assert checkpoint_steps(work) == [3, 5]

  out = train(work, cache, 7, fsdp2_tensor2, processes=2, devices=2)  # 1 x 4 -> 2 x 2
  for p in (0, 1):
    assert f"[p{p}] resumed from checkpoint 5 in {work / 'checkpoints'}" in out, out[-3000:]
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in out
  assert checkpoint_steps(work) == [3, 5, 7]
  assert not (work / "checkpoints_corrupt").exists()
  assert json.loads((work / "config.json").read_text())["mesh"]["tensor"] == 2  # the latest mesh

  train(ref, cache, 7, data2_fsdp2)  # uninterrupted (its step program is the second run's: from the cache)
  resumed, reference = logged(work), logged(ref)
  assert sorted(resumed) == list(range(1, 8))  # one history: 1-3, then 4-5, then 6-7
  np.testing.assert_allclose([resumed[s] for s in range(1, 8)], [reference[s] for s in range(1, 8)],
                             rtol=2e-5)
  # and the final parameters, read back onto this process's single device
  final = load_params(work)
  expected = load_params(ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), final, expected)


def load_params(workdir):
  """(the merged parameters of the newest checkpoint, as numpy), restored on a one-device mesh."""
  from famjax.training.config import job_config
  from famjax.training.export import restore_params
  raw = json.loads((workdir / "config.json").read_text())
  job = job_config(raw)
  job = dataclasses.replace(job, mesh=MeshConfig())  # this process's device(s)
  step, params = restore_params(job, workdir)
  assert step == 7
  return jax.tree.map(np.asarray, params)
