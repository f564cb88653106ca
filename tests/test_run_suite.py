"""The suite's own machinery: tests/run_suite.py (every file runs whatever the others did, one closing
line counts the whole suite, a crash or a hang fails one file and names the test) and the persistent
compilation cache the test processes share (what tests read from a compiled program, memory_analysis and
the HLO text, is the same when the program comes from the cache)."""

import re
import textwrap

import jax
import jax.numpy as jnp
import pytest

import run_suite

FILES = {  # name: (source, passed, failed, skipped) as the runner must count them
    "test_a_fails.py": ("""
        def test_passes():
          assert True

        def test_fails():
          assert 1 == 2, "broken on purpose"
        """, 1, 1, 0),
    "test_b_crashes.py": ("""
        import os

        def test_passes():
          assert True

        def test_crashes():
          os.abort()

        def test_never_runs():
          assert True
        """, 1, 1, 0),
    "test_c_hangs.py": ("""
        import time
        import pytest

        @pytest.mark.timeout(2)
        def test_hangs():
          time.sleep(600)

        def test_passes_after_it():
          assert True
        """, 1, 1, 0),
    "test_d_passes.py": ("""
        import pytest

        def test_one():
          assert True

        @pytest.mark.skip(reason="on purpose")
        def test_skipped():
          pass

        @pytest.mark.slow
        def test_slow():
          assert True
        """, 2, 0, 1),
    "test_e_never_ends.py": ("""
        import time
        import pytest

        @pytest.mark.timeout(0)
        def test_past_the_file_timeout():
          time.sleep(600)
        """, 0, 1, 0),
}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
  directory = tmp_path_factory.mktemp("suite")
  (directory / "pytest.ini").write_text("[pytest]\nmarkers =\n  slow: slow\naddopts = --strict-markers\n")
  for name, (source, *_) in FILES.items():
    (directory / name).write_text(textwrap.dedent(source))
  return directory


@pytest.mark.slow
def test_every_file_runs_and_the_last_line_counts_the_suite(suite, capsys):
  files = [str(suite / name) for name in FILES]
  code = run_suite.main([*files, "--jobs=2", "--file_timeout=10", "--slowest=3"])
  out = capsys.readouterr().out
  lines = out.strip().splitlines()
  assert code == 1
  passed, failed, skipped = (sum(counts[i] for _, *counts in FILES.values()) for i in range(3))
  assert lines[-1].startswith(f"{passed} passed, {failed} failed, {skipped} skipped in "), lines[-1]
  for name in FILES:  # each file reported on its own line, whatever happened to the others
    assert sum(f"{name} " in line and line.startswith("[") for line in lines) == 1, (name, out)
  assert "broken on purpose" in out  # a failing file's failures are printed
  assert "crashed (SIGABRT) in " in out and "test_b_crashes.py::test_crashes" in out
  assert "Timeout" in out and "test_c_hangs.py::test_hangs" in out
  assert "killed after" in out and "test_e_never_ends.py::test_past_the_file_timeout" in out
  assert "slowest 3 tests:" in out and "per file (s): " in out


def test_the_fast_tier_leaves_out_slow_tests(suite, capsys):
  """-m "not slow"; a file marked slow as a whole is not even started."""
  whole = suite / "slow_file" / "test_all_slow.py"
  whole.parent.mkdir()
  whole.write_text("import pytest\n\npytestmark = pytest.mark.slow\n\n\ndef test_slow():\n  assert False\n")
  assert run_suite.main([str(suite / "test_d_passes.py"), str(whole), "--fast"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1].startswith("1 passed, 0 failed, 1 skipped in ") and out[-1].endswith("(1 files)"), out
  assert run_suite.main([str(whole)]) == 1  # (which the full suite runs)


def test_longest_first_and_unknown_files_before_all():
  assert run_suite.order(["a", "b", "c", "new"], {"a": 5.0, "b": 50.0, "c": 1.0}) == ["new", "b", "a", "c"]


def test_a_program_from_the_persistent_cache_answers_what_tests_read(tmp_path):
  """Compiled, then read back from a fresh cache directory: the same memory_analysis() and HLO (the
  text without its source-location metadata, which a deserialised program does not keep)."""
  from jax._src import compilation_cache, monitoring
  hits = []
  monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                     if event == "/jax/compilation_cache/cache_hits" else None)
  previous = {name: getattr(jax.config, name) for name in ("jax_compilation_cache_dir",
                                                           "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()

  def compiled():
    # a scan of remat'd bfloat16 layers, the structure of the programs tests/test_model.py reads
    def loss(w, x):
      layer = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w).astype(jnp.bfloat16), None))
      return jax.lax.scan(layer, x, w)[0].astype(jnp.float32).sum()
    w, x = jnp.ones((4, 64, 64), jnp.bfloat16), jnp.ones((8, 64), jnp.bfloat16)
    return jax.jit(jax.grad(loss)).lower(w, x).compile()

  def instructions(text):  # the HLO instructions, without their metadata (source locations)
    return [line.split(", metadata=")[0].strip() for line in text.splitlines()
            if re.match(r"\s*(ROOT )?%\S+ = ", line)]

  try:
    fresh = compiled()
    assert not hits and list(tmp_path.iterdir())  # compiled, and written to the cache
    jax.clear_caches()
    cached = compiled()
    assert hits, "the second compile did not come from the cache"
    for name in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"):
      assert getattr(cached.memory_analysis(), name) == getattr(fresh.memory_analysis(), name), name
    assert instructions(cached.as_text()) == instructions(fresh.as_text()) and instructions(fresh.as_text())
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
