"""Joining a multi-process JAX job: one call, `initialize()`, that either does nothing or fails clearly.

Who this process is comes from, first match wins:
  1. the arguments of `initialize`,
  2. FAMJAX_COORDINATOR, FAMJAX_NUM_PROCESSES, FAMJAX_PROCESS_ID (launch/local.py sets them),
  3. the cluster JAX itself detects (jax._src.clusters in jax 0.10.2: Open MPI, SLURM, GKE TPU, a Cloud TPU VM
     slice or multislice from its metadata server, Kubernetes with the `kubernetes` package; mpi4py only on
     request, so famjax leaves it out),
and a single process with none of these does nothing.

Before `jax.distributed.initialize`, the processes hold a roll call on the coordinator port. This is not
ceremony: when the coordinator is unreachable or two processes share an id, jax 0.10.2 does not raise, it
aborts the process (a C++ CHECK, exit code 134, "DEADLINE_EXCEEDED ... RegisterTask") once its timeout has
passed. The roll call turns those cases into Python exceptions that say what is wrong, within `timeout_s`.
After start-up, `check_same_config` compares every process's config and names the ones that differ.

Owns: process discovery, the roll call, config agreement, gathering small JSON values from every process.
Imports only jax and numpy (no famjax package).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

ENV_COORDINATOR = "FAMJAX_COORDINATOR"
ENV_NUM_PROCESSES = "FAMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "FAMJAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 300  # jax's own default; pod workers can start minutes apart (installs, image pulls)
_RETRY_S = 0.25

log = logging.getLogger(__name__)


class DistributedSetupError(RuntimeError):
  """A multi-process job cannot start; the message says why and what to check."""


class CoordinatorError(DistributedSetupError):
  """The coordinator (process 0) cannot be reached, or cannot listen on its port."""


class ProcessIdError(DistributedSetupError):
  """Process ids are duplicated, out of range, missing, or the processes disagree on their number."""


class ConfigMismatchError(DistributedSetupError):
  """Processes were started with different configs."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """This process's place in the job. `source` says where it came from, for logs and errors."""

  coordinator_address: str | None
  num_processes: int
  process_id: int
  source: str

  def __post_init__(self):
    validate_process(self.num_processes, self.process_id)
    if self.num_processes > 1:
      parse_address(self.coordinator_address)

  @property
  def is_multiprocess(self) -> bool:
    return self.num_processes > 1


# --- pure helpers -------------------------------------------------------------------------------------

def parse_address(address: str | None) -> tuple[str, int]:
  """'host:port' or '[v6 address]:port' -> (host, port); ValueError naming the address otherwise."""
  if not address or ":" not in address:
    raise ValueError(f"coordinator address must be host:port, got {address!r}")
  host, _, port = address.rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"coordinator address must be host:port with a port in 1..65535, got {address!r}")
  return host, int(port)


def validate_process(num_processes: int, process_id: int) -> None:
  """ProcessIdError unless 0 <= process_id < num_processes."""
  if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
    raise ProcessIdError(f"the number of processes must be a positive integer, got {num_processes!r}")
  if isinstance(process_id, bool) or not isinstance(process_id, int):
    raise ProcessIdError(f"the process id must be an integer, got {process_id!r}")
  if not 0 <= process_id < num_processes:
    raise ProcessIdError(f"process id {process_id} is outside [0, {num_processes}): with {num_processes} "
                         f"processes the ids are 0..{num_processes - 1}")


SINGLE_PROCESS = ProcessSpec(None, 1, 0, "single process")
_spec: ProcessSpec | None = None  # set once initialize() has run


def _int_from(value, name: str) -> int | None:
  if value is None or isinstance(value, int):
    return value
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def spec_from_settings(coordinator_address: str | None = None, num_processes: int | str | None = None,
                       process_id: int | str | None = None,
                       env: Mapping[str, str] = os.environ) -> ProcessSpec | None:
  """The spec given by arguments, else by the FAMJAX_* variables; None when neither says anything.

  Each argument overrides its variable. Some but not all three set is an error, except a single process
  (num_processes=1), which needs no coordinator.
  """
  values = {
      ENV_COORDINATOR: coordinator_address if coordinator_address is not None else env.get(ENV_COORDINATOR),
      ENV_NUM_PROCESSES: _int_from(num_processes if num_processes is not None
                                   else env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES),
      ENV_PROCESS_ID: _int_from(process_id if process_id is not None else env.get(ENV_PROCESS_ID),
                                ENV_PROCESS_ID),
  }
  given = [name for name, value in values.items() if value is not None]
  if not given:
    return None
  if values[ENV_NUM_PROCESSES] == 1 and values[ENV_PROCESS_ID] in (None, 0):
    return SINGLE_PROCESS
  missing = [name for name in values if name not in given]
  if missing:
    raise ValueError(f"multi-process settings are incomplete: {', '.join(missing)} not set (nor the matching "
                     f"initialize() argument), while {', '.join(given)} "
                     f"{'is' if len(given) == 1 else 'are'} set")
  source = "arguments" if None not in (coordinator_address, num_processes, process_id) else "environment"
  return ProcessSpec(values[ENV_COORDINATOR], values[ENV_NUM_PROCESSES], values[ENV_PROCESS_ID], source)


