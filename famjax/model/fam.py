"""One TransformerFAM decoder layer over a chunk of tokens: the algorithm of spec §2-§5, run as §9 says.

Read this file next to ../shared/docs/fam.md. A layer sees a chunk of `n` new tokens and its context (the
streaming state of this layer): the raw keys/values of the last `m` complete blocks and of the pending
partial block, and its FAM. The parallel forward is the same function on an empty context, so streaming
equals the parallel forward by construction, and the tests check both against a slow reference.

The execution order (spec §9; `block_attention_layer` runs steps 2 and 3):
  1. project all new tokens at once (q, k, v);
  2. `lax.scan` over blocks carrying only the F x D FAM state: an F-row attention + MLP per block
     (`fam_scan`, one step `fam_scan_step`, the same with or without packed examples);
  3. the block attention of every block at once, given the FAM each block saw (`attend_blocks` of the
     blocks laid out by `key_blocks` and `query_blocks`; or `ModelConfig.attention_chunk` blocks at a
     time, `_in_groups`, their key/value windows and scores built inside the group and recomputed in
     the backward pass);
  4. the output projection and MLP of all tokens (in `decoder_layer`; or `ModelConfig.mlp_chunk`
     tokens at a time).
No L x L score matrix exists: per row and head the scores are [blocks, S, (m+1)*S + F], memory
O(L * (m+1) * S), or O(k * S * ((m+1)*S + F)) with attention_chunk k.

Letters in the shapes of this file: B batch (as in the einsum strings, where T is tokens), S block size,
C blocks of a chunk, m memory blocks, F FAM length, D model width, N query heads, K key/value heads,
H head size, n new tokens of a chunk.

Rotary positions (spec §5): every angle is computed from a position relative to the start of the block
whose queries use it, so angles stay small and exact on unbounded streams. Keys are kept unrotated in the
state and rotated at use. Only `position_offset` (RPO, spec §6) adds a large number, on purpose.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from famjax.model import lora, pallas_attention
from famjax.model.config import ModelConfig
from famjax.model.layers import attend, dot_product_attention, rms_norm, rope, swiglu


class LayerContext(NamedTuple):
  """What one layer keeps between chunks (the per-layer slice of StreamState).

  k, v: raw (unrotated) keys/values [B, W, K, H]. bswa/fam: W = (m+1)*S, the m memory blocks (oldest
    first) then the pending partial block. full: the key/value cache, W = its capacity.
  fam: this layer's FAM [B, F, D] (F = 0 without FAM).
  fam_hist: the k-1 FAM states before `fam` [B, k-1, F, D], oldest first (ModelConfig.fam_history = k;
    [B, 0, F, D] by default); fam_hist_valid [B, k-1]: False for a state that does not exist (yet).
  """

  k: jax.Array
  v: jax.Array
  fam: jax.Array
  fam_hist: jax.Array
  fam_hist_valid: jax.Array


class ChunkInfo(NamedTuple):
  """Counters shared by all layers (every layer advances over the same tokens).

  context: bswa/fam: how many of the m memory slots hold a real block; full: cached tokens.
  pending: bswa/fam: tokens already in the pending block (the chunk continues it).
  fam_from_prompt: [B] True while the FAM is still the prompt's (its first update uses residual 0, §3).
  token_valid: [B, n] False marks padding, or None.
  segment_ids: [B, n] packed-example ids (0: padding); tokens attend only within their example, and in
    fam each example starts from the FAM the chunk started from (see `fam_restarts`). None: no masking
    between examples (the paper's packing). Only from an empty context.
  position_offset: [B] float RPO offset (spec §6), or None.
  """

  context: jax.Array
  pending: jax.Array
  fam_from_prompt: jax.Array
  token_valid: jax.Array | None
  segment_ids: jax.Array | None
  position_offset: jax.Array | None


def _positions(rel: jax.Array, offset: jax.Array | None) -> jax.Array:
  """Relative positions `rel` [..., T], plus the per-example RPO offset [B] broadcast in front."""
  rel = rel.astype(jnp.float32)
  if offset is None:
    return rel
  return offset.reshape(offset.shape + (1,) * rel.ndim) + rel


def fam_positions(cfg: ModelConfig) -> jax.Array:
  """Positions [F] of a FAM state's rows relative to the first token of the block that reads it, i.e.
  the state compressed the block at -B .. -1 (ModelConfig.fam_position; the one rule, spec §5):
    "last" (the spec): -F .. -1, the last F positions of the compressed block;
    "between" **[famjax ablation]**: row i at (i+1)*B/F - 1 - B, evenly spaced over it (the last row at -1);
    "zero" **[famjax ablation]**: every row at -B, the compressed block's first position.
  The initial state uses the same positions (as if it had compressed a block just before the first
  token), and so does the prompt pass (§4).
  """
  F, S = cfg.fam_len, cfg.block_size
  if cfg.fam_position == "between":
    return jnp.asarray(np.arange(1, F + 1) * (S / F) - 1 - S, jnp.float32)
  if cfg.fam_position == "zero":
    return jnp.full((F,), -S, jnp.float32)
  return jnp.arange(-F, 0)


def _attention(cfg: ModelConfig) -> Callable:
  """The attention kernel of the block and full attention (attention_impl): `attend`, the Pallas kernel
  (famjax.model.pallas_attention, the same contract and mask) or a fused one."""
  if cfg.attention_impl == "xla":
    return attend
  if cfg.attention_impl == "pallas":
    return pallas_attention.attend
  return functools.partial(dot_product_attention, implementation=cfg.attention_impl)


def _in_groups(cfg: ModelConfig, attend_group: Callable, rows: dict, ext: dict, m: int) -> jax.Array:
  """`attend_group(rows, ext)` of a chunk's C query blocks: rows holds arrays [B, C, ...] (one entry per
  query block), ext arrays [B, m + C, ...] (the m memory blocks before the first query block, then the C
  blocks), so that query block c's memory is ext[:, c .. c+m-1].

  All blocks at once, or (attention_chunk = G > 0, more than G blocks) G blocks at a time in a lax.map
  whose body is under jax.checkpoint: a group's key/value windows and scores exist only inside it, in
  the forward pass and in the backward pass, which recomputes them. The last group is padded with blocks
  whose keys are all masked (a False "valid"), whose outputs are dropped.
  """
  G, C = cfg.attention_chunk, rows["q"].shape[1]
  if not G or C <= G:
    return attend_group(rows, ext)
  groups = -(-C // G)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, groups * G - C)] + [(0, 0)] * (x.ndim - 2))  # zeros, False
  split = lambda x: jnp.moveaxis(pad(x).reshape(x.shape[0], groups, G, *x.shape[2:]), 1, 0)
  ext = jax.tree.map(pad, ext)

  def group(args):  # group g: query blocks gG .. gG+G-1 and their memory blocks
    g, rows_g = args
    ext_g = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, g * G, m + G, axis=1), ext)
    return attend_group(rows_g, ext_g)

  out = jax.lax.map(jax.checkpoint(group, prevent_cse=False),
                    (jnp.arange(groups), jax.tree.map(split, rows)))
  return jnp.moveaxis(out, 0, 1).reshape(out.shape[1], groups * G, *out.shape[3:])[:, :C]


def _token_groups(x: jax.Array, size: int) -> jax.Array:
  """[B, n, D] -> [groups, B, size, D], the last group padded with zeros."""
  Bsz, n, D = x.shape
  groups = -(-n // size)
  x = jnp.pad(x, ((0, 0), (0, groups * size - n), (0, 0)))
  return jnp.moveaxis(x.reshape(Bsz, groups, size, D), 1, 0)


def _ungroup_tokens(x: jax.Array, n: int) -> jax.Array:
  """[groups, B, size, D] -> [B, n, D] (the inverse of _token_groups)."""
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, x.shape[-1])[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def chunked_mlp(eps: float, size: int, weights: dict, a: jax.Array) -> jax.Array:
  """_mlp_block(weights, a) for a [B, n, D], `size` tokens at a time (ModelConfig.mlp_chunk).

  Forward: a lax.map over groups of tokens, so one group's [B, size, mlp_dim] activations exist at a
  time. Backward (hand-written): a scan over the groups that recomputes each group's MLP, takes its
  vjp, and sums the weights' gradients in float32 (cast to the weights' dtype once, at the end, as the
  unchunked matmul's gradient is). Residuals: the input and the weights only.
  """
  return _chunked_mlp_fwd(eps, size, weights, a)[0]


def _chunked_mlp_fwd(eps, size, weights, a):
  out = jax.lax.map(lambda x: _mlp_block(weights, x, eps), _token_groups(a, size))
  return _ungroup_tokens(out, a.shape[1]), (weights, a)


def _chunked_mlp_bwd(eps, size, residuals, d_out):
  weights, a = residuals

  def group(acc, xs):
    x, dy = xs
    _, vjp = jax.vjp(lambda w, x: _mlp_block(w, x, eps), weights, x)
    dw, dx = vjp(dy)
    return jax.tree.map(lambda total, g: total + g.astype(jnp.float32), acc, dw), dx

  zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), weights)
  dw, dx = jax.lax.scan(group, zeros, (_token_groups(a, size), _token_groups(d_out, size)))
  return jax.tree.map(lambda g, w: g.astype(w.dtype), dw, weights), _ungroup_tokens(dx, a.shape[1])


chunked_mlp.defvjp(_chunked_mlp_fwd, _chunked_mlp_bwd)


MLP_WEIGHTS = ("mlp_norm", "gate", "up", "down")


def token_mlp(p: dict, cfg: ModelConfig, a: jax.Array) -> jax.Array:
  """O = A + MLP(RMSNorm(A)) for a chunk's tokens a [B, n, D]: all at once, or ModelConfig.mlp_chunk
  tokens at a time (chunked_mlp)."""
  if not cfg.mlp_chunk or a.shape[1] <= cfg.mlp_chunk:
    return _mlp_block(p, a, cfg.rms_eps)
  return chunked_mlp(cfg.rms_eps, cfg.mlp_chunk, {name: p[name] for name in MLP_WEIGHTS}, a)


def _project_qkv(p: dict, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  q = jnp.einsum("BTD,DNH->BTNH", h, p["q"])
  k = jnp.einsum("BTD,DKH->BTKH", h, p["k"])
  v = jnp.einsum("BTD,DKH->BTKH", h, p["v"])
  return checkpoint_name(q, "qkv"), checkpoint_name(k, "qkv"), checkpoint_name(v, "qkv")


def _mlp_block(p: dict, a: jax.Array, eps: float) -> jax.Array:
  """O = A + MLP(RMSNorm(A)) (spec §1)."""
  return a + swiglu(rms_norm(a, p["mlp_norm"], eps), p["gate"], p["up"], p["down"])


def _gated(p: dict, cfg: ModelConfig, fam: jax.Array, new: jax.Array) -> jax.Array:
  """**[famjax extension]** F_prev + g * (F_cand - F_prev), g = sigmoid(w . RMSNorm(F_cand - F_prev) + b)
  per FAM row [B, F] (b [F]: a bias per row): a layer can keep its FAM unchanged over a block (g -> 0), which the spec's residual
  update cannot (its state grows with every block read)."""
  delta = new.astype(jnp.float32) - fam.astype(jnp.float32)
  unit = delta * jax.lax.rsqrt(jnp.mean(delta * delta, axis=-1, keepdims=True) + cfg.rms_eps)
  gate = jax.nn.sigmoid(jnp.einsum("BFD,D->BF", unit, p["fam_gate"].astype(jnp.float32))
                        + p["fam_gate_bias"].astype(jnp.float32))
  return (fam.astype(jnp.float32) + gate[..., None] * delta).astype(new.dtype)


def fam_update(p: dict, cfg: ModelConfig, fam: jax.Array, from_prompt: jax.Array, k_block: jax.Array,
               v_block: jax.Array, block_valid: jax.Array, offset: jax.Array | None):
  """Spec §3 steps 1 and 3 for one block: the FAM queries read [own FAM, whole block] -> F_new.

  fam [B, F, D] is F_prev at `fam_positions(cfg)` (-F..-1 in the spec) relative to the block; k_block
  [B, S, K, H] is already rotated at 0..S-1. Returns (F_next, kF, vF), kF/vF being F_prev's keys/values
  that the block's tokens attend to (step 2). F_next = F_prev unless the block is complete (famjax:
  updates on complete blocks).
  """
  F = fam.shape[1]
  fam_pos = _positions(fam_positions(cfg), offset)
  qF, kF, vF = _project_qkv(p, rms_norm(fam, p["attn_norm"], cfg.rms_eps))  # same weights and norm
  qF, kF = rope(qF, fam_pos, cfg.rope_theta), rope(kF, fam_pos, cfg.rope_theta)
  keys = jnp.concatenate([kF, k_block], axis=1)
  values = jnp.concatenate([vF, v_block], axis=1)
  # FAM->FAM bidirectional; every FAM query sees the whole current block (not the memory); padding out.
  mask = jnp.concatenate([jnp.ones((fam.shape[0], F), bool), block_valid], axis=1)[:, None, :]
  read = attend(qF, keys, values, mask)
  residual = jnp.where(from_prompt[:, None, None], jnp.zeros_like(fam), fam)  # R = 0 after the prompt
  af = residual + jnp.einsum("BFNH,NHD->BFD", read, p["o"])
  new = _mlp_block(p, af, cfg.rms_eps)
  if cfg.fam_gate:  # famjax extension, off by default (ModelConfig.fam_gate); the first update ungated
    new = jnp.where(from_prompt[:, None, None], new, _gated(p, cfg, fam, new))
  complete = jnp.all(block_valid, axis=-1)
  return jnp.where(complete[:, None, None], new, fam), kF, vF


def history_keys(p: dict, cfg: ModelConfig, hist: jax.Array, hist_valid: jax.Array, offset):
  """**[famjax ablation: ModelConfig.fam_history = k > 1]** keys/values of the k-1 FAM states before
  F_prev, for the block tokens: hist [B, k-1, F, D] (oldest first), each at the positions of the block it
  compressed, i.e. `fam_positions` shifted back one block per step of age. Returns kH, vH
  [B, (k-1)*F, K, H] and their mask [B, (k-1)*F] (False for a state that does not exist)."""
  Bsz, k1, F, D = hist.shape
  age = np.arange(k1, 0, -1)  # the oldest state is k-1 blocks before F_prev
  rel = (fam_positions(cfg)[None, :] - cfg.block_size * jnp.asarray(age)[:, None]).reshape(-1)
  rows = hist.reshape(Bsz, k1 * F, D)
  _, kH, vH = _project_qkv(p, rms_norm(rows, p["attn_norm"], cfg.rms_eps))
  kH = rope(kH, _positions(rel, offset), cfg.rope_theta)
  return kH, vH, jnp.repeat(hist_valid, F, axis=1)


def _push_history(hist, hist_valid, fam, updated):
  """The history after a block: F_prev joins it (the oldest leaves) where the FAM `updated` [B]."""
  if hist.shape[1] == 0:
    return hist, hist_valid
  shifted = jnp.concatenate([hist[:, 1:], fam[:, None]], axis=1)
  shifted_valid = jnp.concatenate([hist_valid[:, 1:], jnp.ones_like(hist_valid[:, :1])], axis=1)
  return (jnp.where(updated[:, None, None, None], shifted, hist),
          jnp.where(updated[:, None], shifted_valid, hist_valid))


class FamCarry(NamedTuple):
  """What the FAM scan carries from block to block (spec §9 step 2): the FAM and nothing of the tokens.

  fam [B, F, D]; from_prompt [B] (its next update uses residual 0, §3); hist, hist_valid: the older states
  (LayerContext.fam_hist); owner [B]: the packed example the FAM belongs to (None when not packed).
  """

  fam: jax.Array
  from_prompt: jax.Array
  hist: jax.Array
  hist_valid: jax.Array
  owner: jax.Array | None


def fam_restarts(start: FamCarry, carry: FamCarry, seg_blk: jax.Array, valid_blk: jax.Array):
  """The FAM of packed examples (segment ids, 0 = padding) at one block **[famjax]**: the carry the block
  reads, and which of its tokens [B, S] may update that FAM.

  Masking between packed examples is not in the paper (it packs without masks); famjax defines it so
  that every example of a row computes what it would alone in its row: a block whose first token starts
  another example than the one the FAM belongs to restarts the FAM from `start` (the state the chunk
  started from: the prompt's, or a passed state under RSP, with its `from_prompt` flag), and the FAM
  updates only from a complete block of its own example. Exact when every example starts at a block
  boundary (DataConfig.pack_align); an example that starts inside a block reads no FAM there.
  Padding blocks (segment 0) leave the FAM as it is, so the state after a chunk is the last example's.
  With fam_history > 1 a restart empties the history.
  """
  first = seg_blk[:, 0]
  restart = (first > 0) & (first != carry.owner)
  owner = jnp.where(restart, first, carry.owner)
  carry = FamCarry(fam=jnp.where(restart[:, None, None], start.fam, carry.fam),
                   from_prompt=jnp.where(restart, start.from_prompt, carry.from_prompt),
                   hist=carry.hist, hist_valid=jnp.where(restart[:, None], False, carry.hist_valid),
                   owner=owner)
  own = valid_blk & (seg_blk == owner[:, None])  # an example's last, shared block does not update
  return carry, own


def fam_scan_step(p: dict, cfg: ModelConfig, start: FamCarry, offset, carry: FamCarry, block):
  """One block of the FAM scan (spec §9 step 2): the FAM keys/values its tokens read (§3 step 2) and
  the FAM after it (§3 steps 1 and 3, `fam_update`).

  block: k [B, S, K, H] (rotated at 0..S-1), v, valid [B, S], and seg [B, S] (packed: first the restart
  rule of `fam_restarts`) or None. Returns the next carry and (kF, vF [B, k*F, K, H]: F_prev's, after
  the older states' with fam_history = k > 1; the example the FAM belongs to [B] or None; the mask of
  those k*F keys [B, k*F], or None with fam_history = 1: the spec's F_{tau-1} is always there).
  """
  k_blk, v_blk, valid_blk, seg_blk = block
  if seg_blk is not None:
    carry, valid_blk = fam_restarts(start, carry, seg_blk, valid_blk)
  new, kF, vF = fam_update(p, cfg, carry.fam, carry.from_prompt, k_blk, v_blk, valid_blk, offset)
  hist, hist_valid, mask = carry.hist, carry.hist_valid, None
  if cfg.fam_history > 1:
    kH, vH, mH = history_keys(p, cfg, hist, hist_valid, offset)
    mask = jnp.concatenate([mH, jnp.ones(kF.shape[:2], bool)], axis=1)  # F_prev: always there
    kF, vF = jnp.concatenate([kH, kF], axis=1), jnp.concatenate([vH, vF], axis=1)
    hist, hist_valid = _push_history(hist, hist_valid, carry.fam, jnp.all(valid_blk, axis=-1))
  from_prompt = carry.from_prompt & ~jnp.all(valid_blk, axis=-1)
  return FamCarry(new, from_prompt, hist, hist_valid, carry.owner), (kF, vF, carry.owner, mask)


def fam_scan(p: dict, cfg: ModelConfig, start: FamCarry, k_blocks, v_blocks, valid, seg, offset):
  """Spec §9 step 2, the only sequential part of a layer: a `lax.scan` over the chunk's C blocks that
  carries only the FAM state (`fam_scan_step`, F rows per block).

  start: the layer's FAM before the chunk (its owner unset). k_blocks [B, C, S, K, H] (rotated in their
  blocks), v_blocks, valid [B, C, S]; seg [B, C, S] the packed examples' ids, or None. Returns the state
  after the chunk (a FamCarry), kF, vF [B, C, k*F, K, H] (the FAM states block c saw: F_{c-1}, older
  ones first), their mask [B, C, k*F] (None with fam_history = 1) and the example that FAM belongs to
  [B, C] (None when not packed).
  """
  if seg is not None:  # the FAM the chunk starts from belongs to its first example (`fam_restarts`)
    start = start._replace(owner=seg[:, 0, 0])
  blocks_first = lambda a: None if a is None else jnp.moveaxis(a, 1, 0)
  end, seen = jax.lax.scan(functools.partial(fam_scan_step, p, cfg, start, offset), start,
                           tuple(map(blocks_first, (k_blocks, v_blocks, valid, seg))))
  kF, vF, owner, mask = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), seen)
  return end, kF, vF, mask, owner


def _fam_mask(seen, owner, q_seg, shape) -> jax.Array:
  """Which FAM keys each query of a block reads, [B, C, Q or 1, k*F] (`shape` [B, C, 1, k*F]): all of
  them (spec §3 step 2), but with fam_history > 1 only states that exist (`seen` [B, C, k*F]), and when
  packed only the FAM of the query's own example (an example that starts inside a block reads no FAM
  there; `owner` [B, C], q_seg [B, C, Q])."""
  mask = jnp.ones(shape, bool) if seen is None else seen[:, :, None]
  if owner is not None:
    mask = mask & (q_seg == owner[:, :, None])[..., None]
  return mask


def _lay_out(new: jax.Array, start, C: int, S: int, fill, under: jax.Array | None = None) -> jax.Array:
  """A chunk's rows new [B, n, ...] at slots start .. start+n-1 of its C blocks of S slots: [B, C, S, ...].
  Slots before `start` hold `under` (the pending block's rows, the chunk continuing it; spec §9
  streaming), or `fill` as every other slot does."""
  Bsz = new.shape[0]
  buf = jnp.full((Bsz, C * S) + new.shape[2:], fill, new.dtype)
  if under is not None:
    buf = buf.at[:, :S].set(under)
  buf = jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis=1)
  return buf.reshape((Bsz, C, S) + new.shape[2:])


def _block_positions(S: int, shift: int, offset) -> jax.Array:
  """Positions [(B,) 1, S] of a block that starts `shift` tokens before the query block (spec §5: every
  angle relative to the block whose queries use it)."""
  return _positions(jnp.arange(S) - shift, offset)[..., None, :]


def key_blocks(cfg: ModelConfig, k, v, ctx: LayerContext, info: ChunkInfo, C: int, max_pending: int):
  """The keys/values a chunk's C query blocks read (spec §2), from the new k/v [B, n, K, H] and the
  layer's context.

  Returns rows: the chunk's own blocks, k rotated at 0..S-1 (§5), v, valid [B, C, S]; and ext: the
  context's m memory blocks then the chunk's blocks, unrotated, so that block c's memory is
  ext[:, c .. c+m-1] (k, v [B, m + C, S, K, H], valid [B, m + C, S], and packed: seg, -1 in memory).
  """
  S, m = cfg.block_size, cfg.memory_blocks  # m: mem_segments, or the blocks a swa window covers
  Bsz, n, K, H = k.shape
  start = info.pending
  mem_k, pend_k = ctx.k[:, :m * S].reshape(Bsz, m, S, K, H), ctx.k[:, m * S:]
  mem_v, pend_v = ctx.v[:, :m * S].reshape(Bsz, m, S, K, H), ctx.v[:, m * S:]
  kb = _lay_out(k, start, C, S, 0, pend_k if max_pending else None)
  vb = _lay_out(v, start, C, S, 0, pend_v if max_pending else None)
  slot = jnp.arange(C * S).reshape(C, S)
  valid = jnp.broadcast_to(slot < start + n, (Bsz, C, S))
  if info.token_valid is not None:
    valid = valid & _lay_out(info.token_valid, start, C, S, True)
  mem_valid = jnp.broadcast_to((jnp.arange(m) >= m - info.context)[None, :, None], (Bsz, m, S))
  ext = {"k": jnp.concatenate([mem_k, kb], axis=1), "v": jnp.concatenate([mem_v, vb], axis=1),
         "valid": jnp.concatenate([mem_valid, valid], axis=1)}
  rows = {"k": rope(kb, _block_positions(S, 0, info.position_offset), cfg.rope_theta), "v": vb,
          "valid": valid}
  if info.segment_ids is not None:  # packed examples' ids, for the masks; memory belongs to none
    seg = _lay_out(info.segment_ids, start, C, S, -1)
    ext["seg"] = jnp.concatenate([jnp.full((Bsz, m, S), -1, seg.dtype), seg], axis=1)
  return rows, ext


def query_blocks(cfg: ModelConfig, q, info: ChunkInfo, C: int):
  """A chunk's queries q [B, n, N, H] as rows of its C blocks, rotated at their slot in their block
  (spec §5): [B, C, Q, N, H], their slots [C, Q], and packed their example ids [B, C, Q] (else None).

  A chunk inside one block (C = 1: decode) has only its n rows (Q = n); otherwise every slot of every
  block (Q = S), of which `chunk_outputs` keeps n.
  """
  S, n, start = cfg.block_size, q.shape[1], info.pending
  if C == 1:
    q_slot, q_rows, seg = (start + jnp.arange(n))[None], q[:, None], info.segment_ids
    seg = None if seg is None else seg[:, None]
  else:
    q_slot, q_rows = jnp.broadcast_to(jnp.arange(S), (C, S)), _lay_out(q, start, C, S, 0)
    seg = None if info.segment_ids is None else _lay_out(info.segment_ids, start, C, S, -1)
  return rope(q_rows, _positions(q_slot, info.position_offset), cfg.rope_theta), q_slot, seg


def _sliding_window(cfg: ModelConfig, mask: jax.Array, slots: jax.Array, j: int) -> jax.Array:
  """**[famjax ablation]** swa: a key j*S + q_slot - key_slot tokens back is seen only if < window."""
  if cfg.attention != "swa":
    return mask
  S = cfg.block_size
  return mask & ((j * S + slots[:, :, None] - jnp.arange(S)[None, None, :]) < cfg.window)  # [G, Q, S]


def _as_cached_memory(cfg: ModelConfig, x: jax.Array) -> jax.Array:
  """**[famjax ablation]** mem_stop_gradient: memory keys/values as Transformer-XL's cached memory."""
  return jax.lax.stop_gradient(x) if cfg.mem_stop_gradient else x


