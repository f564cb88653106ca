"""A pytest plugin of tests/run_suite.py (`-p tests.suite_report`): one JSON line per test, written as
the test starts and as it ends, to the file named by FAMJAX_TEST_REPORT. The runner reads them to count
the tests of a file whose process crashed or was killed, and to name the test that was running. The
variable is removed from the environment, so the processes the tests start do not inherit it."""

import json
import os
import time

_REPORT = os.environ.pop("FAMJAX_TEST_REPORT", None)
_phases: dict = {}


def _write(record):
  if _REPORT:
    with open(_REPORT, "a") as f:
      f.write(json.dumps(record) + "\n")


def pytest_runtest_logstart(nodeid, location):
  del location
  _write({"event": "start", "nodeid": nodeid, "time": time.time()})


def pytest_runtest_logreport(report):
  seen = _phases.setdefault(report.nodeid, {"seconds": 0.0, "outcomes": []})
  seen["seconds"] += report.duration
  seen["outcomes"].append(report.outcome)
  if report.when == "teardown":
    outcome = "failed" if "failed" in seen["outcomes"] else "skipped" if "skipped" in seen["outcomes"] \
        else "passed"
    _write({"event": "end", "nodeid": report.nodeid, "outcome": outcome,
            "seconds": round(seen["seconds"], 3)})


def pytest_collectreport(report):
  if report.failed:
    _write({"event": "end", "nodeid": report.nodeid or "(collection)", "outcome": "failed", "seconds": 0.0})
