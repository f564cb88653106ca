"""The test suite's runner (`make test`, `make test-fast`, `.ci/run`): one pytest process per test file.

Why one process per file: a process that had loaded TensorFlow's data pipelines and then compiled hundreds
of XLA programs segfaulted once inside XLA's compiler (tests/test_model.py, which passes on its own).
Separate processes keep the files independent, and a crash or a hang costs one file, not the run.

What it does:
  - runs the files `--jobs` at a time (2: this machine's cores; XLA compiles on one thread), the longest
    first (the times of tests/durations.json; a file not listed there starts first);
  - runs every file whatever the others did, and ends with one line for the whole suite,
    `N passed, N failed, N skipped in S s`; the exit status is 1 when anything failed, crashed or hung;
  - a test that hangs fails alone (pytest-timeout, `timeout` in pyproject.toml); a file that still runs
    past `--file_timeout` is killed and counted as a failure, naming the test it was in;
  - prints each file's time and the slowest tests, and the output of every file that failed;
  - `--fast`: the fast tier, -m "not slow" (a file marked slow as a whole is not started at all);
  - shares a JAX persistent compilation cache in .cache/jax (git-ignored; tests/conftest.py sets it for
    plain `pytest` runs and for the processes the tests start).

Results per test come from the plugin tests/suite_report.py, which appends one JSON line per test to the
file named by FAMJAX_TEST_REPORT as each test starts and ends (so a file that crashes still reports the
tests it ran, and names the one it was in).

  python tests/run_suite.py                  # the whole suite (make test)
  python tests/run_suite.py --fast           # -m "not slow" (make test-fast)
  python tests/run_suite.py tests/test_model.py tests/test_streaming.py -- -k gate
  python tests/run_suite.py --record         # also rewrites tests/durations.json from this run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
DURATIONS = TESTS / "durations.json"
CACHE = ROOT / ".cache" / "jax"
WHOLE_FILE_SLOW = re.compile(r"^pytestmark\s*=.*\bslow\b", re.M)


@dataclasses.dataclass
class FileResult:
  path: str
  seconds: float
  returncode: int
  tests: list[dict]  # {"nodeid", "outcome", "seconds"}
  log: Path
  problem: str = ""  # a crash, a kill, a collection error: what the records alone do not say

  def count(self, outcome: str) -> int:
    return sum(t["outcome"] == outcome for t in self.tests)

  @property
  def failed(self) -> int:
    return self.count("failed") + (1 if self.problem else 0)


def expected_seconds() -> dict[str, float]:
  try:
    return {k: float(v) for k, v in json.loads(DURATIONS.read_text()).items()}
  except FileNotFoundError:
    return {}


def order(files: list[str], known: dict[str, float]) -> list[str]:
  """Longest first; files without a recorded time before all others (they may be slow)."""
  return sorted(files, key=lambda f: (f in known, -known.get(f, 0.0), f))


def read_records(path: Path) -> tuple[list[dict], str | None]:
  """The finished tests of a report file, and the test that started without finishing (if any)."""
  tests, started = {}, None
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a crash
      if record["event"] == "start":
        started = record["nodeid"]
      else:
        tests[record["nodeid"]] = record
        if started == record["nodeid"]:
          started = None
  return list(tests.values()), started


def environment() -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
  env["PYTHONUNBUFFERED"] = "1"
  return env


class Running:
  def __init__(self, path: str, pytest_args: list[str], workdir: Path, file_timeout: float):
    name = Path(path).stem
    self.path, self.deadline = path, time.monotonic() + file_timeout
    self.log, self.report = workdir / f"{name}.log", workdir / f"{name}.jsonl"
    env = {**environment(), "FAMJAX_TEST_REPORT": str(self.report)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.suite_report", path,
               *pytest_args]
    self.start = time.monotonic()
    self.out = open(self.log, "w")
    # A session of its own: a kill reaches the processes the tests started too.
    self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    self.killed = False

  def poll(self) -> FileResult | None:
    if self.proc.poll() is None:
      if time.monotonic() < self.deadline:
        return None
      self.kill()
    self.out.close()
    tests, unfinished = read_records(self.report)
    rc = self.proc.returncode
    problem = ""
    if self.killed:
      problem = f"killed after {time.monotonic() - self.start:.0f} s (--file_timeout)"
    elif rc < 0:
      problem = f"crashed ({signal.Signals(-rc).name})"
    elif rc not in (0, 1, 5) or (rc == 1 and not any(t["outcome"] == "failed" for t in tests)):
      problem = f"pytest exited with code {rc}"
    if problem and unfinished:
      problem += f" in {unfinished}"
    return FileResult(self.path, time.monotonic() - self.start, rc, tests, self.log, problem)

  def kill(self):
    self.killed = True
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self.proc.wait()


def failure_text(result: FileResult, max_lines: int = 400) -> str:
  """The failures section of a file's pytest output (its whole tail when there is none)."""
  lines = result.log.read_text(errors="replace").splitlines()
  start = next((i for i, line in enumerate(lines) if line.startswith("=") and
                (" FAILURES " in line or " ERRORS " in line)), max(0, len(lines) - 80))
  shown = lines[start:]
  if len(shown) > max_lines:
    shown = shown[:max_lines // 2] + [f"... ({len(shown) - max_lines} lines cut; all in {result.log})"] + \
        shown[-max_lines // 2:]
  return "\n".join(shown)


def summary_line(results: list[FileResult], seconds: float) -> str:
  passed = sum(r.count("passed") for r in results)
  failed = sum(r.failed for r in results)
  skipped = sum(r.count("skipped") for r in results)
  line = f"{passed} passed, {failed} failed"
  if skipped:
    line += f", {skipped} skipped"
  return f"{line} in {seconds:.0f} s ({len(results)} files)"


def run(files: list[str], jobs: int, pytest_args: list[str], file_timeout: float, workdir: Path,
        say=print) -> list[FileResult]:
  queue = order(files, expected_seconds())
  running: list[Running] = []
  results: list[FileResult] = []
  total = len(queue)
  while queue or running:
    while queue and len(running) < jobs:
      running.append(Running(queue.pop(0), pytest_args, workdir, file_timeout))
    time.sleep(0.2)
    for job in list(running):
      result = job.poll()
      if result is None:
        continue
      running.remove(job)
      results.append(result)
      counts = f"{result.count('passed')} passed"
      if result.failed:
        counts += f", {result.failed} FAILED"
      if result.count("skipped"):
        counts += f", {result.count('skipped')} skipped"
      say(f"[{len(results):2d}/{total}] {result.path:<40} {counts:<28} {result.seconds:7.1f} s"
          + (f"  {result.problem}" if result.problem else ""))
      if result.failed:
        say(failure_text(result))
  return results


def report(results: list[FileResult], seconds: float, slowest: int, say=print) -> None:
  say("\nper file (s): " + ", ".join(f"{Path(r.path).stem} {r.seconds:.0f}"
                                     for r in sorted(results, key=lambda r: -r.seconds)))
  tests = sorted((t for r in results for t in r.tests), key=lambda t: -t["seconds"])
  if tests and slowest:
    say(f"slowest {min(slowest, len(tests))} tests:")
    for t in tests[:slowest]:
      say(f"  {t['seconds']:7.1f} s  {t['nodeid']}")
  failed = [f"{r.path}: {r.problem}" for r in results if r.problem]
  failed += [t["nodeid"] for r in results for t in r.tests if t["outcome"] == "failed"]
  if failed:
    say("failed:\n" + "\n".join(f"  {f}" for f in failed))
  say(summary_line(results, seconds))


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("files", nargs="*", help="test files (default: tests/test_*.py)")
  parser.add_argument("--jobs", type=int, default=int(os.environ.get("FAMJAX_TEST_JOBS", 2)))
  parser.add_argument("--fast", action="store_true", help='the fast tier: -m "not slow"')
  parser.add_argument("--file_timeout", type=float, default=1200.0, help="seconds before a file is killed")
  parser.add_argument("--slowest", type=int, default=15, help="how many of the slowest tests to print")
  parser.add_argument("--record", action="store_true", help="write this run's file times to durations.json")
  args = parser.parse_args(argv[:split])
  pytest_args = argv[split + 1:]
  if args.fast:
    pytest_args = ["-m", "not slow", *pytest_args]
  files = args.files or sorted(str(p.relative_to(ROOT)) for p in TESTS.glob("test_*.py"))
  files = [os.path.relpath(f, ROOT) if Path(f).resolve().is_relative_to(ROOT) else f for f in files]
  if args.fast:  # a file marked slow as a whole (`pytestmark = pytest.mark.slow`) costs no process
    files = [f for f in files if not WHOLE_FILE_SLOW.search(Path(f).read_text())]
  CACHE.mkdir(parents=True, exist_ok=True)
  start = time.monotonic()
  print(f"{len(files)} test files, {args.jobs} at a time{' (fast tier)' if args.fast else ''}; "
        f"compilation cache {environment()['JAX_COMPILATION_CACHE_DIR']}", flush=True)
  with tempfile.TemporaryDirectory(prefix="famjax_tests_") as workdir:
    results = run(files, args.jobs, pytest_args, args.file_timeout, Path(workdir),
                  say=lambda s: print(s, flush=True))
    seconds = time.monotonic() - start
    report(results, seconds, args.slowest)
  if args.record:
    known = expected_seconds()
    known.update({r.path: round(r.seconds, 1) for r in results})
    DURATIONS.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
  return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
