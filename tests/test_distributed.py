"""famjax.parallel.distributed: settings, jax's cluster detection, the roll call, config agreement.

The roll call runs here with one thread per simulated process on 127.0.0.1; the multi-process runs through
launch/local.py are in test_launch.py.
"""

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time

import ml_collections
import pytest

from famjax.parallel import distributed as dist
from famjax.parallel.distributed import (CoordinatorError, ProcessIdError, ProcessSpec, describe_disagreement,
                                         flatten_config, spec_from_settings)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# --- settings -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("address,expected", [
    ("127.0.0.1:1234", ("127.0.0.1", 1234)),
    ("node-0.cluster:8482", ("node-0.cluster", 8482)),
    ("[::1]:5000", ("::1", 5000)),
])
def test_parse_address(address, expected):
  assert dist.parse_address(address) == expected


@pytest.mark.parametrize("address", [None, "", "host", "host:", ":80", "host:0", "host:70000", "host:http"])
def test_parse_address_rejects(address):
  with pytest.raises(ValueError, match="host:port"):
    dist.parse_address(address)


@pytest.mark.parametrize("n,i,match", [(2, 2, r"outside \[0, 2\)"), (2, -1, "outside"), (0, 0, "positive"),
                                       (2, True, "integer")])
def test_process_id_out_of_range(n, i, match):
  with pytest.raises(ProcessIdError, match=match):
    dist.validate_process(n, i)


ENV = {"FAMJAX_COORDINATOR": "127.0.0.1:5000", "FAMJAX_NUM_PROCESSES": "4", "FAMJAX_PROCESS_ID": "2"}


def test_nothing_set_means_no_spec():
  assert spec_from_settings(env={}) is None


def test_spec_from_environment_and_arguments():
  assert spec_from_settings(env=ENV) == ProcessSpec("127.0.0.1:5000", 4, 2, "environment")
  assert spec_from_settings(process_id=3, env=ENV) == ProcessSpec("127.0.0.1:5000", 4, 3, "environment")
  assert spec_from_settings("h:1", 2, 1, env=ENV) == ProcessSpec("h:1", 2, 1, "arguments")


def test_one_process_needs_no_coordinator():
  assert spec_from_settings(env={"FAMJAX_NUM_PROCESSES": "1"}) == dist.SINGLE_PROCESS


