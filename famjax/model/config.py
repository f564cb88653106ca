"""ModelConfig: the one validated description of a famjax decoder (spec ../shared/docs/fam.md §1-§5).

Validation happens on construction, so a bad value fails before anything is traced or compiled, with a
`ValueError` that names the field.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class AttentionKind(str, enum.Enum):
  """Which attention pattern the decoder uses (spec §2)."""

  FULL = "full"  # plain causal attention over every earlier token
  BSWA = "bswa"  # block sliding window: own block causally + `mem_segments` whole previous blocks
  FAM = "fam"  # BSWA + the layer's feedback attention memory of `fam_len` rows
  SWA = "swa"  # [famjax ablation] token-level sliding window of `window` tokens (the paper's Figure 1a)


# Where the rows of a FAM state sit for RoPE (`ModelConfig.fam_position`); the rule is
# famjax.model.fam.fam_positions. "last" is the spec's (§5).
FAM_POSITIONS = ("last", "between", "zero")
# Where each layer's initial FAM comes from (`ModelConfig.fam_init`): "prompt" is the spec's (§4).
FAM_INITS = ("prompt", "prefix")


# Remat (activation checkpointing) of the scan over layers: policy name -> what `jax.checkpoint` saves
# (its `policy`; None saves nothing, so the whole layer is recomputed). "none" turns remat off. "qkv" is
# the name famjax.model.fam gives the q/k/v projections with `checkpoint_name`. "full" is not run through
# jax.checkpoint but through famjax.model.transformer.remat_full, the same recomputation with the layer's
# input kept as its raw bits.
REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv"),
    # As "dots_no_batch" and "save_qkv_proj", but what they save goes to host memory and comes back for
    # the backward pass. TPU and GPU only: on CPU, host memory is device memory and JAX lowers the
    # transfers to nothing, so the policies compile and compute the same gradients but save no memory
    # (famjax.training refuses them there, OFFLOAD_POLICIES).
    "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    "offload_qkv_proj": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("qkv",), offload_src="device",
        offload_dst="pinned_host"),
}
REMAT_POLICIES = ("none", *REMAT)
OFFLOAD_POLICIES = ("offload_dots_no_batch", "offload_qkv_proj")

# How the block attention computes softmax(q.k) v (`ModelConfig.attention_impl`): "xla" is
# famjax.model.layers.attend, the reference; "pallas" is famjax.model.pallas_attention, a flash-attention
# kernel for TPUs that takes the same mask (Pallas' interpret mode elsewhere, for the tests; float32 or
# bfloat16); "cudnn" is jax.nn.dot_product_attention's cuDNN fused kernel (GPU only, bfloat16/float16
# only), through famjax.model.layers.dot_product_attention.
ATTENTION_IMPLS = ("xla", "pallas", "cudnn")


def _as_dtype(name: str, value: Any) -> Any:
  try:
    return jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"ModelConfig.{name}: {value!r} is not a dtype ({e})") from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and attention pattern of a Llama-family decoder with optional FAM.

  Attributes:
    vocab_size: number of token ids (V).
    d_model: width of the residual stream (D).
    n_layers: number of decoder layers (L).
    n_heads: query heads (N).
    n_kv_heads: key/value heads (K); N % K == 0 (K == N: MHA, 1 < K < N: GQA, K == 1: MQA).
    head_dim: per-head width (H); None means d_model // n_heads.
    mlp_dim: SwiGLU hidden width (M).
    attention: "full" | "bswa" | "fam" (spec §2), or "swa" (**[famjax ablation]**, see `window`).
    block_size: tokens per block (B in the spec) for bswa and fam; also the query chunk of `full`, and
      of `swa`, whose results do not depend on it.
    mem_segments: whole previous blocks each block attends to (m in the spec). Not used by swa (its
      memory is `window`).
    fam_len: rows of feedback memory per layer (F); 0 makes fam equal bswa.
    rope_theta: RoPE base.
    rms_eps: RMSNorm epsilon.
    tie_embeddings: logits through the transposed embedding instead of a separate output matrix.
    embed_scale: multiply token embeddings by sqrt(d_model) (Gemma-style; off for Llama).
    dtype: compute dtype (activations, matmuls). Softmax and norms run in float32 regardless.
    param_dtype: storage dtype of the parameters (the master copy in training).
    remat: activation checkpointing policy of the scan over layers, one of REMAT_POLICIES ("offload_*":
      TPU and GPU only).
    attention_chunk: query blocks whose attention scores exist at once in the bswa/fam forward. 0 (the
      default): all blocks of a chunk at once. k > 0: the blocks go k at a time through a `lax.map`
      with `jax.checkpoint` around each group, so the backward pass recomputes one group's scores
      instead of storing every block's ([blocks, block_size, (m+1) * block_size + F] float32 per head
      and example). Same logits and gradients; it changes memory, not the math. A chunk of at most k
      blocks (streaming, decode) runs as one group. Each group's key/value windows (its blocks, their
      memory blocks and FAM keys, rotated) are built inside the group: nothing of size blocks x window
      exists at once.
    mlp_chunk: tokens whose MLP hidden activations ([tokens, mlp_dim]) exist at once in a layer (the
      token MLP after the attention; the FAM's own F rows are never chunked). 0 (the default): all
      tokens of the chunk at once. k > 0: k tokens at a time, forward and backward, with a hand-written
      gradient that recomputes each group's activations and sums the weights' gradient over the groups
      in float32 (famjax.model.fam.chunked_mlp). Same outputs; it changes memory, not the math.
    attention_impl: the kernel of the bswa/fam block attention and of full attention's query chunks, one
      of ATTENTION_IMPLS: "xla" (famjax.model.layers.attend, the reference), "pallas"
      (famjax.model.pallas_attention: a Pallas flash-attention kernel for TPUs with the same mask and
      result, a tile of queries x keys at a time, masked tiles skipped; dtype bfloat16 or float32; on
      anything but a TPU it runs in Pallas' interpret mode, slowly: for tests) or "cudnn"
      (jax.nn.dot_product_attention's fused cuDNN kernel: GPU only, and dtype bfloat16 or float16). The
      FAM update's F-row attention and the prompt pass always use "xla". The platform is checked where a
      job is built (famjax.training.config.check_platform), not here.
    init_std: standard deviation of the random initialisation of weight matrices and embeddings; None
      (the default) scales it to the width, d_model ** -0.5 (fan-in scaling of the projections that read
      the residual stream), which is 0.125 at d_model 64 and 0.0156 at 4096. A fixed 0.02 (GPT-2's) is
      about 6x too small at width 64: the PassKey model then stays at chance (docs/passkey_small.md).
    fam_gate: **[famjax extension, not in the paper; off by default]** a learned write gate on every FAM
      update after the first: F_new = F_prev + g * (F_cand - F_prev), with F_cand the spec's update
      (§3 step 3) and g = sigmoid(w . RMSNorm(F_cand - F_prev) + b_row) one number per FAM row, from
      new weights per layer (`fam_gate` [D], `fam_gate_bias` [F], both 0 at init: g = 1/2). The spec's
      state is a residual stream that grows with every block read; the gate lets a layer leave its FAM
      as it is on a block with nothing to keep (docs/passkey_small.md measures both).

  The ablations below (docs/ablations.md) are off at their defaults, which are the spec's model; each
  says where its rule lives.

    window: **[famjax ablation: the paper's Figure 1a token-level sliding window]** with attention="swa"
      only (0 otherwise): each token attends to the previous `window` tokens, itself included, i.e. token
      i sees tokens j with i - window < j <= i (Mistral's `sliding_window` convention). Computed per
      query block of block_size tokens against the ceil((window-1)/block_size) blocks before it, with a
      token-level mask (famjax.model.fam.block_attention_layer, `memory_blocks` below): no L x L score
      matrix; the stream keeps those blocks and the pending one (constant memory).
    mem_stop_gradient: **[famjax ablation: Transformer-XL's cached memory]** bswa and fam: the keys
      and values of the `mem_segments` memory blocks carry no gradient (the block's own keys, the FAM
      keys and the FAM update still do). Forward values are unchanged
      (famjax.model.fam.block_attention_layer).
    fam_position: **[famjax ablation]** the RoPE positions of a FAM state's rows, one of FAM_POSITIONS:
      "last" (spec §5: the last F positions of the block it compressed), "between" (evenly spaced over
      that block: row i at its position (i+1)*B/F - 1), "zero" (all rows at that block's first position).
      One rule for every FAM state, the prompt's included: famjax.model.fam.fam_positions.
    fam_init: **[famjax ablation: the paper compares a learned prompt with a per-layer prefix and
      reports the prefix worse]** each layer's initial FAM, one of FAM_INITS: "prompt" (spec §4: one
      learned prompt `fam_prompt` [F, D] through a forward pass of the layers) or "prefix" (a learned
      initial state per layer, `layers/fam_prefix` [L, F, D], used as is: no prompt pass). Either way
      the first update from it uses residual 0 (§3 step 3). famjax.model.transformer.initial_fam.
    fam_history: **[famjax ablation: the paper's "attending to more than one previous FAM"]** k >= 1:
      the block tokens attend to the keys of the last k FAM states F_{tau-1} .. F_{tau-k} of their
      layer (1: the spec's F_{tau-1} only; an older state sits at the positions of the block it
      compressed). The FAM update itself still reads only F_{tau-1} and the block (§3 step 3). States
      that do not exist yet (the stream's start, a passed RSP state, a packed example's restart) are
      masked out. The stream carries the k - 1 older states (famjax.model.fam.history_keys).
  """

  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int | None = None
  mlp_dim: int = 256
  attention: str = "fam"
  block_size: int = 16
  mem_segments: int = 1
  fam_len: int = 4
  rope_theta: float = 10_000.0
  rms_eps: float = 1e-6
  tie_embeddings: bool = False
  embed_scale: bool = False
  dtype: Any = "bfloat16"
  param_dtype: Any = "float32"
  remat: str = "full"
  attention_chunk: int = 0
  mlp_chunk: int = 0
  attention_impl: str = "xla"
  init_std: float | None = None
  fam_gate: bool = False
  window: int = 0
  mem_stop_gradient: bool = False
  fam_position: str = "last"
  fam_init: str = "prompt"
  fam_history: int = 1

  def __post_init__(self):
    positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "block_size")
    for name in positive:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
    for name in ("mem_segments", "fam_len", "attention_chunk", "mlp_chunk", "window"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
    if self.head_dim is None:
      if self.d_model % self.n_heads:
        raise ValueError(
            f"ModelConfig.head_dim: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
            "set head_dim explicitly")
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, (int, np.integer)) \
        or self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be a positive even integer (RoPE pairs), "
                       f"got {self.head_dim!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
    try:
      object.__setattr__(self, "attention", AttentionKind(self.attention).value)
    except ValueError:
      raise ValueError(f"ModelConfig.attention must be one of "
                       f"{[k.value for k in AttentionKind]}, got {self.attention!r}") from None
    if self.fam_len > self.block_size:
      raise ValueError(f"ModelConfig.fam_len={self.fam_len} must not exceed block_size={self.block_size} "
                       "(a FAM state takes the positions of the last fam_len tokens of a block, spec §5)")
    if not isinstance(self.fam_gate, (bool, np.bool_)):
      raise ValueError(f"ModelConfig.fam_gate must be True or False, got {self.fam_gate!r}")
    if self.fam_gate and not self.has_fam:
      raise ValueError("ModelConfig.fam_gate gates the FAM update: it needs attention='fam' and fam_len > 0 "
                       f"(got attention={self.attention!r}, fam_len={self.fam_len})")
    self._check_ablations()
    if not (float(self.rope_theta) > 1.0):
      raise ValueError(f"ModelConfig.rope_theta must be > 1, got {self.rope_theta!r}")
    if not (0.0 < float(self.rms_eps) < 1.0):
      raise ValueError(f"ModelConfig.rms_eps must be in (0, 1), got {self.rms_eps!r}")
    if self.init_std is None:
      object.__setattr__(self, "init_std", float(self.d_model) ** -0.5)
    if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float, np.floating)) \
        or not (float(self.init_std) > 0.0):
      raise ValueError(f"ModelConfig.init_std must be > 0, got {self.init_std!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")
    for name in ("dtype", "param_dtype"):
      dt = _as_dtype(name, getattr(self, name))
      if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"ModelConfig.{name} must be a floating dtype, got {dt}")
      object.__setattr__(self, name, dt.name)  # stored as a name so the config stays hashable
    if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
      raise ValueError(f"ModelConfig.attention_impl='cudnn' needs dtype bfloat16 or float16 (cuDNN's fused "
                       f"attention has no {self.dtype} kernel), got dtype={self.dtype!r}")
    if self.attention_impl == "pallas" and self.dtype not in ("bfloat16", "float32"):
      raise ValueError(f"ModelConfig.attention_impl='pallas' needs dtype bfloat16 or float32 (the TPU kernel's "
                       f"matrix units take no {self.dtype}), got dtype={self.dtype!r}")

  def _check_ablations(self) -> None:
    """The ablation switches (docs/ablations.md): values, and combinations that would mean nothing."""
    swa = self.attention == AttentionKind.SWA.value
    if swa and self.window < 1:
      raise ValueError("ModelConfig.window: attention='swa' needs window >= 1 (the tokens each token "
                       f"attends to, itself included), got window={self.window}")
    if self.window and not swa:
      raise ValueError(f"ModelConfig.window={self.window} is the width of attention='swa' only "
                       f"(got attention={self.attention!r}); leave it 0")
    if not isinstance(self.mem_stop_gradient, (bool, np.bool_)):
      raise ValueError(f"ModelConfig.mem_stop_gradient must be True or False, got {self.mem_stop_gradient!r}")
    if self.mem_stop_gradient and self.attention not in (AttentionKind.BSWA.value, AttentionKind.FAM.value):
      raise ValueError("ModelConfig.mem_stop_gradient stops the gradient through the memory blocks of bswa "
                       f"and fam; attention={self.attention!r} has none")
    if self.fam_position not in FAM_POSITIONS:
      raise ValueError(f"ModelConfig.fam_position must be one of {FAM_POSITIONS}, got {self.fam_position!r}")
    if self.fam_init not in FAM_INITS:
      raise ValueError(f"ModelConfig.fam_init must be one of {FAM_INITS}, got {self.fam_init!r}")
    if isinstance(self.fam_history, bool) or not isinstance(self.fam_history, (int, np.integer)) \
        or self.fam_history < 1:
      raise ValueError(f"ModelConfig.fam_history must be an integer >= 1, got {self.fam_history!r}")
    has_fam = self.attention == AttentionKind.FAM.value and self.fam_len > 0
    for name, default in (("fam_position", "last"), ("fam_init", "prompt"), ("fam_history", 1)):
      if getattr(self, name) != default and not has_fam:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} needs attention='fam' and fam_len > 0 "
                         f"(got attention={self.attention!r}, fam_len={self.fam_len})")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def uses_blocks(self) -> bool:
    """bswa, fam and swa: constant-size streaming state; full: a growing key/value cache."""
    return self.attention != AttentionKind.FULL.value

  @property
  def memory_blocks(self) -> int:
    """Whole blocks before a query block whose keys it may read: mem_segments (bswa, fam), or the
    ceil((window-1)/block_size) blocks that cover a swa window; 0 for full."""
    if self.attention == AttentionKind.SWA.value:
      return -(-(self.window - 1) // self.block_size)
    return self.mem_segments if self.uses_blocks else 0

  @property
  def has_fam(self) -> bool:
    """A learned prompt and per-layer FAM state exist (attention == fam and fam_len > 0)."""
    return self.attention == AttentionKind.FAM.value and self.fam_len > 0

  def replace(self, **changes) -> "ModelConfig":
    unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}")
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)
