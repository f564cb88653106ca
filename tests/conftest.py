import os
import sys

# The tests run on CPU; several simulated devices let sharding tests share the same process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py
