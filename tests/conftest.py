import atexit
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py, tests/testenv.py
import testenv  # noqa: E402

# The tests run on CPU; several simulated devices let sharding tests share the same process. XLA:CPU's
# fast-compile settings (tests/testenv.py says why and what they change), for this process and, through
# the environment, the processes the tests start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = testenv.xla_flags()
# One persistent compilation cache for the whole suite, inside the checkout (git-ignored): the test
# processes and the processes they start (training runs, launchers) read and fill it. Set before jax is
# imported, so jax reads it from the environment like every child process does. Every program is kept:
# the suite's programs are small, and the same ones recur across files and subprocesses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Row stores that training runs in the tests build (famjax.data.store) go to a temporary directory of
# this session (subprocesses inherit it), not to ~/.cache/famjax/stores.
if "FAMJAX_DATA_STORES" not in os.environ:
  os.environ["FAMJAX_DATA_STORES"] = tempfile.mkdtemp(prefix="famjax_test_stores_")
  atexit.register(shutil.rmtree, os.environ["FAMJAX_DATA_STORES"], True)
