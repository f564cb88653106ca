"""Will it fit? Per-device memory of a job's training step on a (data, fsdp, tensor) mesh.

Two numbers (benchmarks/memory_fit.py tabulates them for the paper's configs, docs/launch.md):

* `compiled_bytes(job)`: the step compiled ahead of time on this process's devices from abstract inputs
  (jax.ShapeDtypeStruct with the job's shardings: nothing is allocated); XLA's memory_analysis() gives
  the per-device bytes: arguments (the train state and the batch) + temporaries + outputs not aliased to
  donated inputs, at the config's full depth (the layers are scanned, so a 56-layer step compiles in
  about the time of a 2-layer one). On simulated CPU devices these are XLA:CPU's buffer assignments; the
  TPU compiler fuses more (e.g. the softmax over the scores) and would usually need less, not more.
* `estimate(job, sizes)`: a formula, no compiling: the train state exactly (every array's shard under
  famjax's sharding rules on the mesh), the gradients of the trained arrays (and their float32 sum over
  microbatches with config.microbatches > 1), the merged LoRA weights (compute dtype) and their gradient
  (float32), the layer inputs that full remat keeps (one [b, T, D] per layer in the compute dtype's
  width, b the sequences of one microbatch per data shard), and the larger of the two activation peaks
  of the step: the loss or one layer's backward, with the number of live copies XLA:CPU keeps of each
  (ACTIVATION_COPIES, CHUNKED_LOSS_COPIES: partly read from its buffer assignments, partly fitted).
  The loss: the float32 logits of every token and their gradient and the gathered output matrix; with
  config.loss_chunk, one tile's logits (loss_chunk tokens x loss_vocab_chunk entries), two gathered tiles
  of the output matrix, the hidden states' float32 gradient and the LoRA factors of every layer gathered
  over data x fsdp.
  A layer's backward: the attention scores of every block (with ModelConfig.attention_chunk, where this
  famjax has it: of that many blocks, their key/value windows and the keys of every block), the MLP's
  hidden activations (with ModelConfig.mlp_chunk: of that many tokens, plus the float32 sums of the MLP
  weights' gradients) and the layer's gathered weights.
  docs/launch.md ("Will it fit?") gives its error against the compiles of the paper configs;
  tests/test_memory_fit.py checks it against compiles of small configs it was not fitted to.
"""

from __future__ import annotations

import math
import re
import time

import jax
import numpy as np

from famjax.model import init_params
from famjax.parallel import MESH_AXES, logical_to_spec, make_mesh, topology
from famjax.training.config import ConfigError, JobConfig
from famjax.training.optimizer import make_optimizer
from famjax.training.state import model_logical_axes, new_state, state_logical_axes

# Live copies XLA:CPU keeps at a layer's backward, in units of one float32 array: the attention scores of
# all blocks (f32 scores, their gradient and softmax intermediates, a bf16 copy and the boolean mask: read
# from the buffer assignments of the 1B and 24B steps as 4.75 copies of 8 of the 9 blocks of 8704 tokens,
# so 4.22 of all 9), the MLP's [b, T, mlp] activations and their gradients, and the layer's weights
# gathered over fsdp (counted as an f32 + compute-dtype pair each). The last two were fitted to 13
# compiles without loss_chunk and attention_chunk, of an earlier famjax (before remat_full). With
# attention_chunk ("chunked_*"): the scores of the blocks computed at once, the key/value windows
# ([blocks, (m+1) * block + F, kv heads, head_dim] float32: 4 to 7 buffers in the 1B and 8B buffer
# assignments, when every block's were built at once) and the MLP activations, which are no longer
# hidden behind the scores (up to 7 buffers at distinct offsets in the 1B step's; 6 fitted). With
# mlp_chunk, the layer's gathered weights: "chunked_layer_weights", fitted to the 1B, 8B and 24B
# compiles with every memory-saving setting.
ACTIVATION_COPIES = {"scores": 4.22, "mlp": 4.0, "layer_weights": 3.0,
                     "chunked_scores": 4.75, "kv_windows": 4.0, "chunked_mlp": 6.0,
                     "chunked_layer_weights": 2.0}