# --- cluster detection (jax's) ------------------------------------------------------------------------

def detect_cluster():
  """The jax ClusterEnv class that recognises this machine (SLURM, TPU VM, ...), or None.

  The same search as jax.distributed.initialize() without arguments: the first non-opt-in cluster type
  whose is_env_present() is true.
  """
  from jax._src import clusters  # private, but it is exactly what jax.distributed uses
  for cluster in clusters.ClusterEnv._cluster_types:
    if not cluster.opt_in_only_method and cluster.is_env_present():
      return cluster
  return None


def spec_from_cluster(cluster, timeout_s: float) -> ProcessSpec:
  port = os.environ.get("JAX_COORDINATOR_PORT")
  address = cluster.get_coordinator_address(timeout_secs=int(timeout_s), override_coordinator_port=port)
  return ProcessSpec(address, cluster.get_process_count(), cluster.get_process_id(),
                     f"cluster:{cluster.name}")


# --- the roll call ------------------------------------------------------------------------------------
# Process 0 listens on the coordinator port; every other process connects and sends one JSON line
# {"process_id", "num_processes", "host", "pid"}. Process 0 answers each with {"ok": true} once all have
# joined, or with {"error": ...} as soon as something is wrong, then frees the port for jax's coordinator.

def _whoami(spec: ProcessSpec) -> dict:
  return {"process_id": spec.process_id, "num_processes": spec.num_processes,
          "host": socket.gethostname(), "pid": os.getpid()}


def _where(member: dict) -> str:
  return f"{member.get('host', '?')} pid {member.get('pid', '?')}"


def _is_local_host(host: str) -> bool:
  try:
    infos = socket.getaddrinfo(host, None)
  except OSError:
    return False
  for family, _, _, _, sockaddr in infos:
    try:
      with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((sockaddr[0], 0))
        return True
    except OSError:
      continue
  return False


def _send(conn: socket.socket, message: dict) -> None:
  try:
    conn.sendall(json.dumps(message).encode() + b"\n")
  except OSError:
    pass  # that process is gone; its own error is the one to read


def _listen(spec: ProcessSpec) -> socket.socket:
  _, port = parse_address(spec.coordinator_address)
  try:
    if socket.has_dualstack_ipv6():
      return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", port))
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      raise CoordinatorError(
          f"process 0 cannot listen on the coordinator port {port}: it is in use. Either another process was "
          f"also started as process 0 (every process needs its own id: check {ENV_PROCESS_ID}, SLURM_PROCID, "
          f"or the launcher), or another program holds the port (choose another: --port with "
          f"launch/local.py, or {ENV_COORDINATOR}).") from e
    raise CoordinatorError(f"process 0 cannot listen on port {port}: {e}") from e


def _allow_open_files(count: int) -> None:
  import resource
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft != resource.RLIM_INFINITY and soft < count:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count if hard == resource.RLIM_INFINITY else min(count, hard), hard))


def _check_member(spec: ProcessSpec, member: dict, members: dict) -> str | None:
  """Why `member` cannot join (given those already in), or None."""
  pid, n = member.get("process_id"), member.get("num_processes")
  if n != spec.num_processes:
    return (f"{_where(member)} was started with {n} processes, process 0 with {spec.num_processes}: every "
            f"process must be given the same number of processes")
  if not isinstance(pid, int) or not 0 < pid < spec.num_processes:  # 0 is the coordinator's own id
    return f"{_where(member)} claims process id {pid!r}; the others must be 1..{spec.num_processes - 1}"
  if pid in members:
    return (f"two processes claim process id {pid}: {_where(members[pid][1])} and {_where(member)}; "
            f"ids must be distinct, 0..{spec.num_processes - 1}")
  return None


