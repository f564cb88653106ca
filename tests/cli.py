"""famjax's absl command lines (famjax.eval, famjax.generate, famjax.sweep) run in the test's own process:
the module's `main` on argv parsed by absl's global FLAGS, as `python -m MODULE` runs it, without a
process start and the imports of TensorFlow and JAX (seconds each). One test per CLI still runs it as a
real subprocess.

  result = run_main("famjax.eval", ["--model=x=DIR", "--passkey_lengths=2k"])
  result.returncode, result.stdout, result.stderr     # as subprocess.run(..., capture_output=True) gives

These modules define their flags in absl's global FLAGS when imported, and their names overlap
(--workdir, --attention, ...): `module(name)` imports one after removing the flags of the others this
process imported, so a single `pytest tests/` process runs every file.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import subprocess
import sys

from absl import flags

CLI_MODULES = ("famjax.eval", "famjax.generate", "famjax.sweep")


def module(name: str):
  """The CLI module `name`, its flags (and no other CLI module's) defined in absl's FLAGS."""
  for other in CLI_MODULES:
    if other != name and other in sys.modules:
      for flag in list(flags.FLAGS.flags_by_module_dict().get(other, [])):  # (deleting edits the dict)
        if flag.name in flags.FLAGS:
          delattr(flags.FLAGS, flag.name)
      del sys.modules[other]
  return importlib.import_module(name)


def run_main(name: str, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess:
  """`main` of the CLI module `name` on `argv` (the arguments after the program name), reading `stdin`:
  its exit status and output."""
  cli = module(name)
  out, err = io.StringIO(), io.StringIO()
  flags.FLAGS.unparse_flags()  # every flag back to its default, as in a fresh process
  saved_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        cli.main(flags.FLAGS([name, *argv]))
        code = 0
      except SystemExit as e:
        if isinstance(e.code, str):  # sys.exit("message"): the message on stderr, status 1
          print(e.code, file=sys.stderr)
        code = 1 if isinstance(e.code, str) else e.code or 0
  finally:
    sys.stdin = saved_stdin
    flags.FLAGS.unparse_flags()
  return subprocess.CompletedProcess([name, *argv], code, out.getvalue(), err.getvalue())
