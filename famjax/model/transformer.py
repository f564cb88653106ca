"""The famjax decoder: a thin Flax NNX module over the pure forward of `famjax.model.fam`.

`Transformer(config)(tokens)` is the parallel forward; `init_state` + `stream` run the same computation
chunk by chunk with a constant-size state (bswa, fam) or a growing key/value cache (full).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from famjax.model import lora
from famjax.model import params as params_lib
from famjax.model.config import REMAT, ModelConfig
from famjax.model.fam import ChunkInfo, LayerContext, decoder_layer, prompt_pass
from famjax.model.layers import rms_norm


class FamState(NamedTuple):
  """The FAM of every layer: values [L, B, F, D]; from_prompt [B] (True: residual 0 at the next update).

  Pass one to `Transformer.__call__` to start from a saved state (Random State Passing, spec §6).
  With ModelConfig.fam_history > 1 only the latest state is passed: the older ones start out missing.
  """

  values: jax.Array
  from_prompt: jax.Array


@struct.dataclass
class StreamState:
  """Everything a stream carries between chunks. bswa/fam: constant size. Keys are stored unrotated.

  k, v: [L, B, W, K, H] (bswa/fam/swa: W = (m+1)*block_size with m = ModelConfig.memory_blocks, memory
    blocks then the pending block; full: the cache, grown by `Transformer.stream` as needed).
  fam: [L, B, F, D]; fam_from_prompt: [B].
  fam_hist: [L, B, k-1, F, D], the FAM states before `fam` with ModelConfig.fam_history = k (a famjax
    ablation; k-1 = 0 by default); fam_hist_valid: [L, B, k-1], False for a state that does not exist.
  context: valid memory blocks (bswa/fam) or cached tokens (full); pending: tokens of the partial block.
  position: the absolute position of the next token (int32, informational: logits never depend on it).
  aligned: static; True while `pending` is known to be 0, which lets a chunk of whole blocks skip a
    spare block of work.
  """

  k: jax.Array
  v: jax.Array
  fam: jax.Array
  fam_from_prompt: jax.Array
  fam_hist: jax.Array
  fam_hist_valid: jax.Array
  context: jax.Array
  pending: jax.Array
  position: jax.Array
  aligned: bool = struct.field(pytree_node=False, default=True)

  @property
  def fam_state(self) -> FamState:
    return FamState(self.fam, self.fam_from_prompt)


# Logical axis names of the activations, for `forward`'s `constrain` (mapped by famjax.parallel's rules).
ACTIVATION_AXES = ("batch", "length", "embed")
LOGITS_AXES = ("batch", "length", "vocab")
Constrain = Callable[[jax.Array, tuple], jax.Array]


def _unconstrained(x: jax.Array, names: tuple) -> jax.Array:
  del names
  return x


def gathered_layer(p: dict, constrain: Constrain) -> dict:
  """One layer's weights (a slice of params["layers"], adapters merged) whole along "embed", the axis FSDP
  splits: gathered once where the layer starts, so that the loops inside a layer that read them again
  (the FAM scan over blocks, mlp_chunk's token groups) do not each gather them anew (the TPU compiler
  had put the gathers inside those loops: 9 gathers of every 1B layer's weights per pass, one per block).
  Only the forward is pinned: the gradients flow back as XLA places them (reduce-scattered into the
  parameters' sharding), not forced whole onto every device."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
  def gather(w, names):
    return constrain(w, names)

  gather.defvjp(lambda w, names: (constrain(w, names), None), lambda names, _, cotangent: (cotangent,))
  axes = params_lib.LOGICAL_AXES["layers"]
  return {name: gather(w, tuple(None if a == "embed" else a for a in axes[name][1:])) if name in axes else w
          for name, w in p.items()}


def prompt_fam(params: dict, cfg: ModelConfig) -> jax.Array:
  """Each layer's initial FAM [L, F, D] ([L, 0, D] without FAM): from the learned prompt (spec §4), or
  with ModelConfig.fam_init="prefix" (**[famjax ablation]**) the learned per-layer `layers/fam_prefix`
  as is. The one place the initial FAM is chosen."""
  if not cfg.has_fam:
    return jnp.zeros((cfg.n_layers, 0, cfg.d_model), cfg.compute_dtype)
  if cfg.fam_init == "prefix":
    return params["layers"]["fam_prefix"].astype(cfg.compute_dtype)
  return prompt_pass(params["layers"], cfg, params["fam_prompt"].astype(cfg.compute_dtype))


def empty_state(params: dict, cfg: ModelConfig, batch_size: int, start_position=0) -> StreamState:
  """The state before the first token: empty memory, FAM from the prompt (no older FAM states)."""
  L, K, H = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
  width = (cfg.memory_blocks + 1) * cfg.block_size if cfg.uses_blocks else 0
  kv = jnp.zeros((L, batch_size, width, K, H), cfg.compute_dtype)
  fam = prompt_fam(params, cfg)
  old = cfg.fam_history - 1 if cfg.has_fam else 0
  return StreamState(
      k=kv, v=kv, fam=jnp.broadcast_to(fam[:, None], (L, batch_size) + fam.shape[1:]),
      fam_from_prompt=jnp.ones((batch_size,), bool),
      fam_hist=jnp.zeros((L, batch_size, old) + fam.shape[1:], cfg.compute_dtype),
      fam_hist_valid=jnp.zeros((L, batch_size, old), bool), context=jnp.zeros((), jnp.int32),
      pending=jnp.zeros((), jnp.int32), position=jnp.asarray(start_position, jnp.int32))


def remat_full(layer: Callable, dtype) -> Callable:
  """`layer(x, *args) -> (x, outputs)`, x of `dtype`, with full rematerialisation: the backward pass
  recomputes the layer from x and `args`, which are all it keeps (ModelConfig.remat="full"). The layer
  may close over no traced array: every array it reads is in x or `args`.

  What jax.checkpoint(layer) computes, written as a custom VJP for one reason: x is kept as its raw bits
  (an unsigned integer of its width), not as a float. Under a scan over layers these residuals are the
  stack [layers, B, T, D]; kept as bfloat16, XLA:CPU converted the whole stack to float32 before the
  backward loop (7.4 GiB per chip at the 24B config, docs/launch.md "Will it fit?"); as bits nothing
  converts them until a layer's slice is read back. The gradients are jax.vjp's of the recomputed layer.
  `args` (the layer's weights and context, slices of the scan's inputs) are kept as they are: the scan
  passes them on without stacking a copy.
  """
  return functools.partial(_remat_bits, layer, jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _remat_bits(layer, dtype, x, *args):
  return layer(x, *args)


def _remat_bits_forward(layer, dtype, x, *args):
  bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * dtype.itemsize}"))
  return layer(x, *args), (bits, args)


def _remat_bits_backward(layer, dtype, residuals, cotangents):
  bits, args = residuals
  _, vjp = jax.vjp(layer, jax.lax.bitcast_convert_type(bits, dtype), *args)
  return vjp(cotangents)


_remat_bits.defvjp(_remat_bits_forward, _remat_bits_backward)


def output_weights(params: dict, cfg: ModelConfig) -> jax.Array:
  """The output projection [D, V]: lm_head, or the transposed embedding when they are tied."""
  return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def forward(params: dict, cfg: ModelConfig, tokens: jax.Array, state: StreamState, *, max_pending: int,
            token_mask: jax.Array | None = None, position_offset: jax.Array | None = None,
            segment_ids: jax.Array | None = None, constrain: Constrain | None = None,
            output: str = "logits"):
  """Logits [B, n, V] (float32) of a chunk `tokens` [B, n] that continues `state`, and the next state.
  With output="hidden": the final normed hidden states [B, n, D] (compute dtype) instead, the logits
  being `hidden @ output_weights(params, cfg)` (famjax.training.loss.chunked_cross_entropy computes them
  a chunk at a time).

  `max_pending` (static) bounds `state.pending`: 0 for a forward from an empty state. `segment_ids`
  (packed-example ids, attention only within an example; in fam every example starts from the initial
  FAM, famjax.model.fam.fam_restarts) needs an empty state.
  `constrain(x, logical_names)` pins the sharding of the activations between layers ("batch", "length",
  "embed") and of the logits ("batch", "length", "vocab"), e.g. famjax.parallel.activation_constraint:
  without it, on an FSDP mesh the compiler may gather the batch instead of the weights.
  """
  constrain = constrain or _unconstrained
  n = tokens.shape[1]
  dtype = cfg.compute_dtype
  x = params["embed"][tokens].astype(dtype)
  if cfg.embed_scale:
    x = x * jnp.asarray(cfg.d_model ** 0.5, dtype)
  x = constrain(x, ACTIVATION_AXES)
  info = ChunkInfo(
      context=state.context, pending=state.pending, fam_from_prompt=state.fam_from_prompt,
      token_valid=None if token_mask is None else token_mask.astype(bool),
      segment_ids=segment_ids,
      position_offset=None if position_offset is None else jnp.asarray(position_offset, jnp.float32))

  def layer(x, p, ctx, info):
    p = jax.tree.map(lambda w: w.astype(dtype), lora.merge_layer(p, dtype))
    if constrain is not _unconstrained:  # on a mesh
      p = gathered_layer(p, constrain)
    x, ctx = decoder_layer(p, cfg, constrain(x, ACTIVATION_AXES), ctx, info, max_pending)
    return constrain(x, ACTIVATION_AXES), ctx

  if cfg.remat == "full":
    layer = remat_full(layer, dtype)
  elif cfg.remat != "none":
    layer = jax.checkpoint(layer, policy=REMAT[cfg.remat], prevent_cse=False)
  contexts = LayerContext(state.k, state.v, state.fam.astype(dtype), state.fam_hist.astype(dtype),
                          state.fam_hist_valid)
  x, contexts = jax.lax.scan(lambda x, inputs: layer(x, *inputs, info), x, (params["layers"], contexts))

  h = rms_norm(x, params["final_norm"].astype(dtype), cfg.rms_eps)
  if output == "hidden":
    logits = constrain(h, ACTIVATION_AXES)
  else:
    logits = jnp.einsum("BTD,DV->BTV", h, output_weights(params, cfg).astype(dtype),
                        preferred_element_type=jnp.float32)
    logits = constrain(logits, LOGITS_AXES)

  total = state.pending + n
  if cfg.uses_blocks:
    S = cfg.block_size
    done = total // S  # blocks completed by this chunk
    context = jnp.minimum(state.context + done, cfg.memory_blocks)
    pending = total % S
    if token_mask is None:
      completed_one = jnp.broadcast_to(done > 0, state.fam_from_prompt.shape)
    else:  # an example whose every block had padding never updated its FAM
      completed_one = _completed_a_block(token_mask, state.pending, S)
    from_prompt = state.fam_from_prompt & ~completed_one
  else:
    context, pending, from_prompt = state.context + n, state.pending, state.fam_from_prompt
  new_state = StreamState(
      k=contexts.k, v=contexts.v, fam=contexts.fam, fam_from_prompt=from_prompt, fam_hist=contexts.fam_hist,
      fam_hist_valid=contexts.fam_hist_valid, context=context,
      pending=pending, position=state.position + n, aligned=state.aligned)
  return logits, new_state


def _completed_a_block(token_mask: jax.Array, pending: jax.Array, S: int) -> jax.Array:
  """[B]: did any block that the chunk completed consist of valid tokens only?"""
  Bsz, n = token_mask.shape
  C = -(-n // S) + 1
  buf = jnp.ones((Bsz, C * S), bool)
  buf = jax.lax.dynamic_update_slice_in_dim(buf, token_mask.astype(bool), pending, axis=1)
  full_block = (jnp.arange(C * S) < pending + n).reshape(C, S).all(-1)
  return (buf.reshape(Bsz, C, S).all(-1) & full_block).any(-1)


@functools.partial(jax.jit, static_argnames=("cfg", "return_fam_state"))
def _parallel(params, cfg, tokens, fam_state, token_mask, position_offset, segment_ids, return_fam_state):
  state = empty_state(params, cfg, tokens.shape[0])
  if fam_state is not None:
    state = state.replace(fam=fam_state.values.astype(cfg.compute_dtype),
                          fam_from_prompt=fam_state.from_prompt)
  logits, state = forward(params, cfg, tokens, state, max_pending=0, token_mask=token_mask,
                          position_offset=position_offset, segment_ids=segment_ids)
  return (logits, state.fam_state) if return_fam_state else logits


@functools.partial(jax.jit, static_argnames=("cfg", "max_pending"))
def _stream(params, cfg, tokens, state, max_pending):
  return forward(params, cfg, tokens, state, max_pending=max_pending)


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size"))
def _empty_state(params, cfg, batch_size, start_position):
  return empty_state(params, cfg, batch_size, start_position)


def _param(value, names) -> nnx.Param:
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class DecoderLayers(nnx.Module):
  """The parameters of all layers, stacked on a leading layer axis for the scan over layers."""

  def __init__(self, values: dict):
    for name, value in values.items():
      setattr(self, name, _param(value, params_lib.LOGICAL_AXES["layers"][name]))


class Transformer(nnx.Module):
  """A Llama-family decoder with `full`, `bswa` or `fam` attention (spec ../shared/docs/fam.md), or the
  `swa` ablation (docs/ablations.md).

  Usage:
    model = Transformer(ModelConfig(...), rngs=nnx.Rngs(0))
    logits = model(tokens)                              # [B, T] -> [B, T, V], the parallel forward
    state = model.init_state(batch_size)
    logits, state = model.stream(chunk, state)          # any chunk length; equals the parallel forward
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, params: dict | None = None):
    self.config = config
    if params is None:
      params = params_lib.init_params(config, (rngs or nnx.Rngs(0)).params())
    _check_params(config, params)
    self.layers = DecoderLayers(params["layers"])
    for name in ("embed", "final_norm", "lm_head", "fam_prompt"):
      if name in params:
        setattr(self, name, _param(params[name], params_lib.LOGICAL_AXES[name]))

  # -- parameters --------------------------------------------------------------------------------
  def params_dict(self) -> dict:
    """The parameter arrays in the layout of famjax.model.params (a plain nested dict)."""
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  # -- the parallel forward ----------------------------------------------------------------------
  def __call__(self, tokens: jax.Array, *, token_mask: jax.Array | None = None,
               position_offset: jax.Array | None = None, fam_state: FamState | None = None,
               segment_ids: jax.Array | None = None, return_fam_state: bool = False):
    """Logits [B, T, V] (float32) of `tokens` [B, T].

    token_mask: [B, T], False for padding: padding keys are masked everywhere and a block holding
      padding does not update the FAM.
    position_offset: [B] Random Position Offset (spec §6), added to every position (tokens and FAM)
      before the angles are computed. famjax computes angles from block-relative positions, so in exact
      arithmetic the offset cancels; what it does change is float32 rounding: relative positions plus
      an offset up to 2*pi*theta give angles as large, and as coarsely rounded, as the absolute angles
      of the paper's implementation. So it reproduces that training setting; it is not a true shift of
      positions. Leave it None (0) at evaluation and inference.
    fam_state: start every layer from this FAM instead of the prompt's (Random State Passing, §6).
    segment_ids: [B, T] ids of packed examples (0: padding); tokens attend only within their own
      example, and in fam every example starts from the initial FAM (exactly as if alone when it starts
      at a block boundary; famjax.model.fam.fam_restarts). The paper packs without such masks.
    return_fam_state: also return the final FamState (after the last complete block).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    return _parallel(self.params_dict(), self.config, tokens, fam_state, token_mask, position_offset,
                     segment_ids, return_fam_state)

  def prompt_fam(self) -> jax.Array:
    """The initial FAM of each layer from the learned prompt, [L, F, D] (spec §4)."""
    return prompt_fam(self.params_dict(), self.config)

  # -- streaming ---------------------------------------------------------------------------------
  def init_state(self, batch_size: int, start_position: int = 0) -> StreamState:
    """The state before the first token of a stream that starts at absolute `start_position`."""
    return _empty_state(self.params_dict(), self.config, batch_size, start_position)

  def stream(self, tokens: jax.Array, state: StreamState) -> tuple[jax.Array, StreamState]:
    """Logits [B, n, V] of the next `n >= 1` tokens of a stream, and the state after them."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
      raise ValueError(f"tokens must be [batch, n >= 1], got shape {tokens.shape}")
    if tokens.shape[0] != state.fam_from_prompt.shape[0]:
      raise ValueError(f"tokens has batch {tokens.shape[0]}, the state {state.fam_from_prompt.shape[0]}")
    cfg, n = self.config, tokens.shape[1]
    if cfg.uses_blocks:
      S = cfg.block_size
      max_pending = 0 if state.aligned else S - 1
      logits, new = _stream(self.params_dict(), cfg, tokens, state, max_pending)
      return logits, new.replace(aligned=state.aligned and n % S == 0)
    state = _grow_cache(state, n)
    return _stream(self.params_dict(), cfg, tokens, state, 0)


def _grow_cache(state: StreamState, n: int) -> StreamState:
  """full attention: make the cache hold context + n tokens (capacity doubles, so few recompiles)."""
  need = int(state.context) + n
  cap = state.k.shape[2]
  if need <= cap:
    return state
  new_cap = max(need, 2 * cap, 64)
  pad = ((0, 0), (0, 0), (0, new_cap - cap), (0, 0), (0, 0))
  return state.replace(k=jnp.pad(state.k, pad), v=jnp.pad(state.v, pad))


def _check_params(cfg: ModelConfig, params: dict) -> None:
  """Every expected parameter present with its shape, nothing unexpected."""
  expected = params_lib.param_shapes(cfg)
  got = jax.tree.map(lambda a: tuple(a.shape), params)
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(
      expected, is_leaf=lambda x: isinstance(x, tuple))[0])
  flat_got = dict(jax.tree_util.tree_flatten_with_path(got, is_leaf=lambda x: isinstance(x, tuple))[0])
  name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
  for path, shape in flat_expected.items():
    if path not in flat_got:
      raise ValueError(f"parameter {name(path)} is missing (expected shape {shape})")
    if flat_got[path] != shape:
      raise ValueError(f"parameter {name(path)} has shape {flat_got[path]}, expected {shape}")
  extra = set(flat_got) - set(flat_expected)
  if extra:
    raise ValueError(f"unexpected parameters for this config: {sorted(name(p) for p in extra)}")