def block_keys(cfg: ModelConfig, q_slot, offset, rows: dict, ext: dict):
  """The keys, values and mask of G query blocks (rows [B, G, ...], ext [B, m + G, ...]; see `_in_groups`),
  in spec §2's pattern: the own block causally, the m memory blocks before it whole (swa: a sliding
  window instead), then the FAM keys of §3 step 2 (rows' fam_k, fam_v, fam_mask). Memory keys are
  rotated here, at their offset from the query block (§5). Packed: a key of another example counts as
  padding. Returns keys, values [B, G, R, K, H] and the mask [B, G, Q, R]."""
  S, m = cfg.block_size, cfg.memory_blocks
  Bsz, G = rows["q"].shape[:2]
  slots = q_slot[:G]
  Q = slots.shape[1]
  back = lambda x, j: x[:, m - j:m - j + G]  # the blocks j blocks before the query blocks (j = 0: theirs)
  if "seg" in rows:
    same_example = lambda j, seen: seen & (rows["seg"][:, :, :, None] == back(ext["seg"], j)[:, :, None, :])
  else:
    same_example = lambda j, seen: seen

  keys, values = [rows["k"]], [rows["v"]]
  causal = jnp.arange(S)[None, None, :] <= slots[:, :, None]  # [G, Q, S]
  masks = [_sliding_window(cfg, same_example(0, causal & rows["valid"][:, :, None, :]), slots, 0)]
  for j in range(1, m + 1):  # memory block j blocks back: whole, no sliding mask (spec §2; swa: sliding)
    keys.append(_as_cached_memory(cfg, rope(back(ext["k"], j), _block_positions(S, j * S, offset),
                                            cfg.rope_theta)))
    values.append(_as_cached_memory(cfg, back(ext["v"], j)))
    seen = same_example(j, back(ext["valid"], j)[:, :, None, :]) & jnp.ones((Q, 1), bool)
    masks.append(_sliding_window(cfg, seen, slots, j))
  if cfg.has_fam:
    keys.append(rows["fam_k"])
    values.append(rows["fam_v"])
    masks.append(rows["fam_mask"])
  masks = [jnp.broadcast_to(mask, (Bsz, G, Q, mask.shape[-1])) for mask in masks]
  return jnp.concatenate(keys, axis=2), jnp.concatenate(values, axis=2), jnp.concatenate(masks, axis=-1)


