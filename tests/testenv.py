"""The environment of the test processes and of the processes the tests start (training runs, launchers,
evaluation CLIs): CPU, the suite's compilation cache, and XLA:CPU's fast-compile settings.

Compiling dominates the suite: hundreds of small programs (a 2-layer model's gradient is ~9000 lines of
HLO), each compiled once, most run a few times on a few dozen tokens. XLA:CPU's LLVM optimisation level 0
and its elemental fusion emitters compile such a program about 6x faster (CPU time, measured on the
tests' FAM gradient: 15.9 s -> 2.5 s). They change neither the HLO nor its buffers: memory_analysis() of
the memory tests' programs is the same to within a few hundred bytes, and the compiled HLO text (what
tests/test_model.py reads) comes from the same passes. They change how fast the machine code runs, which
no test measures (speed belongs to benchmarks/, which run with the default flags). FAMJAX_TEST_XLA=default
runs the suite with XLA's defaults instead.
"""

from __future__ import annotations

import os

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test process: this process's, plus the fast-compile flags (unless
  FAMJAX_TEST_XLA=default), with `devices` simulated CPU devices when given (else the count it has)."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  if devices is not None:
    flags = [f for f in flags if not f.startswith(DEVICE_COUNT_FLAG)] + [f"{DEVICE_COUNT_FLAG}={devices}"]
  if os.environ.get("FAMJAX_TEST_XLA") != "default":
    flags += [f for f in FAST_COMPILE_FLAGS if f not in flags]
  return " ".join(flags)


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
  """os.environ for a process a test starts: CPU, unbuffered, quiet TensorFlow, `devices` CPU devices
  (whatever this process has), the suite's compile settings and cache (inherited), then `extra`."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
          "XLA_FLAGS": xla_flags(devices), **extra}