def test_incomplete_settings_name_what_is_missing():
  with pytest.raises(ValueError, match="FAMJAX_PROCESS_ID not set"):
    spec_from_settings(env={"FAMJAX_COORDINATOR": "h:1", "FAMJAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="FAMJAX_NUM_PROCESSES must be an integer, got 'two'"):
    spec_from_settings(env={**ENV, "FAMJAX_NUM_PROCESSES": "two"})
  with pytest.raises(ProcessIdError, match=r"process id 4 is outside \[0, 4\)"):
    spec_from_settings(env={**ENV, "FAMJAX_PROCESS_ID": "4"})


def test_slurm_is_detected_by_jax(monkeypatch):
  for name in (*ENV, "JAX_COORDINATOR_PORT", "OMPI_MCA_orte_hnp_uri"):
    monkeypatch.delenv(name, raising=False)
  slurm = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[007-010],big1", "SLURM_NTASKS": "32",
           "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
  for name, value in slurm.items():
    monkeypatch.setenv(name, value)
  cluster = dist.detect_cluster()
  assert cluster is not None and cluster.name == "slurm"
  # Coordinator: first node of the step, port 61440 + job id % 4096.
  assert dist.spec_from_cluster(cluster, 5) == ProcessSpec("gpu007:62674", 32, 9, "cluster:slurm")


def test_single_process_does_nothing(monkeypatch):
  for name in [*ENV, "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"]:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(dist, "_spec", None)
  assert dist.detect_cluster() is None
  assert dist.initialize() == dist.SINGLE_PROCESS
  import jax
  assert not jax.distributed.is_initialized()


# --- the roll call --------------------------------------------------------------------------------------

def roll_call(specs, timeout_s=10.0, stagger_s=0.0):
  """Runs dist.roll_call for each spec in its own thread; returns {index: None or the exception}. A
  thread still running well after its timeout (a roll call that hangs) fails the test."""
  results = {}

  def one(index, spec):
    try:
      dist.roll_call(spec, timeout_s)
      results[index] = None
    except Exception as e:  # noqa: BLE001 - collected for the test to inspect
      results[index] = e

  threads = []
  for index, spec in enumerate(specs):
    threads.append(threading.Thread(target=one, args=(index, spec), daemon=True))
    threads[-1].start()
    time.sleep(stagger_s)
  for t in threads:
    t.join(timeout_s + 30)
  hung = [i for i, t in enumerate(threads) if t.is_alive()]
  assert not hung, f"roll calls {hung} still running {timeout_s + 30:g} s after a {timeout_s:g} s timeout"
  return results


class InThread:
  """roll_call(...) in a background thread; .result() joins it and returns roll_call's result."""

  def __init__(self, *args):
    self.value = None
    self.thread = threading.Thread(target=lambda: setattr(self, "value", roll_call(*args)), daemon=True)
    self.thread.start()

  def result(self):
    self.thread.join(60)
    assert not self.thread.is_alive(), "the roll call did not end"
    return self.value


def specs(ids, n=None, port=None):
  port = port or free_port()
  return [ProcessSpec(f"127.0.0.1:{port}", n or len(ids), i, "test") for i in ids]


def test_roll_call_succeeds_whatever_the_start_order():
  assert roll_call(specs([2, 1, 0]), stagger_s=0.3) == {0: None, 1: None, 2: None}


def test_duplicate_id_is_named_on_every_process():
  results = roll_call(specs([0, 1, 1]))
  assert all(isinstance(e, ProcessIdError) for e in results.values()), results
  assert "two processes claim process id 1" in str(results[0])
  assert "two processes claim process id 1" in str(results[2])


def test_second_process_zero_on_one_machine_cannot_take_the_port():
  port = free_port()
  server = InThread(specs([0], n=2, port=port), 1.5)  # process 0 of a real job, waiting for process 1
  time.sleep(0.3)
  with pytest.raises(CoordinatorError, match="also started as process 0"):
    dist.roll_call(ProcessSpec(f"127.0.0.1:{port}", 2, 0, "test"), 3.0)
  (error,) = server.result().values()  # the real process 0 still waits for process 1, and says so
  assert isinstance(error, ProcessIdError) and "missing process ids: [1]" in str(error), error


def test_process_zero_on_the_wrong_host_says_so():
  """Every host started as process 0: each waits alone, and is told it is not on the coordinator host."""
  port = free_port()  # 192.0.2.1 is TEST-NET-1 (RFC 5737): never an address of this machine
  with pytest.raises(ProcessIdError, match="missing process ids: \\[1\\].*'192.0.2.1' is not an address of "
                                           "this machine"):
    dist.roll_call(ProcessSpec(f"192.0.2.1:{port}", 2, 0, "test"), 0.5)


def test_stray_connections_are_ignored_by_process_zero():
  port = free_port()
  server = InThread(specs([0, 1], port=port), 5.0, 0.3)
  time.sleep(0.1)  # process 0 listens, process 1 has not joined yet
  with socket.create_connection(("127.0.0.1", port)) as stray:
    stray.sendall(b"GET / HTTP/1.0\r\n\r\n")
  assert server.result() == {0: None, 1: None}  # the stray broke neither process's roll call


def test_another_program_on_the_coordinator_port():
  with socket.create_server(("127.0.0.1", 0)) as other:
    other.settimeout(5)
    closer = threading.Thread(target=lambda: other.accept()[0].close())
    closer.start()
    with pytest.raises(CoordinatorError, match="closed the connection without an answer"):
      dist.roll_call(ProcessSpec(f"127.0.0.1:{other.getsockname()[1]}", 2, 1, "test"), 5.0)
    closer.join()


def test_disagreeing_process_counts():
  port = free_port()
  results = roll_call([ProcessSpec(f"127.0.0.1:{port}", 2, 0, "t"), ProcessSpec(f"127.0.0.1:{port}", 3, 1, "t")])
  assert "started with 3 processes, process 0 with 2" in str(results[0])
  assert isinstance(results[1], ProcessIdError)


class FakeClock:
  """time.monotonic and time.sleep for famjax.parallel.distributed: sleeping advances the clock at once,
  so a wait of the roll call's timeout takes no real time and the deadline logic is what is tested."""

  def __init__(self):
    self.now, self.slept = 1000.0, 0.0

  def monotonic(self):
    return self.now

  def sleep(self, seconds):
    self.now += seconds
    self.slept += seconds


def test_missing_process_is_named_within_the_timeout():
  start = time.monotonic()
  results = roll_call(specs([0, 1], n=3), timeout_s=1.0)  # (a roll call still running fails roll_call)
  assert time.monotonic() - start >= 1.0  # it waited for the missing process
  assert "2 of 3 processes have joined" in str(results[0]) and "missing process ids: [2]" in str(results[0])
  assert "missing process ids: [2]" in str(results[1])


def test_unreachable_coordinator_fails_at_its_timeout(monkeypatch):
  """Nobody listens: the joining process retries until its deadline, then names the coordinator."""
  clock = FakeClock()
  monkeypatch.setattr(dist, "time", clock)
  spec = ProcessSpec(f"127.0.0.1:{free_port()}", 2, 1, "test")
  with pytest.raises(CoordinatorError, match="could not reach the coordinator at 127.0.0.1:.* within 7 s"):
    dist.roll_call(spec, timeout_s=7.0)
  assert 7.0 <= clock.slept <= 7.0 + dist._RETRY_S  # retried until the deadline, not past it


@pytest.mark.slow
def test_initialize_reports_unreachable_coordinator_in_a_fresh_process():
  """The whole path a user hits: a new process, initialize(), nobody listening; no jax abort, no hang
  (the subprocess's timeout is the hang detector)."""
  code = ("import time; from famjax.parallel import distributed as d; t = time.monotonic()\n"
          "try: d.initialize(timeout_s=2)\n"
          "except d.CoordinatorError as e: print(f'failed after {time.monotonic() - t:.1f} s:', e)\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "FAMJAX_COORDINATOR": f"127.0.0.1:{free_port()}",
         "FAMJAX_NUM_PROCESSES": "2", "FAMJAX_PROCESS_ID": "1"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "could not reach the coordinator" in out.stdout and "within 2 s" in out.stdout
  assert float(out.stdout.split()[2]) >= 2.0, out.stdout  # it retried for its whole timeout


# --- config agreement ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Train:
  lr: float = 1e-3
  steps: int = 10


def test_flatten_config_is_canonical():
  nested = {"model": {"layers": 2, "heads": 4}, "train": Train(), "tags": ["a", "b"], "empty": {}}
  flat = flatten_config(nested)
  assert flat == {"model.layers": "2", "model.heads": "4", "train.lr": "0.001", "train.steps": "10",
                  "tags": '["a", "b"]', "empty": "{}"}
  reordered = {"train": {"steps": 10, "lr": 1e-3}, "tags": ["a", "b"], "empty": {},
               "model": {"heads": 4, "layers": 2}}
  assert dist.config_fingerprint(reordered) == dist.config_fingerprint(nested)
  assert dist.config_fingerprint(ml_collections.ConfigDict(reordered)) == dist.config_fingerprint(nested)


def test_describe_disagreement():
  a = flatten_config({"model": {"layers": 2}, "seed": 1})
  b = flatten_config({"model": {"layers": 3}, "seed": 1, "extra": True})
  assert describe_disagreement([a, a, a]) is None
  message = describe_disagreement([a, b, a])
  assert "processes [0, 2]: config" in message
  assert "processes [1]: config" in message
  assert "extra = true (process 0: <absent>)" in message and "model.layers = 3 (process 0: 2)" in message


def test_check_same_config_on_one_process_returns_the_fingerprint():
  assert dist.check_same_config({"a": 1}) == dist.config_fingerprint({"a": 1})


def test_gather_json_on_one_process_is_a_list_of_one():
  # (two processes: tests/test_multihost_restore.py reads both data positions from a checkpoint)
  assert dist.gather_json({"index": 3, "shape": (1, 2)}) == [{"index": 3, "shape": [1, 2]}]