def attend_blocks(cfg: ModelConfig, q_slot, offset, rows: dict, ext: dict) -> jax.Array:
  """Spec §3 step 2's attention (§2's without FAM) of G query blocks: softmax(q.k) v over `block_keys`
  with the kernel of ModelConfig.attention_impl (`_attention`). [B, G, Q, N, H]."""
  keys, values, mask = block_keys(cfg, q_slot, offset, rows, ext)
  return _attention(cfg)(rows["q"], keys, values, mask)


def chunk_outputs(out: jax.Array, start, n: int) -> jax.Array:
  """The rows of the chunk's n tokens [B, n, N, H] from those of its blocks [B, C, Q, N, H]."""
  Bsz, C = out.shape[:2]
  if C == 1:  # Q = n: only the new tokens' rows were computed
    return out[:, 0]
  return jax.lax.dynamic_slice_in_dim(out.reshape(Bsz, C * out.shape[2], *out.shape[3:]), start, n, axis=1)


def next_window(cfg: ModelConfig, ext_x: jax.Array, end) -> jax.Array:
  """The keys (or values) a layer keeps after a chunk that ends at slot `end` of its blocks (spec §9
  streaming state): the m blocks before the new pending block, then that block, [B, (m+1)*S, K, H]."""
  m = cfg.memory_blocks
  complete_blocks = end // cfg.block_size
  padded = jnp.concatenate([ext_x, jnp.zeros_like(ext_x[:, :1])], axis=1)
  kept = jax.lax.dynamic_slice_in_dim(padded, complete_blocks, m + 1, axis=1)
  return kept.reshape(kept.shape[0], -1, *kept.shape[3:])


