"""The training loop: build or restore the state, compile the step for the mesh, run, log, checkpoint.

  run(job, workdir, make_batches) -> RunResult

`make_batches(position)` returns the per-host batch iterator (famjax.data's, or the synthetic one) that
continues from `position` (None: the start); it must offer `.state()`. The loop never imports
famjax.data: train.py wires the data in.

Evaluation during training (train.eval_every > 0): `make_eval_batches()` gives a fresh iterator of
held-out batches each time (the same ones every time), read with the step's forward
(Trainer.eval_sums: no second model in memory); `passkey_eval(params)` (the edge's PassKey check on the
streaming path) gets the merged parameters. Neither touches the training batches or the state's RNG,
so a run logs the same training losses with evaluation on or off. Their metrics (eval_loss,
eval_accuracy, eval_passkey_<length>, eval_seconds) join that step's record in metrics.jsonl and
TensorBoard, and their time is not counted in the step time.

Determinism: the step is a pure function of (state, batch) and the state holds the RNG, so a run resumed
from step N reaches the same per-step losses as an uninterrupted one (tested with SIGKILL). The next
batch is read while the device computes the current step; the data position saved with checkpoint N is
the one after batch N, for every process (each reads its own part of the data).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import jax

from famjax.parallel import distributed
from famjax.training import evaluate as evaluate_lib
from famjax.training import flops as flops_lib
from famjax.training import init_from, metrics as metrics_lib
from famjax.training.config import ConfigError, JobConfig, incompatible_fields
from famjax.training.memory import StepDoesNotFit
from famjax.training.state import TrainState
from famjax.training.trainer import Trainer
from famjax.workdir import WorkdirError, layout
from famjax.workdir.checkpoint import Checkpointer

@dataclasses.dataclass
class RunResult:
  status: str  # "done" | "preempted" (SIGTERM) | "nan"
  step: int  # steps done
  last_checkpoint: int | None
  message: str = ""


@contextlib.contextmanager
def _sigterm_flag():
  """Sets flag["stop"] on SIGTERM (the preemption notice of TPU VMs) instead of dying."""
  flag = {"stop": False}

  def handler(signum, frame):
    del signum, frame
    flag["stop"] = True

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: no handler
    yield flag
    return
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


def _restore_or_init(trainer: Trainer, ckpt: Checkpointer, say) -> tuple[int, TrainState, dict | None]:
  """(step, state, data position): the newest good checkpoint, else step 0 (init_from or random)."""
  restored = ckpt.restore_latest(trainer.abstract_state)
  if restored is not None:
    step, state, data_position, _ = restored
    say(f"resumed from checkpoint {step} in {ckpt.directory}")
    return step, state, data_position
  params = None
  if trainer.job.train.init_from:
    params = init_from.load_params(trainer.job.train.init_from, trainer.job.model)
    say(f"initialised the parameters from {trainer.job.train.init_from}")
  return 0, trainer.initial_state(params), None


def saved_positions(position: dict) -> dict:
  """What a checkpoint's `data` item holds: every process's data position (collective). Orbax writes the
  item from process 0 only, and on several hosts each one reads its own part of the data."""
  return {"process_positions": distributed.gather_json(position)}


def own_position(saved: dict | None) -> dict | None:
  """This process's data position from a checkpoint's `data` item. After a change in the number of
  processes it is process 0's: the data source decides whether it can continue from it (the synthetic
  stream and famjax.data's planned rows can: their position is global; famjax.data's per-host stream
  refuses another process layout)."""
  if not saved or "process_positions" not in saved:
    return saved  # a checkpoint written before positions were gathered (one process's)
  positions = saved["process_positions"]
  return positions[jax.process_index()] if len(positions) == jax.process_count() else positions[0]


def _nan_result(ckpt: Checkpointer, done: int, metrics: dict) -> RunResult:
  ckpt.wait()
  good = ckpt.steps()
  last = ckpt.directory / str(good[-1]) if good else "none"
  return RunResult("nan", done - 1, good[-1] if good else None,
                   f"loss is {metrics['loss']} (grad norm {metrics['grad_norm']}) at step {done}; "
                   f"stopped without saving. Last good checkpoint: {last}")


def evaluate_state(trainer: Trainer, state: TrainState, make_eval_batches, passkey_eval) -> dict:
  """Evaluation metrics of `state` (see the module docstring); {} when there is nothing to evaluate."""
  out = {}
  if make_eval_batches is not None:
    total, n = evaluate_lib.run_batches(lambda b: trainer.eval_sums(state, trainer.global_batch(b)),
                                        make_eval_batches(), trainer.job.train.eval_steps)
    result = evaluate_lib.summary(total, n, 0)
    out.update(eval_loss=result["loss"], eval_accuracy=result["accuracy"])
  if passkey_eval is not None:
    out.update(passkey_eval(trainer.params(state)))
  return out


def run(job: JobConfig, workdir, make_batches: Callable[[dict | None], Iterator], *, restart: bool = False,
        say: Callable[[str], None] = print, async_checkpoints: bool = True,
        make_eval_batches: Callable[[], Iterator] | None = None,
        passkey_eval: Callable[[dict], dict] | None = None) -> RunResult:
  """Train `job` in `workdir`, resuming from its latest good checkpoint."""
  workdir = Path(workdir)
  primary = jax.process_index() == 0
  try:
    note = layout.prepare(workdir, job.to_dict(), restart, incompatible_fields, write=primary)
  except WorkdirError as e:
    raise ConfigError(str(e)) from None
  if note:
    say(note)
  cfg, train = job.model, job.train
  trainer = Trainer(job)
  ckpt = Checkpointer(workdir / layout.CHECKPOINTS, train.keep_checkpoints, async_save=async_checkpoints)
  start, state, data_position = _restore_or_init(trainer, ckpt, say)
  if primary:
    metrics_lib.truncate_history(workdir / layout.METRICS, start)
  last_checkpoint = start if start else None
  if start >= train.steps:
    ckpt.close()
    return RunResult("done", start, last_checkpoint, f"already trained for {start} steps")

  say(f"compiling the train step ({job.model.attention}, {jax.device_count()} device(s), mesh "
      f"{dict(trainer.mesh.shape)}) ...")
  try:
    say(f"compiled in {trainer.compile():.1f} s")
  except StepDoesNotFit as e:  # the command it names reads this run's config.json
    ckpt.close()
    raise ConfigError(e.describe(str(workdir / layout.CONFIG))) from None
  memory = trainer.memory_summary()
  if memory:
    say(memory)
  peak = flops_lib.Peak(trainer.mesh.devices.flatten())
  step_flops = flops_lib.train_flops_per_step(cfg, train.batch_size, train.seq_len)
  say(f"model FLOPs/step {step_flops:.3g}; MFU against {peak.value / 1e9:.1f} GFLOP/s ({peak.source})")
  logger = metrics_lib.MetricsLogger(workdir, train.steps, tensorboard=train.tensorboard, files=primary)
  tokens_per_step = train.batch_size * train.seq_len
  evaluates = train.evaluates and (make_eval_batches is not None or passkey_eval is not None)
  profile = train.profile_range
  batches = make_batches(own_position(data_position))
  result, tracing = None, False
  try:
    with _sigterm_flag() as stop:
      batch = trainer.global_batch(next(batches))
      t_prev, avg_time, recent_losses = time.perf_counter(), None, []
      for step in range(start, train.steps):
        if profile and step + 1 == profile[0]:
          jax.profiler.start_trace(str(workdir / layout.TENSORBOARD))
          tracing = True
        state, metrics = trainer.step(state, batch)
        position = copy.deepcopy(batches.state())  # after this step's batch: saved with its checkpoint
        batch = trainer.global_batch(next(batches)) if step + 1 < train.steps else None
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        done = step + 1
        now = time.perf_counter()
        step_time, t_prev = now - t_prev, now
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
          result = _nan_result(ckpt, done, metrics)
          break
        if tracing and done == profile[1]:
          jax.profiler.stop_trace()
          tracing = False
          logger.message(f"profile of steps {profile[0]}-{profile[1]} in {workdir / layout.TENSORBOARD}")
        avg_time = step_time if avg_time is None else 0.9 * avg_time + 0.1 * step_time
        recent_losses.append(metrics["loss"])
        metrics.update(step_time=step_time, tokens_per_second=tokens_per_step / step_time,
                       mfu=flops_lib.mfu(step_flops, step_time, peak.value),
                       loss_avg=sum(recent_losses) / len(recent_losses))
        eta = avg_time * (train.steps - done)
        evaluated = evaluates and done % train.eval_every == 0
        if evaluated:
          metrics.update(evaluate_state(trainer, state, make_eval_batches, passkey_eval))
          t_prev = time.perf_counter()  # the evaluation's time is not the next step's
          metrics["eval_seconds"] = t_prev - now
        if evaluated or done % train.log_every == 0 or done == train.steps or done == start + 1:
          logger.log(done, metrics, eta)
          recent_losses = []
          if peak.maybe_refresh():  # measured the CPU peak again, between steps: not a step's time
            t_prev = time.perf_counter()
        else:
          logger.progress(done, metrics, eta)
        final = done == train.steps
        if final or stop["stop"] or (train.checkpoint_every and done % train.checkpoint_every == 0):
          ckpt.save(done, state, saved_positions(position), job.to_dict())
          last_checkpoint = done
        if stop["stop"] and not final:
          ckpt.wait()
          result = RunResult("preempted", done, done, f"SIGTERM: saved checkpoint {done} and stopped")
          break
      else:
        result = RunResult("done", train.steps, last_checkpoint)
  finally:
    if tracing:  # the run ended inside the profiled steps
      jax.profiler.stop_trace()
    logger.close()
    ckpt.close()
    if hasattr(batches, "close"):
      batches.close()
  return result