def _host_roll_call(spec: ProcessSpec, timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  members: dict[int, tuple[socket.socket, dict]] = {}
  _allow_open_files(spec.num_processes + 256)  # one socket per process until the verdict
  server = _listen(spec)
  server.settimeout(_RETRY_S)
  try:
    while len(members) < spec.num_processes - 1:
      if time.monotonic() > deadline:
        missing = sorted(set(range(1, spec.num_processes)) - set(members))
        host, _ = parse_address(spec.coordinator_address)
        hint = ("" if _is_local_host(host) else
                f" Note: the coordinator host {host!r} is not an address of this machine ({socket.gethostname()}),"
                f" yet this process is process 0, which must run there.")
        error = (f"roll call: after {timeout_s:g} s, {len(members) + 1} of {spec.num_processes} processes "
                 f"have joined the coordinator at {spec.coordinator_address}; missing process ids: {missing}. "
                 f"Did they start, with the same coordinator address? Did they crash (read their logs)?{hint}")
        for conn, _ in members.values():
          _send(conn, {"error": error})
        raise ProcessIdError(error)
      try:
        conn, _ = server.accept()
      except TimeoutError:
        continue
      try:
        conn.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
        member = json.loads(conn.makefile("rb").readline())
      except (OSError, ValueError):
        member = None
      if not isinstance(member, dict):  # not a famjax process (a port scan, a stale job): ignore it
        conn.close()
        continue
      error = _check_member(spec, member, members)
      if error:
        for other, _ in [*members.values(), (conn, member)]:
          _send(other, {"error": error})
        raise ProcessIdError(error)
      members[member["process_id"]] = (conn, member)
    for conn, _ in members.values():
      _send(conn, {"ok": True})
  finally:
    for conn, _ in members.values():
      conn.close()
    server.close()


def _join_roll_call(spec: ProcessSpec, timeout_s: float) -> None:
  host, port = parse_address(spec.coordinator_address)
  start = time.monotonic()
  deadline = start + timeout_s
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic())))
      break
    except OSError as e:
      if time.monotonic() >= deadline:
        raise CoordinatorError(
            f"process {spec.process_id} of {spec.num_processes} could not reach the coordinator at "
            f"{spec.coordinator_address} within {timeout_s:g} s (last error: {e}). Process 0 hosts the "
            f"coordinator: is it running? Is {host!r} the address of its machine as seen from this one "
            f"(127.0.0.1 only works when all processes share a machine)? Is port {port} open between "
            f"the hosts?") from e
      time.sleep(_RETRY_S)
  with conn:
    _send(conn, _whoami(spec))
    # Process 0 has the same deadline but may have started later; give its verdict (which names the
    # missing processes) time to arrive before giving up here.
    conn.settimeout(max(1.0, deadline - time.monotonic()) + 10.0)
    try:
      line = conn.makefile("rb").readline()
    except TimeoutError:
      raise ProcessIdError(f"process {spec.process_id} joined the coordinator at {spec.coordinator_address}, but "
                           f"not all {spec.num_processes} processes joined within {timeout_s:g} s; "
                           f"process 0's log names the missing ones") from None
    except OSError:  # reset by the other side
      line = b""
  try:
    reply = json.loads(line)
  except ValueError:
    reply = None
  if not isinstance(reply, dict):
    raise CoordinatorError(f"the coordinator at {spec.coordinator_address} closed the connection without an "
                           f"answer: process 0 may have died (read its log), or something other than famjax "
                           f"process 0 listens on that port (another program, a job still running)")
  if "error" in reply:
    raise ProcessIdError(f"process {spec.process_id}: {reply['error']}")


