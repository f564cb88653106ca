"""Resuming a run on another topology: a real `famjax_demo` run (seqio tasks tokenized once, a packing
plan, rows read by index) written by 2 processes x 2 CPU devices restores on 1 process x 4 devices and
on 4 processes x 1 device, and continues exactly as a run that was never interrupted.

Every run is a real `python -m famjax.train` (through launch/local.py for several processes):

  steps 1-5  2 processes x 2 devices, mesh fsdp=2 x tensor=2   -> checkpoints 3 and 5: the uninterrupted
             reference; its workdir copied twice without checkpoint 5 (two futures from step 3)
  steps 4-5  1 process  x 4 devices, mesh data=2 x fsdp=2      -> restores 3
  steps 4-5  4 processes x 1 device, mesh fsdp=4               -> restores 3 (the other copy)

Every logged loss of both resumed runs, and their final parameters, must match the reference's: that
needs the parameters, the optimizer state, the RNG, the RSP state and the data position all restored
exactly onto the new shardings and process layouts. The data position is one global row count
(famjax.data.global_batches), so the 4 processes of the last run read, from the 2-process run's
checkpoint, exactly the rows the other layouts read. The first run tokenizes the mixture and plans the
20 rows it reads (into the test's FAMJAX_DATA_STORES) while its second process waits; the others find
them. The schedule is constant, as in a run that stops at step 3 and is resumed with more steps.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from famjax.parallel import MeshConfig
from famjax.training import loop
from famjax.training.config import incompatible_fields
from testenv import subprocess_env

pytestmark = pytest.mark.slow  # training runs and restores in subprocesses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--config=configs/demo.py", "--config.data.mixture=famjax_demo", "--config.model.d_model=32",
        "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
        "--config.model.mlp_dim=64", "--config.model.block_size=8", "--config.model.fam_len=2",
        "--config.seq_len=64", "--config.data.repeat_segment_len=4", "--config.batch_size=4",
        "--config.tensorboard=False", "--config.fam.rsp_prob=0.8", "--config.fam.rpo=True",
        "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0", "--config.log_every=1"]


def env(stores, devices=None):
  """The runs' environment: tests/testenv.py's (CPU, the suite's compile settings and compilation cache,
  inherited), `devices` CPU devices (launch/local.py sets its processes' own), this test's data stores."""
  return subprocess_env(devices or 1, FAMJAX_DATA_STORES=str(stores))


def train(workdir, stores, steps, mesh, processes=1, devices=4, checkpoint_every=None):
  """Runs famjax.train to `steps` on `processes` x `devices` CPU devices; returns its output."""
  start, where = time.monotonic(), f"{processes} x {devices} devices, mesh {mesh}, to step {steps}"
  command = [sys.executable, "-m", "famjax.train", *TINY, f"--workdir={workdir}", f"--config.steps={steps}",
             f"--config.checkpoint_every={checkpoint_every or steps}",
             *(f"--config.mesh.{axis}={size}" for axis, size in mesh.items())]
  if processes > 1:
    command = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes", str(processes),
               "--devices_per_process", str(devices), "--", *command]
    devices = None  # the launcher sets them
  # No rerun on failure: the jax coordination-service failures once seen here (a process aborted at exit
  # after process 0 had stopped the service) are what famjax.train's distributed.shutdown() prevents.
  returncode, text = run_once(command, env(stores, devices), where)
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


def test_a_real_run_resumes_on_any_process_count_and_mesh(tmp_path):
  ref, stores = tmp_path / "reference", tmp_path / "stores"
  fsdp2_tensor2 = {"data": 1, "fsdp": 2, "tensor": 2}
  data2_fsdp2 = {"data": 2, "fsdp": 2, "tensor": 1}
  fsdp4 = {"data": 1, "fsdp": 4, "tensor": 1}

  out = train(ref, stores, 5, fsdp2_tensor2, processes=2, devices=2, checkpoint_every=3)
  assert "[p0] compiling the train step (fam, 4 device(s), mesh {'data': 1, 'fsdp': 2, 'tensor': 2})" in out
  assert out.count("famjax.data: tokenizing") == 1  # the mixture's examples, tokenized once
  assert out.count("packing plan ready: 20 rows of 64 tokens") == 1  # the rows it reads, planned once
  assert checkpoint_steps(ref) == [3, 5]
  positions = data_item(ref, 3)["process_positions"]
  assert len(positions) == 2 and positions[0] == positions[1]  # one global position
  assert positions[0]["rows"] == 3 * 4 and positions[0]["version"] == 3
  work, other = tmp_path / "run_on_1_process", tmp_path / "run_on_4_processes"
  for copy in (work, other):  # the run as it was when it stopped after step 3
    shutil.copytree(ref, copy)
    shutil.rmtree(copy / "checkpoints" / "5")

  out = train(work, stores, 5, data2_fsdp2)  # 2 x 2 -> 1 x 4
  assert f"resumed from checkpoint 3 in {work / 'checkpoints'}" in out, out[-3000:]
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out
  assert "packing plan" not in out and "tokenizing" not in out  # the 20-row plan of the same examples
  assert checkpoint_steps(work) == [3, 5]

  out = train(other, stores, 5, fsdp4, processes=4, devices=1)  # 2 x 2 -> 4 x 1
  for p in range(4):
    assert f"[p{p}] resumed from checkpoint 3 in {other / 'checkpoints'}" in out, out[-3000:]
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1}" in out
  assert "packing plan" not in out and "tokenizing" not in out
  assert checkpoint_steps(other) == [3, 5]
  for run in (ref, work, other):
    assert not (run / "checkpoints_corrupt").exists()
  assert data_item(other, 5)["process_positions"] == [data_item(work, 5)["process_positions"][0]] * 4
  assert data_item(ref, 5)["process_positions"] == [data_item(work, 5)["process_positions"][0]] * 2

  reference = logged(ref)
  for resumed in (logged(work), logged(other)):
    assert sorted(resumed) == list(range(1, 6))  # one history: 1-3, then 4-5
    np.testing.assert_allclose([resumed[s] for s in range(1, 6)], [reference[s] for s in range(1, 6)],
                               rtol=2e-5)
  # and the final parameters, read back onto this process's single device (AdamW's normalised update
  # turns last-bit differences of another reduction order, e.g. fsdp=4, into ~lr * 1e-2 on a weight
  # whose gradient is near zero: seen 2.2e-5 on 1 of 2048 weights)
  expected = load_params(ref)
  for resumed in (work, other):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-4), load_params(resumed),
                 expected)


def load_params(workdir):
  """(the merged parameters of the newest checkpoint, as numpy), restored on a one-device mesh."""
  from famjax.training.config import job_config
  from famjax.training.export import restore_params
  raw = json.loads((workdir / "config.json").read_text())
  job = job_config(raw)
  job = dataclasses.replace(job, mesh=MeshConfig())  # this process's device(s)
  step, params = restore_params(job, workdir)
  assert step == 5
  return jax.tree.map(np.asarray, params)
