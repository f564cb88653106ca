"""Imports TensorFlow for famjax.data: quietly, on the CPU only, with TFDS kept off the network.

Why each step:
- TensorFlow's C++ runtime prints banners (oneDNN, CUDA stubs) to the process's stderr *before* absl
  logging is configured, so TF_CPP_MIN_LOG_LEVEL alone cannot silence them; the import runs with file
  descriptor 2 pointed at /dev/null (set FAMJAX_TF_VERBOSE=1 to see them).
- The input pipeline is CPU work. A TensorFlow that sees the accelerator would reserve its memory under
  the JAX training step, so every GPU is hidden from TensorFlow.
- TFDS must read prepared data or fail at once: never reach out to GCS (an offline machine would wait on
  retries for minutes). famjax.data always passes download=False / try_gcs=False as well.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # 2: warnings and errors from C++ are dropped too


def _import_quietly():
  if os.environ.get("FAMJAX_TF_VERBOSE") == "1":
    import tensorflow  # pylint: disable=import-outside-toplevel
    _hide_accelerators(tensorflow)
    return tensorflow
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow  # pylint: disable=import-outside-toplevel
    _hide_accelerators(tensorflow)  # also quietly: probing devices prints CUDA errors
    return tensorflow
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _hide_accelerators(tensorflow) -> None:
  try:
    tensorflow.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # TensorFlow already ran ops: its devices are fixed
    pass


tf = _import_quietly()

import tensorflow_datasets as tfds  # noqa: E402  (after TensorFlow, which it imports)
from tensorflow_datasets.core.utils import gcs_utils as _gcs_utils  # noqa: E402

_gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access

__all__ = ["tf", "tfds"]