# With loss_chunk, at the loss: the output matrix (with loss_vocab_chunk, one tile of its columns)
# gathered in float32 and a compute-dtype copy, 1.7 times (fitted; two float32 all-gathers and two
# compute-dtype copies at distinct offsets in the 1B, 8B and 24B buffer assignments of the earlier loss,
# which gathered the whole matrix), one tile's float32 logits (fitted: 1 copy), the float32 gradient of
# the hidden states (the carry of the tiled loss's backward and a tile's share) and the LoRA factors of
# every layer gathered in float32 (fitted: 1.75 times their bytes). The "chunked" counts are fitted to 9 compiles of the paper configs with these settings
# (benchmarks/memory_fit.py's points, and 1B on 128 chips with loss chunks 256 and 1088).
CHUNKED_LOSS_COPIES = {"output_matrix": 1.7, "logits": 1.0, "lora_factors": 1.75, "hidden_gradient": 2.0}


# -- the estimate ---------------------------------------------------------------------------------------

def _shard_bytes(shape, dtype, names, mesh) -> int:
  spec = logical_to_spec(names, shape, mesh)
  count = math.prod(shape)
  for axes in spec:
    for axis in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
      count //= mesh.shape[axis]
  return count * np.dtype(dtype).itemsize


def _tree_bytes(tree, axes, mesh) -> int:
  leaves = jax.tree.leaves(jax.tree.map(lambda names, x: _shard_bytes(x.shape, x.dtype, names, mesh), axes,
                                        tree, is_leaf=lambda n: isinstance(n, tuple)))
  return int(sum(leaves))


def state_bytes(job: JobConfig, sizes: tuple[int, int, int]) -> dict:
  """Per-device bytes of the train state on a (data, fsdp, tensor) mesh, and of the gradients."""
  mesh = jax.sharding.AbstractMesh(sizes, MESH_AXES)
  cfg = job.model
  optimizer = make_optimizer(job.optimizer, job.train.steps)
  params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  state = jax.eval_shape(lambda p: new_state(p, cfg, job.lora, optimizer, 0), params)
  trainable_axes, frozen_axes = state_logical_axes(cfg, job.lora)
  trainable = _tree_bytes(state.trainable, trainable_axes, mesh)
  frozen = _tree_bytes(state.frozen, frozen_axes, mesh)
  # The optimizer state is split like the trained array it mirrors (famjax.parallel.mirror_shardings);
  # the small factored statistics (rows and columns of Adafactor's second moment) are whole.
  divisor = {}
  for names, x in zip(jax.tree.leaves(trainable_axes, is_leaf=lambda n: isinstance(n, tuple)),
                      jax.tree.leaves(state.trainable)):
    divisor[x.shape] = math.prod(x.shape) * 4 // _shard_bytes(x.shape, np.float32, names, mesh)
  optimizer_state = sum(math.prod(x.shape) * x.dtype.itemsize // divisor.get(x.shape, 1)
                        for x in jax.tree.leaves(state.opt_state))
  other = sum(math.prod(x.shape) * x.dtype.itemsize for x in (state.step, state.rng, state.rsp_fam,
                                                             state.rsp_valid))
  return {"trained": trainable, "frozen": frozen, "optimizer": int(optimizer_state), "scalars_rsp": other,
          "gradients": trainable}


def _split(size: int, mesh_size: int) -> int:
  return size // mesh_size if size % mesh_size == 0 else size


