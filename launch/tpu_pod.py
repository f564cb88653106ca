#!/usr/bin/env python3
"""Train on a Cloud TPU VM slice (or several: multislice) from this checkout, with gcloud.

  python launch/tpu_pod.py --name fam --zone us-east5-a --accelerator_type v5p-64 \\
      --create --ship --delete -- python -m famjax.train --config configs/base.py --workdir gs://b/run

Steps, in this order, each on request:
  --create   queue the slice (`gcloud compute tpus queued-resources create`) and wait until it is ACTIVE
  --ship     tar this checkout, copy it to every worker and install it there (pip, jax[tpu])
  -- CMD     run CMD in ~/famjax on every worker of every slice at once, streaming their output
  --delete   delete the queued resource and its slices at the end (also after a failed run: they bill)
--dry_run prints every command instead of running it. On the workers, famjax.parallel.distributed
.initialize() finds its process id and coordinator through jax's TPU detection; nothing to set.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARBALL = "/tmp/famjax.tar.gz"
REMOTE_DIR = "~/famjax"


def jax_version(repo: str = REPO) -> str:
  with open(os.path.join(repo, "requirements.txt")) as f:
    return next(line.split("==")[1].strip() for line in f if line.startswith("jax=="))


def default_install() -> str:
  return (f"python3 -m pip install -q -r requirements.txt 'jax[tpu]=={jax_version()}' && "
          "python3 -m pip install -q --no-deps -e .")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--name", required=True, help="queued resource id; the slice (node) name too")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None, help="default: gcloud's configured project")
  parser.add_argument("--accelerator_type", default="v5p-8", help="e.g. v5p-64, v5litepod-256")
  parser.add_argument("--runtime_version", default="v2-alpha-tpuv5", help="TPU VM software version")
  parser.add_argument("--num_slices", type=int, default=1,
                      help=">1: multislice, slices named NAME-0, NAME-1, ... joined over the data-center network")
  parser.add_argument("--spot", action="store_true", help="spot capacity (cheaper, can be preempted)")
  parser.add_argument("--create", action="store_true")
  parser.add_argument("--ship", action="store_true")
  parser.add_argument("--delete", action="store_true")
  parser.add_argument("--install", default=None, help="install command run in ~/famjax on every worker")
  parser.add_argument("--wait_timeout_s", type=float, default=6 * 3600, help="how long to wait for ACTIVE")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if not (args.create or args.ship or args.delete or command):
    parser.error("nothing to do: give --create, --ship, --delete and/or -- COMMAND")
  if args.num_slices < 1:
    parser.error("--num_slices must be positive")
  return args, command


# --- the commands -------------------------------------------------------------------------------------

def _where(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def node_names(args) -> list[str]:
  return [args.name] if args.num_slices == 1 else [f"{args.name}-{k}" for k in range(args.num_slices)]


def create_command(args) -> list[str]:
  nodes = ([f"--node-id={args.name}"] if args.num_slices == 1 else
           [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"])
  return ["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
          f"--accelerator-type={args.accelerator_type}", f"--runtime-version={args.runtime_version}",
          *nodes, *(["--spot"] if args.spot else []), *_where(args)]


def state_command(args) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *_where(args),
          "--format=value(state.state)"]


def tar_command() -> list[str]:
  return ["tar", "-czf", TARBALL, "--exclude=./.venv", "--exclude=./.git", "--exclude=__pycache__",
          "--exclude=./bench_results", "--exclude=*.egg-info", "-C", REPO, "."]


def ssh_command(args, node: str, remote: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, "--worker=all", *_where(args),
          f"--command={remote}"]


def ship_commands(args) -> tuple[list[str], list[list[str]], list[list[str]]]:
  """The tarball command, then per slice: copy it to every worker, unpack and install it there."""
  install = args.install or default_install()
  unpack = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && tar -xzf famjax.tar.gz -C {REMOTE_DIR} && "
            f"cd {REMOTE_DIR} && {install}")
  copies = [["gcloud", "compute", "tpus", "tpu-vm", "scp", TARBALL, f"{node}:famjax.tar.gz", "--worker=all",
             *_where(args)] for node in node_names(args)]
  return tar_command(), copies, [ssh_command(args, node, unpack) for node in node_names(args)]


def run_commands(args, command: list[str]) -> list[list[str]]:
  return [ssh_command(args, node, f"cd {REMOTE_DIR} && {shlex.join(command)}") for node in node_names(args)]


def delete_command(args) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, "--force", "--quiet",
          *_where(args)]


# --- running them -------------------------------------------------------------------------------------

def run_parallel(commands: list[list[str]]) -> int:
  """Starts all commands (one per slice), waits; the first failure stops the rest. Returns its code."""
  procs = [subprocess.Popen(c) for c in commands]
  while True:
    codes = [p.poll() for p in procs]
    failed = next((c for c in codes if c not in (None, 0)), None)
    if failed is not None or None not in codes:
      for p in procs:
        if p.poll() is None:
          p.terminate()
      for p in procs:
        p.wait()
      return failed or 0
    time.sleep(1)


def wait_active(args) -> None:
  deadline = time.monotonic() + args.wait_timeout_s
  while True:
    state = subprocess.run(state_command(args), capture_output=True, text=True, check=True).stdout.strip()
    print(f"[tpu_pod] {args.name}: {state}", flush=True)
    if state == "ACTIVE":
      return
    if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
      raise SystemExit(f"queued resource {args.name} is {state}; see `{shlex.join(state_command(args)[:-1])}`")
    if time.monotonic() > deadline:
      raise SystemExit(f"queued resource {args.name} not ACTIVE after {args.wait_timeout_s:.0f} s (still {state})")
    time.sleep(30)


def stages(args, command: list[str]) -> list[tuple[str, list[list[str]]]]:
  """(step, commands run at once) in order; 'wait' polls its one command until the slice is ACTIVE."""
  steps = []
  if args.create:
    steps += [("create", [create_command(args)]), ("wait", [state_command(args)])]
  if args.ship:
    tar, copies, installs = ship_commands(args)
    steps += [("tar", [tar]), ("copy", copies), ("install", installs)]
  if command:
    steps.append(("run", run_commands(args, command)))
  return steps


def main(argv: list[str]) -> int:
  args, command = parse_args(argv)
  steps = stages(args, command) + ([("delete", [delete_command(args)])] if args.delete else [])
  if args.dry_run:
    for _, commands in steps:
      for c in commands:
        print(shlex.join(c))
    return 0
  if args.delete:
    steps.pop()
  code = 0
  try:
    for step, commands in steps:
      print(f"[tpu_pod] {step}", flush=True)
      if step == "wait":
        wait_active(args)
      elif (code := run_parallel(commands)) != 0:
        print(f"[tpu_pod] {step} failed with exit code {code}", file=sys.stderr, flush=True)
        break
  finally:
    if args.delete:
      print("[tpu_pod] delete", flush=True)
      subprocess.run(delete_command(args), check=True)
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
