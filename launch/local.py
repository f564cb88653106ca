#!/usr/bin/env python3
"""Run N copies of a command on this machine as one multi-process JAX job on CPU devices.

  python launch/local.py --num_processes 2 --devices_per_process 2 -- python -m famjax.train --config ...

Copy i gets FAMJAX_COORDINATOR=127.0.0.1:PORT, FAMJAX_NUM_PROCESSES=N, FAMJAX_PROCESS_ID=i (read by
famjax.parallel.distributed.initialize), JAX_PLATFORMS=cpu and XLA_FLAGS with K host devices. Each output line
is prefixed "[pI] ". The first copy to fail stops the others (SIGTERM to its process group, SIGKILL after
--grace_s) and its exit code becomes the launcher's; SIGINT and SIGTERM sent to the launcher are forwarded.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, process_id: int, num_processes: int, port: int, devices: int) -> dict:
  xla_flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
  return {**base,
          "FAMJAX_COORDINATOR": f"127.0.0.1:{port}",
          "FAMJAX_NUM_PROCESSES": str(num_processes),
          "FAMJAX_PROCESS_ID": str(process_id),
          "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": " ".join([*xla_flags, f"{DEVICE_COUNT_FLAG}={devices}"]),
          "PYTHONUNBUFFERED": "1"}


def exit_code(returncode: int) -> int:
  """A shell's exit code for a child's returncode (killed by signal N -> 128 + N)."""
  return 128 - returncode if returncode < 0 else returncode


def _say(message: str) -> None:
  print(f"[launch] {message}", file=sys.stderr, flush=True)


def _pump(prefix: bytes, stream, lock: threading.Lock) -> None:
  for line in iter(stream.readline, b""):
    with lock:
      sys.stdout.buffer.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
      sys.stdout.buffer.flush()


def _signal_all(procs, sig) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass


def _stop_all(procs, grace_s: float) -> None:
  _signal_all(procs, signal.SIGTERM)
  deadline = time.monotonic() + grace_s
  while time.monotonic() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.05)
  _signal_all(procs, signal.SIGKILL)
  for p in procs:
    p.wait()


def run(command: list[str], num_processes: int, devices_per_process: int = 1, port: int | None = None,
        grace_s: float = 5.0) -> int:
  """Runs the processes to the end; returns the launcher's exit code."""
  port = port or free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  received = []  # signals sent to the launcher

  def forward(sig, _frame):
    received.append(sig)
    _signal_all(procs, sig)

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
  _say(f"{num_processes} processes x {devices_per_process} CPU devices, coordinator 127.0.0.1:{port}")
  try:
    for i in range(num_processes):
      # A session of its own per process: a stop reaches what it started too, and Ctrl-C reaches it
      # only through the launcher, once.
      p = subprocess.Popen(command, env=process_env(dict(os.environ), i, num_processes, port,
                                                    devices_per_process),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
      procs.append(p)
      pumps.append(threading.Thread(target=_pump, args=(f"[p{i}] ".encode(), p.stdout, lock), daemon=True))
      pumps[-1].start()
    code = 0
    while True:
      if received:
        _say(f"got {signal.Signals(received[0]).name}; stopping the processes")
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
          time.sleep(0.05)
        _stop_all(procs, 0)
        code = 128 + received[0]
        break
      failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
      if failed is not None:
        code = exit_code(procs[failed].returncode)
        if any(p.poll() is None for p in procs):
          _say(f"process {failed} exited with code {code}; stopping the others")
        _stop_all(procs, grace_s)
        break
      if all(p.poll() == 0 for p in procs):
        break
      time.sleep(0.05)
  finally:
    if any(p.poll() is None for p in procs):  # an exception in the launcher itself
      _stop_all(procs, 0)
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  for t in pumps:
    t.join(timeout=2.0)
  return code


def main(argv: list[str]) -> int:
  if "--" not in argv:
    print("usage: launch/local.py --num_processes N [--devices_per_process K] [--port P] -- COMMAND ...",
          file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--grace_s", type=float, default=5.0, help="SIGTERM to SIGKILL delay when stopping")
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command or args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("need a COMMAND after --, and positive --num_processes / --devices_per_process")
  return run(command, args.num_processes, args.devices_per_process, args.port, args.grace_s)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