def estimate(job: JobConfig, sizes: tuple[int, int, int]) -> dict:
  """Per-device bytes of the training step, term by term, and "total" (see the module docstring).

  Models config.microbatches (the activations of one microbatch of b = batch / (data * fsdp) / k
  sequences, plus a float32 gradient accumulator), config.loss_chunk (the loss's logits `loss_chunk` tokens
  at a time) and ModelConfig.attention_chunk where this famjax has it (the scores of that many query blocks
  at a time, plus the key/value windows of every block)."""
  data, fsdp, tensor = sizes
  cfg, train = job.model, job.train
  if train.batch_size % (data * fsdp):
    raise ValueError(f"batch {train.batch_size} does not split over data*fsdp = {data * fsdp}")
  per_shard, k = train.batch_size // (data * fsdp), train.microbatches
  if per_shard % k:
    raise ValueError(f"microbatches={k} does not divide the {per_shard} sequences per data shard "
                     f"(batch {train.batch_size} over data*fsdp = {data * fsdp})")
  if cfg.remat != "full":
    raise ValueError(f"the estimate models remat='full' (the paper configs), not {cfg.remat!r}")
  b, T, D, L = per_shard // k, train.seq_len, cfg.d_model, cfg.n_layers
  C, G = train.loss_chunk, getattr(cfg, "attention_chunk", 0)
  mlp_tokens = min(T, getattr(cfg, "mlp_chunk", 0) or T)  # tokens whose MLP activations exist at once
  vocab_tile = _split(min(train.loss_vocab_chunk or cfg.vocab_size, cfg.vocab_size), tensor)
  c = np.dtype(cfg.compute_dtype).itemsize
  heads, kv_heads = _split(cfg.n_heads, tensor), _split(cfg.n_kv_heads, tensor)
  vocab, mlp = _split(cfg.vocab_size, tensor), _split(cfg.mlp_dim, tensor)
  out = state_bytes(job, sizes)
  if k > 1:  # the scan over microbatches carries the sum of their gradients
    out["gradient_accumulator"] = out["gradients"]
  lora_factors = 0  # one layer's adapters gathered over data x fsdp (float32)
  if job.lora.enabled:  # the model merges W + A @ B a layer at a time inside its scans (compute dtype),
    # with its gradient (f32): famjax.model.lora.merge_layer
    axes = model_logical_axes(cfg)["layers"]
    mesh = jax.sharding.AbstractMesh(sizes, MESH_AXES)
    layer_shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))["layers"]
    merged = sum(_shard_bytes(layer_shapes[n].shape, np.uint8, axes[n], mesh) for n in job.lora.targets)
    out["lora_merged"] = merged * (c + 4) // L
    lora_factors = state_bytes(job, (1, 1, tensor))["trained"] // L
  # what full remat keeps of each layer for the backward: its input, as bits of the compute dtype's width
  # (famjax.model.transformer.remat_full)
  out["layer_inputs"] = L * b * T * D * c
  H, copies = cfg.head_dim, ACTIVATION_COPIES
  kv_windows = 0
  if cfg.uses_blocks:
    fam_keys = cfg.fam_len * getattr(cfg, "fam_history", 1)
    blocks, width = -(-T // cfg.block_size), (cfg.memory_blocks + 1) * cfg.block_size + fam_keys
    if G and G < blocks:  # G blocks' scores and key/value windows at a time, and the memory's keys
      scores = copies["chunked_scores"] * b * G * heads * cfg.block_size * width * 4
      kv_windows = b * (G * width + (blocks + cfg.memory_blocks) * cfg.block_size) * kv_heads * H * 4
    else:
      scores = copies["scores"] * b * blocks * heads * cfg.block_size * width * 4
  else:  # one query chunk of block_size at a time
    scores = copies["scores"] * b * heads * cfg.block_size * T * 4
  layer_weights = (D * (heads + 2 * kv_heads) * H + heads * H * D + 3 * D * mlp) * (4 + c)
  # with mlp_chunk, the float32 sums of the MLP weights' gradients over the token groups
  mlp_gradient_sums = 3 * D * mlp * 4 if mlp_tokens < T else 0
  weight_copies = copies["chunked_layer_weights" if mlp_gradient_sums else "layer_weights"]
  layer = (scores + copies["kv_windows"] * kv_windows + weight_copies * layer_weights
           + copies["chunked_mlp" if kv_windows else "mlp"] * b * mlp_tokens * mlp * 4 + mlp_gradient_sums)
  output_matrix = vocab * D * (4 + c)  # gathered over fsdp: float32 and a compute-dtype copy
  if C:  # one tile's logits at a time; a tile of the output matrix, the hidden states' float32 gradient,
    # the adapters
    loss = (CHUNKED_LOSS_COPIES["output_matrix"] * vocab_tile * D * (4 + c)
            + CHUNKED_LOSS_COPIES["logits"] * b * C * vocab_tile * 4
            + CHUNKED_LOSS_COPIES["hidden_gradient"] * b * T * D * 4
            + CHUNKED_LOSS_COPIES["lora_factors"] * lora_factors)
  else:  # the logits of every token and their gradient; the output matrix
    loss = 2 * b * T * vocab * 4 + output_matrix
  out["activation_peak"] = int(max(layer, loss))
  out["activation_peak_is"] = "loss" if loss >= layer else "layer"
  out["total"] = sum(v for key, v in out.items() if isinstance(v, int) and key != "total")
  return out


# -- compiling -------------------------------------------------------------------------------------------

def compiled_bytes(job: JobConfig) -> dict:
  """XLA's per-device memory of the job's train step on this process's devices (nothing allocated)."""
  # Imported here: the estimate alone should not pay for the trainer (and its checkpointing).
  from famjax.training.trainer import Programs, StepSpec  # pylint: disable=import-outside-toplevel
  programs = Programs(StepSpec.of(job, make_mesh(job.mesh)))
  start = time.perf_counter()
  stats = programs.step.lower(programs.abstract_state, programs.abstract_batch).compile().memory_analysis()
  out = {"arguments": stats.argument_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
         "outputs_not_aliased": stats.output_size_in_bytes - stats.alias_size_in_bytes,
         "compile_s": round(time.perf_counter() - start, 1)}
  out["total"] = out["arguments"] + out["temporaries"] + out["outputs_not_aliased"]
  return out


# -- a step that does not fit -----------------------------------------------------------------------------

_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
# What the TPU compiler (libtpu 0.0.42.1) says when a program's buffers do not fit its HBM: "RESOURCE_EXHAUSTED:
# Ran out of memory on HBM, the total memory required for HLO temporaries (67.42G) exceeds available HBM
# (15.75G)." (G: GiB; the arguments, the train state and batch, come on top of the temporaries).
_OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED.*?temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                            r"\(([\d.]+)([KMGT]?)\)", re.S)