def block_attention_layer(p: dict, cfg: ModelConfig, q, k, v, ctx: LayerContext, info: ChunkInfo,
                          max_pending: int):
  """bswa / fam attention of a chunk's queries (spec §2, §3 step 2), plus the layer's next context.

  q [B, n, N, H], k/v [B, n, K, H] are the new tokens' projections (§9 step 1). The chunk continues the
  pending block: new token i sits at slot `pending + i` of the chunk's blocks. `max_pending` (static)
  bounds `pending` and so fixes how many blocks the chunk spans.
  """
  n = k.shape[1]
  C = -(-(max_pending + n) // cfg.block_size)  # blocks the chunk touches
  rows, ext = key_blocks(cfg, k, v, ctx, info, C, max_pending)  # each block's keys, and its memory's
  rows["q"], q_slot, q_seg = query_blocks(cfg, q, info, C)
  if q_seg is not None:
    rows["seg"] = q_seg
  fam = FamCarry(ctx.fam, info.fam_from_prompt, ctx.fam_hist, ctx.fam_hist_valid, owner=None)
  if cfg.has_fam:  # §9 step 2: the FAM each block saw, F_{c-1}, from the scan over blocks
    block_seg = None if q_seg is None else ext["seg"][:, cfg.memory_blocks:]
    fam, fam_k, fam_v, seen, owner = fam_scan(p, cfg, fam, rows["k"], rows["v"], rows["valid"], block_seg,
                                              info.position_offset)
    fam_mask = _fam_mask(seen, owner, q_seg, (*fam_k.shape[:2], 1, fam_k.shape[2]))
    rows.update(fam_k=fam_k, fam_v=fam_v, fam_mask=fam_mask)
  # §9 step 3: the attention of every block at once (or attention_chunk blocks at a time)
  attend_group = functools.partial(attend_blocks, cfg, q_slot, info.position_offset)
  out = _in_groups(cfg, attend_group, rows, ext, cfg.memory_blocks)
  window = functools.partial(next_window, cfg, end=info.pending + n)
  next_ctx = LayerContext(window(ext["k"]), window(ext["v"]), fam.fam, fam.hist, fam.hist_valid)
  return chunk_outputs(out, info.pending, n), next_ctx


def full_attention_layer(p: dict, cfg: ModelConfig, q, k, v, ctx: LayerContext, info: ChunkInfo):
  """Causal attention over the cache and the chunk (spec §2, `full`), queries in chunks of block_size.

  Positions are relative to the chunk's first token; cached keys sit at -context..-1.
  """
  del p
  Bsz, n, N, H = q.shape
  cap = ctx.k.shape[1]
  key_pos = jnp.concatenate([jnp.arange(cap) - info.context, jnp.arange(n)])
  key_valid = jnp.concatenate([
      jnp.broadcast_to(jnp.arange(cap) < info.context, (Bsz, cap)),
      jnp.ones((Bsz, n), bool) if info.token_valid is None else info.token_valid], axis=1)
  keys = rope(jnp.concatenate([ctx.k, k], axis=1), _positions(key_pos, info.position_offset),
              cfg.rope_theta)
  values = jnp.concatenate([ctx.v, v], axis=1)
  if info.segment_ids is not None:  # cached keys (none, from an empty context) belong to no example
    key_seg = jnp.concatenate([jnp.full((Bsz, cap), -1, info.segment_ids.dtype), info.segment_ids], 1)

  def queries(q_chunk, q_pos):  # q_chunk [B, S, N, H] at integer positions q_pos [S]
    mask = key_valid[:, None, :] & (key_pos[None, None, :] <= q_pos[None, :, None])
    if info.segment_ids is not None:
      q_seg = jnp.take(info.segment_ids, jnp.minimum(q_pos, n - 1), axis=1)
      mask = mask & (q_seg[:, :, None] == key_seg[:, None, :])
    return _attention(cfg)(rope(q_chunk, _positions(q_pos, info.position_offset), cfg.rope_theta),
                           keys, values, mask)

  S = cfg.block_size
  if n <= S:
    out = queries(q, jnp.arange(n))
  else:  # one query chunk at a time, recomputed in the backward pass: memory O(S * (cap + n))
    C = -(-n // S)
    qc = jnp.pad(q, ((0, 0), (0, C * S - n), (0, 0), (0, 0))).reshape(Bsz, C, S, N, H)
    pos = jnp.arange(C * S).reshape(C, S)
    out = jax.lax.map(jax.checkpoint(lambda a: queries(*a)), (jnp.moveaxis(qc, 1, 0), pos))
    out = jnp.moveaxis(out, 0, 1).reshape(Bsz, C * S, N, H)[:, :n]
  if cap:  # the caller grew the cache to hold context + n
    new_k = jax.lax.dynamic_update_slice_in_dim(ctx.k, k, info.context, axis=1)
    new_v = jax.lax.dynamic_update_slice_in_dim(ctx.v, v, info.context, axis=1)
    ctx = ctx._replace(k=new_k, v=new_v)
  return out, ctx


def decoder_layer(p: dict, cfg: ModelConfig, x: jax.Array, ctx: LayerContext, info: ChunkInfo,
                  max_pending: int):
  """A = X + Attn(RMSNorm(X)); O = A + MLP(RMSNorm(A)) for the chunk x [B, n, D] (spec §1, §3)."""
  q, k, v = _project_qkv(p, rms_norm(x, p["attn_norm"], cfg.rms_eps))
  if cfg.uses_blocks:
    out, ctx = block_attention_layer(p, cfg, q, k, v, ctx, info, max_pending)
  else:
    out, ctx = full_attention_layer(p, cfg, q, k, v, ctx, info)
  a = x + jnp.einsum("BTNH,NHD->BTD", out, p["o"])
  return token_mlp(p, cfg, a), ctx


def prompt_pass(layers: dict, cfg: ModelConfig, prompt: jax.Array) -> jax.Array:
  """Spec §4: each layer's initial FAM from a forward pass of the learned prompt alone.

  Z_1 = prompt (used as the layer-1 input as is), Z_{l+1} = layer_l(Z_l) with bidirectional attention
  among the F prompt rows, at `fam_positions(cfg)`. Returns Z_l for every layer: [L, F, D].
  With remat (ModelConfig.remat other than "none") each layer is recomputed in the backward pass from its
  input, as the layers of the tokens are: only the [L, F, D] inputs are kept, not every layer's
  [F, mlp_dim] activations (3.7 GiB of the 24B step, compiled on XLA:CPU).
  """
  F = prompt.shape[0]
  pos = fam_positions(cfg).astype(jnp.float32)  # -F..-1 by default; only differences matter here
  everyone = jnp.ones((F, F), bool)

  def layer(z, p):
    p = jax.tree.map(lambda w: w.astype(z.dtype), lora.merge_layer(p, z.dtype))
    q, k, v = _project_qkv(p, rms_norm(z[None], p["attn_norm"], cfg.rms_eps))
    read = attend(rope(q, pos, cfg.rope_theta), rope(k, pos, cfg.rope_theta), v, everyone)
    a = z[None] + jnp.einsum("BTNH,NHD->BTD", read, p["o"])
    return _mlp_block(p, a, cfg.rms_eps)[0], z

  if cfg.remat != "none":
    layer = jax.checkpoint(layer, prevent_cse=False)
  _, entering = jax.lax.scan(layer, prompt, layers)
  return entering
