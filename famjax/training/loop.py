"""The training loop: build or restore the state, compile the step for the mesh, run, log, checkpoint.

  run(job, workdir, make_batches) -> RunResult

`make_batches(position)` returns the per-host batch iterator (famjax.data's, or the synthetic one) that
continues from `position` (None: the start); it must offer `.state()`. The loop never imports
famjax.data: train.py wires the data in.

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
from famjax.training import flops as flops_lib
from famjax.training import init_from, metrics as metrics_lib, workdir as workdir_lib
from famjax.training.checkpoint import Checkpointer
from famjax.training.config import JobConfig
from famjax.training.state import TrainState
from famjax.training.trainer import Trainer

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
  stream can; famjax.data's pipeline refuses another process layout)."""
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


def run(job: JobConfig, workdir, make_batches: Callable[[dict | None], Iterator], *, restart: bool = False,
        say: Callable[[str], None] = print, async_checkpoints: bool = True) -> RunResult:
  """Train `job` in `workdir`, resuming from its latest good checkpoint."""
  workdir = Path(workdir)
  primary = jax.process_index() == 0
  note = workdir_lib.prepare(workdir, job.to_dict(), restart, write=primary)
  if note:
    say(note)
  cfg, train = job.model, job.train
  trainer = Trainer(job)
  ckpt = Checkpointer(workdir / "checkpoints", train.keep_checkpoints, async_save=async_checkpoints)
  start, state, data_position = _restore_or_init(trainer, ckpt, say)
  if primary:
    metrics_lib.truncate_history(workdir / "metrics.jsonl", start)
  last_checkpoint = start if start else None
  if start >= train.steps:
    ckpt.close()
    return RunResult("done", start, last_checkpoint, f"already trained for {start} steps")

  say(f"compiling the train step ({job.model.attention}, {jax.device_count()} device(s), mesh "
      f"{dict(trainer.mesh.shape)}) ...")
  say(f"compiled in {trainer.compile():.1f} s")
  peak = flops_lib.Peak(trainer.mesh.devices.flatten())
  step_flops = flops_lib.train_flops_per_step(cfg, train.batch_size, train.seq_len)
  say(f"model FLOPs/step {step_flops:.3g}; MFU against {peak.value / 1e9:.1f} GFLOP/s ({peak.source})")
  logger = metrics_lib.MetricsLogger(workdir, train.steps, tensorboard=train.tensorboard, files=primary)
  tokens_per_step = train.batch_size * train.seq_len
  batches = make_batches(own_position(data_position))
  result = None
  try:
    with _sigterm_flag() as stop:
      batch = trainer.global_batch(next(batches))
      t_prev, avg_time, recent_losses = time.perf_counter(), None, []
      for step in range(start, train.steps):
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
        avg_time = step_time if avg_time is None else 0.9 * avg_time + 0.1 * step_time
        recent_losses.append(metrics["loss"])
        metrics.update(step_time=step_time, tokens_per_second=tokens_per_step / step_time,
                       mfu=flops_lib.mfu(step_flops, step_time, peak.value),
                       loss_avg=sum(recent_losses) / len(recent_losses))
        eta = avg_time * (train.steps - done)
        if done % train.log_every == 0 or done == train.steps or done == start + 1:
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
    logger.close()
    ckpt.close()
    if hasattr(batches, "close"):
      batches.close()
  return result
