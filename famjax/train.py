"""famjax's training job: fine-tune a FAM, BSWA or full-attention model on a seqio mixture.

  python -m famjax.train --config=configs/demo.py[:variant] --workdir=DIR [--config.key=value ...]
  python -m famjax.train --config=... --workdir=DIR --mode=eval     # loss on the validation split
  python -m famjax.train --config=... --workdir=DIR --mode=export   # merged weights as an HF dir

Rerunning the same command resumes from the newest good checkpoint in DIR. configs/base.py documents
every field. This module is the edge: it turns the ml-collections config into validated objects, wires
the data pipeline (famjax.data, or the synthetic stream) into famjax.training, and turns user errors into
one line on stderr and a non-zero exit, before anything compiles.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys
import types
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from famjax.parallel import MESH_AXES, distributed, slice_count
from famjax.train_data import TrainData
from famjax.train_eval import passkey_eval, passkey_lengths
from famjax.training import evaluate, export, init_from, loop
from famjax.training.config import (ConfigError, DataSection, check_evaluation, check_platform, job_config,
                                    train_config)
from famjax.workdir import layout


def _config_package_on_path(argv) -> None:
  """Config files import siblings as `from configs import base`: put the folder holding configs/ on
  sys.path (the current directory is there already under `python -m`)."""
  for arg in argv:
    if arg.startswith("--config="):
      path = Path(arg.split("=", 1)[1].split(":", 1)[0]).absolute()
      sys.path.insert(0, str(path.parent.parent))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv: list[str] | None = None
                 ) -> types.SimpleNamespace:
  """famjax.train's flags, defined on `flag_values`: the global FLAGS when the job runs (`run()`), a
  FlagValues of their own when famjax.sweep checks a point's command line or a test runs `main`
  (`argv`: the command line that will be parsed, where ml_collections finds the --config.* overrides;
  default sys.argv)."""
  return types.SimpleNamespace(
      config=config_flags.DEFINE_config_file("config", None, "training config file[:variant]",
                                             lock_config=True, flag_values=flag_values, sys_argv=argv),
      workdir=flags.DEFINE_string("workdir", None, "where checkpoints, metrics and events go",
                                  flag_values=flag_values),
      restart=flags.DEFINE_bool("restart", False, "start over in a workdir that holds a run of another "
                                "config (the old run is moved to WORKDIR/previous_<time>/)",
                                flag_values=flag_values),
      mode=flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "what to do with the workdir",
                             flag_values=flag_values),
      eval_batches=flags.DEFINE_integer("eval_batches", 20, "--mode=eval: batches of the validation split",
                                        flag_values=flag_values))


_FLAGS = None  # define_flags() of the running job (run())


def _fail(message: str) -> None:
  print(f"famjax.train: error: {message}", file=sys.stderr)
  sys.exit(2)


def parse_argv(argv, flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's parser, with flag errors (unknown config key or flag, wrong type, bad config file) raised as
  ConfigError, one line naming the flag."""
  _config_package_on_path(argv)
  try:
    rest = flag_values(argv)
    if flag_values["config"].value is not None:
      flag_values["config"].value.keys()  # a config file that failed to load raises here
    return rest
  except (KeyError, AttributeError) as e:  # ml_collections: overriding a key the config does not have
    lines = _unquoted(str(e.args[0] if e.args else e)).splitlines() or [""]
    key = _unquoted(lines[0])
    arg = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.") and
                key in a.split("=", 1)[0].split(".")), f"--config...{key}")
    hint = next((f" ({line[0].lower()}{line[1:]})" for line in lines[1:] if line.startswith("Did you mean")), "")
    raise ConfigError(f"{arg[2:]}: unknown field{hint} (configs/base.py lists every field)") from None
  except (flags.Error, OSError, TypeError, ValueError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A config file that raised: its traceback is in the message; its last line says what went wrong.
    raise ConfigError(lines[-1] if any(line.startswith("Traceback") for line in lines)
                      else " ".join(lines[:3])) from None


def _unquoted(text: str) -> str:
  """A KeyError's message without the quotes (and escapes) of its repr, however often it was quoted."""
  while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = ast.literal_eval(text)
    except (SyntaxError, ValueError):
      break
  return text.strip()


def parse_flags(argv, flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """parse_argv for app.run: a flag error is one line on stderr and exit status 2."""
  try:
    return parse_argv(argv, flag_values)
  except ConfigError as e:
    _fail(str(e))


# -- the job -----------------------------------------------------------------------------------------

def build(config):
  """(JobConfig, TrainData) validated, or ConfigError naming the field. Each piece is built once, in
  the order they need each other: the run, the data (its vocabulary), then the rest of the job."""
  raw = config.to_dict()
  if not isinstance(raw.get("data", {}), dict):
    raise ConfigError(f"config.data: must be a section (a ConfigDict), got {raw['data']!r}")
  train = train_config(raw)
  check_evaluation(train)
  data = TrainData(DataSection.from_dict(raw.get("data", {})), train)
  job = job_config(raw, vocab_size=data.vocab_size, train=train, data=data.section)
  if job.train.init_from:
    source_model = init_from.source_model_config(job.train.init_from, job.model)
    if source_model.vocab_size < data.vocab_size:
      raise ConfigError(f"config.init_from: the checkpoint's vocabulary ({source_model.vocab_size}) is "
                        f"smaller than the data's ({data.vocab_size})")
    job = dataclasses.replace(job, model=source_model)
  check_platform(job.model, jax.default_backend())
  try:
    sizes = dict(zip(MESH_AXES, job.mesh.resolve(jax.device_count(), slice_count(jax.devices()))))
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  batch_ways = sizes["data"] * sizes["fsdp"]
  if job.train.batch_size % batch_ways or job.train.batch_size % jax.process_count():
    raise ConfigError(f"config.batch_size={job.train.batch_size} must be divisible by mesh data*fsdp="
                      f"{batch_ways} and by the {jax.process_count()} host(s)")
  k, per_host = job.train.microbatches, job.train.batch_size // jax.process_count()
  if per_host % k or (job.train.batch_size // k) % batch_ways:
    raise ConfigError(f"config.microbatches={k} must divide the per-host batch ({per_host}) and leave "
                      f"microbatches of {job.train.batch_size} / {k} rows divisible by mesh data*fsdp="
                      f"{batch_ways}")
  if job.train.evaluates and job.train.eval_passkey_lengths:
    passkey_lengths(job, data)  # checked now, before anything compiles
  return job, data


def outputs_message(workdir: Path, argv_config: str) -> str:
  ckpts = layout.steps(workdir)
  cmd = f"python -m famjax.train --config={argv_config} --workdir={workdir}"
  return "\n".join([
      f"outputs in {workdir}/:",
      f"  checkpoints/        steps {ckpts}",
      "  metrics.jsonl       one record per logged step",
      f"  tensorboard/        tensorboard --logdir {workdir / 'tensorboard'}",
      f"resume or train further:  {cmd} --config.steps=<more>",
      f"evaluate:                 {cmd} --mode=eval",
      f"export (LoRA merged):     {cmd} --mode=export   (a Hugging Face dir in {workdir / 'hf'})",
  ])


def main(argv, f: types.SimpleNamespace | None = None) -> None:
  """The job, on parsed flags `f` (define_flags'; default: the running job's)."""
  f = f or _FLAGS
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  if f.config.value is None or not f.workdir.value:
    _fail("--config and --workdir are required")
  workdir = Path(f.workdir.value).absolute()
  try:
    distributed.initialize()  # joins a multi-process job (launch/); nothing for a single process
    job, data = build(f.config.value)
    distributed.check_same_config(f.config.value)
    if f.mode.value == "eval":
      result = evaluate.evaluate(job, workdir, lambda: data.batches(None, "validation", 1),
                                 f.eval_batches.value)
      print(evaluate.report(result))
      distributed.shutdown()
      return
    if f.mode.value == "export":
      print(f"wrote {export.export_hf(job, workdir, workdir / 'hf')}")
      distributed.shutdown()
      return
    if job.model.attention != "fam" and job.fam.rsp_prob > 0:
      print(f"note: fam.rsp_prob={job.fam.rsp_prob} has no effect with attention={job.model.attention}")
    evaluates = job.train.evaluates
    result = loop.run(job, workdir, data.batches, restart=f.restart.value,
                      make_eval_batches=data.eval_batches if evaluates and job.train.eval_steps else None,
                      passkey_eval=passkey_eval(job, data) if evaluates and job.train.eval_passkey_lengths
                      else None)
  except (ConfigError, distributed.DistributedSetupError) as e:
    _fail(str(e))
  if result.message:
    print(result.message)
  config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "?")
  print(outputs_message(workdir, config_arg))
  distributed.shutdown()  # every process leaves together (a NaN stops them all at the same step)
  if result.status == "nan":
    sys.exit(1)


def run() -> None:
  global _FLAGS  # pylint: disable=global-statement
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  _FLAGS = define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