def roll_call(spec: ProcessSpec, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
  """Returns once all spec.num_processes processes have checked in with distinct ids; raises otherwise."""
  if spec.is_multiprocess:
    (_host_roll_call if spec.process_id == 0 else _join_roll_call)(spec, timeout_s)


# --- initialize ---------------------------------------------------------------------------------------

def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProcessSpec:
  """Joins the multi-process job this process belongs to, if any; returns who this process is.

  Call it first, before anything touches jax devices. Does nothing for a single process. Raises
  DistributedSetupError (CoordinatorError, ProcessIdError) within about `timeout_s` when the job cannot
  start, instead of hanging or letting jax abort.
  """
  global _spec
  if _spec is not None and jax.distributed.is_initialized():
    return _spec
  spec = spec_from_settings(coordinator_address, num_processes, process_id)
  if spec is None:
    cluster = detect_cluster()
    spec = spec_from_cluster(cluster, timeout_s) if cluster else SINGLE_PROCESS
  if not spec.is_multiprocess:
    _spec = spec
    return spec

  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    raise DistributedSetupError("famjax.parallel.distributed.initialize() must run before anything touches jax "
                                "devices (jax.devices(), an array, a jit): call it first thing in main()")
  if jax.config.jax_cpu_collectives_implementation is None:  # gloo is the default in jax 0.10; older: None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

  log.info("process %d of %d (%s): roll call at %s, timeout %d s", spec.process_id, spec.num_processes,
           spec.source, spec.coordinator_address, timeout_s)
  start = time.monotonic()
  roll_call(spec, timeout_s)
  if spec.process_id:
    time.sleep(0.1)  # let process 0 bind jax's service first: an early client backs off for a whole second
  jax.distributed.initialize(
      spec.coordinator_address, spec.num_processes, spec.process_id,
      # Cluster-detected jobs let jax choose local devices as it would (one GPU per SLURM task); explicit
      # settings see every local device.
      cluster_detection_method=None if spec.source.startswith("cluster:") else "deactivate",
      initialization_timeout=max(10, int(timeout_s)))
  log.info("process %d of %d joined in %.1f s", spec.process_id, spec.num_processes, time.monotonic() - start)
  _spec = spec
  return spec


def shutdown() -> None:
  """Leave a multi-process job together, at the end of a run that succeeded on every process: each one
  enters jax's shutdown barrier now, before Python tears the interpreter down. Left to jax's exit hook,
  process 0 can stop the coordination service it hosts while another process is still tearing down;
  that process's background calls to the service then fail and jax aborts it ("Terminating process
  because the JAX distributed service detected fatal errors ... CoordinationService", exit 134), so a job
  that finished is reported as failed. Not after an error on one process: that one must exit at once, not
  wait in a barrier for the others. Nothing for a single process."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


# --- config agreement ---------------------------------------------------------------------------------

def _as_dict(config) -> Mapping:
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    return config.to_dict()
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    return dataclasses.asdict(config)
  return config


def flatten_config(config) -> dict[str, str]:
  """{'model.num_layers': '4', ...}: dotted keys to canonical JSON values, the unit of comparison."""
  flat = {}

  def visit(prefix: str, value):
    value = _as_dict(value)
    if isinstance(value, Mapping) and value:
      for key in value:
        visit(f"{prefix}.{key}" if prefix else str(key), value[key])
    else:
      flat[prefix] = json.dumps(value, sort_keys=True, default=repr)

  visit("", config)
  return flat


def config_fingerprint(config) -> str:
  """A short hash of the flattened config, the same on every process that has the same config."""
  return hashlib.sha256(json.dumps(flatten_config(config), sort_keys=True).encode()).hexdigest()[:12]


def describe_disagreement(configs: Sequence[dict[str, str]], max_keys: int = 5) -> str | None:
  """None if all flattened configs agree; else which processes hold which version, and how they differ."""
  groups: dict[str, list[int]] = {}
  for index, flat in enumerate(configs):
    groups.setdefault(json.dumps(flat, sort_keys=True), []).append(index)
  if len(groups) == 1:
    return None
  reference = configs[0]
  lines = ["processes disagree on the config (every process must be started with the same config file and "
           "flags):"]
  for processes in groups.values():
    flat = configs[processes[0]]
    fingerprint = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]
    line = f"  processes {processes}: config {fingerprint}"
    differing = sorted(k for k in reference.keys() | flat.keys() if reference.get(k) != flat.get(k))
    if differing:
      shown = [f"{k} = {flat.get(k, '<absent>')} (process 0: {reference.get(k, '<absent>')})"
               for k in differing[:max_keys]]
      more = f" and {len(differing) - max_keys} more" if len(differing) > max_keys else ""
      line += ", differs from process 0 at " + "; ".join(shown) + more
    lines.append(line)
  return "\n".join(lines)


def _allgather_bytes(data: bytes) -> list[bytes]:
  from jax.experimental import multihost_utils
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [rows[p, :n].tobytes() for p, n in enumerate(lengths)]


def gather_json(value) -> list:
  """Every process's `value` (anything JSON-able), in process order. Collective: every process calls it."""
  if jax.process_count() == 1:
    return [json.loads(json.dumps(value))]
  return [json.loads(b) for b in _allgather_bytes(json.dumps(value, sort_keys=True).encode())]


def check_same_config(config) -> str:
  """Raises ConfigMismatchError naming the processes whose config differs; returns the config fingerprint.

  `config`: a dict, an ml_collections.ConfigDict or a dataclass. Collective: every process must call it.
  """
  flat = flatten_config(config)
  if jax.process_count() > 1:
    gathered = [json.loads(b) for b in _allgather_bytes(json.dumps(flat, sort_keys=True).encode())]
    message = describe_disagreement(gathered)
    if message:
      raise ConfigMismatchError(f"process {jax.process_index()}: {message}")
  return config_fingerprint(config)