def out_of_memory(message: str) -> tuple[int, int] | None:
  """(bytes of temporaries the compiler needed, bytes available) from its out-of-memory error message, or
  None when the message is not one."""
  m = _OUT_OF_MEMORY.search(message)
  if m is None:
    return None
  need, need_unit, have, have_unit = m.groups()
  return int(float(need) * _UNITS[need_unit]), int(float(have) * _UNITS[have_unit])


def arguments_bytes(abstract_tree) -> int:
  """Per-device bytes of abstract arrays (ShapeDtypeStructs with shardings): the largest shard of each."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(abstract_tree)))


class StepDoesNotFit(ConfigError):
  """The train step needs more memory than a device has (raised when it compiles)."""

  def __init__(self, needed: int, available: int, devices, detail: str = ""):
    self.needed, self.available, self.detail = needed, available, detail
    self.device_kind = getattr(devices[0], "device_kind", "?")
    self.devices = len(devices)
    self.topology = topology.name_of(devices)
    super().__init__(self.describe())

  def command(self, job_file: str = "WORKDIR/config.json") -> str:
    """The benchmarks/memory_fit.py command that searches settings that fit, for the job in job_file."""
    where = f"--platform=tpu --topology={self.topology}" if self.topology else "--platform=cpu"
    return f"python benchmarks/memory_fit.py {where} --job={job_file}"

  def describe(self, job_file: str = "WORKDIR/config.json") -> str:
    return (f"the train step does not fit: it needs {self.needed / 2 ** 30:.2f} GiB per device ({self.detail}) "
            f"and a {self.device_kind} has {self.available / 2 ** 30:.2f} GiB. `{self.command(job_file)}` "
            "compiles it with the memory-saving settings (loss_chunk, loss_vocab_chunk, model.attention_chunk, "
            "model.mlp_chunk) and 1, 2, 4, ... microbatches and says which fits (docs/launch.md, "
            "\"Will it fit?\")")


def compile_step(lowered, abstract_arguments, devices):
  """lowered.compile(), or StepDoesNotFit when the program's memory exceeds a device's: the TPU compiler
  refuses it (RESOURCE_EXHAUSTED); a GPU compiles it, and its memory_analysis() is checked against the
  device's memory. XLA:CPU has no limit."""
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except  # jax.errors.JaxRuntimeError and its relatives
    got = out_of_memory(str(e))
    if got is None:
      raise
    arguments = arguments_bytes(abstract_arguments)
    raise StepDoesNotFit(arguments + got[0], got[1], devices,
                         f"arguments {arguments / 2 ** 30:.2f} GiB + temporaries {got[0] / 2 ** 30:.2f} GiB, "
                         "the compiler's figures") from None
  stats = getattr(devices[0], "memory_stats", lambda: None)() if devices[0].platform == "gpu" else None
  if stats and stats.get("bytes_limit"):
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    if total > stats["bytes_limit"]:
      raise StepDoesNotFit(total, stats["bytes_limit"], devices, "XLA's memory_analysis")
  return compiled
