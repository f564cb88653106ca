"""A job's compiled programs on its mesh: parameter and state shardings, the initial state, the jitted
train step, and the per-host batch -> global array conversion.

Programs are cached per StepSpec (everything they depend on), so several runs of one config in a process
(a sweep in a notebook, the tests) compile once.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from famjax.model import ModelConfig, init_params, pallas_attention
from famjax.parallel import (LOGICAL_AXIS_RULES, activation_constraint, batch_sharding, make_mesh,
                             mirror_shardings, replicated, tree_shardings)
from famjax.training import memory
from famjax.training.config import FamTrainingConfig, JobConfig, LoraConfig, OptimizerConfig, check_platform
from famjax.training.optimizer import learning_rate_schedule, make_optimizer
from famjax.training.state import TrainState, model_logical_axes, new_state, state_logical_axes
from famjax.training.step import eval_sums, make_train_step
from famjax.workdir.checkpoint import abstract_like

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids")


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything the compiled programs of a job depend on (hashable: equal specs share programs, so
  several runs of one config in a process, e.g. a sweep in a notebook or the tests, compile once)."""

  model: ModelConfig
  lora: LoraConfig
  fam: FamTrainingConfig
  optimizer: OptimizerConfig
  steps: int
  batch_size: int
  seq_len: int
  z_loss: float
  mask_between_examples: bool
  microbatches: int
  loss_chunk: int
  loss_vocab_chunk: int
  mesh: jax.sharding.Mesh

  @classmethod
  def of(cls, job: JobConfig, mesh: jax.sharding.Mesh) -> "StepSpec":
    t = job.train
    return cls(job.model, job.lora, job.fam, job.optimizer, t.steps, t.batch_size, t.seq_len, t.z_loss,
               job.data.mask_between_examples, t.microbatches, t.loss_chunk,
               t.loss_vocab_chunk, mesh)


class Programs:
  """The shardings, abstract state and jitted functions of a StepSpec."""

  def __init__(self, spec: StepSpec):
    cfg, mesh = spec.model, spec.mesh
    self.optimizer = make_optimizer(spec.optimizer, spec.steps)
    self.schedule = learning_rate_schedule(spec.optimizer, spec.steps)
    step = make_train_step(cfg, spec.lora, spec.fam, self.optimizer, self.schedule, spec.z_loss,
                           mask_between_examples=spec.mask_between_examples,
                           constrain=activation_constraint(mesh), microbatches=spec.microbatches,
                           loss_chunk=spec.loss_chunk, loss_vocab_chunk=spec.loss_vocab_chunk)
    per_device = functools.partial(_kernels_per_device, cfg, mesh)

    abstract_params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    trainable_axes, frozen_axes = state_logical_axes(cfg, spec.lora)
    self.param_shardings = tree_shardings(abstract_params, model_logical_axes(cfg), mesh)

    def init_state(params, seed):
      return new_state(params, cfg, spec.lora, self.optimizer, seed)

    # Sharding of the state: parameters by the rules, the optimizer state like the parameters it mirrors
    # (famjax.parallel.mirror_shardings), the small rest replicated.
    abstract_state = jax.eval_shape(init_state, abstract_params, 0)
    trainable_sh = tree_shardings(abstract_state.trainable, trainable_axes, mesh)
    frozen_sh = tree_shardings(abstract_state.frozen, frozen_axes, mesh)
    self.state_shardings = jax.tree.map(lambda _: replicated(mesh), abstract_state).replace(
        trainable=trainable_sh, frozen=frozen_sh,
        opt_state=mirror_shardings(abstract_state.opt_state, abstract_state.trainable, trainable_sh, mesh))
    self.abstract_state = abstract_like(abstract_state, self.state_shardings)
    self.init_state = jax.jit(init_state, in_shardings=(self.param_shardings, None),
                              out_shardings=self.state_shardings)
    self.init_params = jax.jit(lambda k: init_params(cfg, k), out_shardings=self.param_shardings)

    B, T = spec.batch_size, spec.seq_len
    self.batch_shardings = {k: batch_sharding(mesh, B) for k in BATCH_KEYS}
    self.abstract_batch = {k: jax.ShapeDtypeStruct((B, T), np.float32 if k == "weights" else np.int32,
                                                   sharding=self.batch_shardings[k]) for k in BATCH_KEYS}
    self.step = jax.jit(per_device(step), in_shardings=(self.state_shardings, self.batch_shardings),
                        out_shardings=(self.state_shardings, replicated(mesh)), donate_argnums=0)

    def state_eval_sums(state, batch):  # evaluation during training: the state's merged parameters
      return eval_sums(state.params(spec.lora, cfg.compute_dtype), cfg, batch,
                       mask_between_examples=spec.mask_between_examples,
                       constrain=activation_constraint(mesh))

    self.eval_sums = jax.jit(per_device(state_eval_sums), in_shardings=(self.state_shardings, self.batch_shardings),
                             out_shardings=replicated(mesh))
    self.merged_params = jax.jit(lambda state: state.params(spec.lora), in_shardings=(self.state_shardings,),
                                 out_shardings=self.param_shardings)
    self.devices = list(mesh.devices.flat)
    self.compiled_step = None

  def compile(self) -> float:
    """Compile the step ahead of time (once); returns the seconds it took. A step that needs more memory
    than a device has raises famjax.training.memory.StepDoesNotFit (a ConfigError) saying how much it
    needs and which command finds settings that fit."""
    t0 = time.perf_counter()
    if self.compiled_step is None:
      lowered = self.step.lower(self.abstract_state, self.abstract_batch)
      self.compiled_step = memory.compile_step(lowered, (self.abstract_state, self.abstract_batch),
                                               self.devices)
    return time.perf_counter() - t0


