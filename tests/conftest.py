import atexit
import os
import shutil
import sys
import tempfile

# The tests run on CPU; several simulated devices let sharding tests share the same process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

# Row stores that training runs in the tests build (famjax.data.store) go to a temporary directory of
# this session (subprocesses inherit it), not to ~/.cache/famjax/stores.
if "FAMJAX_DATA_STORES" not in os.environ:
  os.environ["FAMJAX_DATA_STORES"] = tempfile.mkdtemp(prefix="famjax_test_stores_")
  atexit.register(shutil.rmtree, os.environ["FAMJAX_DATA_STORES"], True)