def _kernels_per_device(cfg: ModelConfig, mesh: jax.sharding.Mesh, fn):
  """fn, traced so that the Pallas attention (attention_impl="pallas") runs its kernels per device of the
  mesh, over the batch's and the heads' mesh axes (famjax.model.pallas_attention.partitioned); fn itself
  for the other kernels, which XLA partitions."""
  if cfg.attention_impl != "pallas":
    return fn

  @functools.wraps(fn)
  def traced(*args):
    with pallas_attention.partitioned(mesh, LOGICAL_AXIS_RULES["batch"], LOGICAL_AXIS_RULES["q_heads"]):
      return fn(*args)

  return traced


@functools.lru_cache(maxsize=4)
def programs(spec: StepSpec) -> Programs:
  return Programs(spec)


class Trainer:
  """A job's programs on its mesh: state shardings, the initial state, the jitted step, batches."""

  def __init__(self, job: JobConfig, devices=None):
    self.job = job
    self.mesh = make_mesh(job.mesh, devices)
    check_platform(job.model, self.mesh.devices.flat[0].platform)  # before anything compiles
    self.programs = programs(StepSpec.of(job, self.mesh))
    self.param_shardings = self.programs.param_shardings
    self.state_shardings = self.programs.state_shardings
    self.abstract_state = self.programs.abstract_state
    self.batch_shardings = self.programs.batch_shardings
    self.abstract_batch = self.programs.abstract_batch

  def initial_state(self, params: dict | None = None) -> TrainState:
    """Step 0: from `params` (e.g. init_from), else a random initialisation from the seed."""
    seed = self.job.train.seed
    if params is None:
      params = self.programs.init_params(jax.random.key(seed))
    else:
      params = jax.device_put(params, self.param_shardings)
    return self.programs.init_state(params, seed)

  def compile(self) -> float:
    return self.programs.compile()

  def memory_summary(self) -> str:
    """One line: the compiled step's memory per device (XLA's memory_analysis), or "" if unknown."""
    compiled = self.programs.compiled_step
    try:
      m = compiled.memory_analysis() if compiled is not None else None
    except Exception:  # pylint: disable=broad-except  # not every backend reports it
      m = None
    if m is None:
      return ""
    gib = lambda n: f"{n / 2**30:.3g} GiB"  # noqa: E731
    sizes = {name: getattr(m, f"{name}_size_in_bytes", 0) for name in
             ("argument", "output", "alias", "temp", "generated_code")}
    peak = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    return (f"step memory per device (XLA): {gib(peak)} = arguments {gib(sizes['argument'])} + outputs "
            f"{gib(sizes['output'])} - donated {gib(sizes['alias'])} + temporaries {gib(sizes['temp'])}")

  def global_batch(self, local: dict) -> dict:
    """Per-host numpy arrays -> global arrays on the mesh (the batch's rows split over data and fsdp)."""
    B, T = self.job.train.batch_size, self.job.train.seq_len
    out = {}
    for k in BATCH_KEYS:
      if k not in local:
        if k == "segment_ids":  # optional in the data contract: all tokens real
          local = {**local, k: np.ones_like(np.asarray(local["inputs"]), np.int32)}
        else:
          raise KeyError(f"the batch lacks {k!r}")
      out[k] = jax.make_array_from_process_local_data(
          self.batch_shardings[k], np.asarray(local[k], self.abstract_batch[k].dtype), (B, T))
    return out

  def step(self, state: TrainState, batch: dict):
    fn = self.programs.compiled_step or self.programs.step
    return fn(state, batch)

  def eval_sums(self, state: TrainState, batch: dict) -> jax.Array:
    """famjax.training.step.eval_sums of a global batch with the state's parameters (nothing donated)."""
    return self.programs.eval_sums(state, batch)

  def params(self, state: TrainState) -> dict:
    """The state's parameters, LoRA merged, sharded as the model's."""
    return self.programs.merged_params(state)
