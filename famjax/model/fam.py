"""One TransformerFAM decoder layer over a chunk of tokens: the algorithm of spec §2-§5, run as §9 says.

Read this file next to ../shared/docs/fam.md. A layer sees a chunk of `n` new tokens and its context (the
streaming state of this layer): the raw keys/values of the last `m` complete blocks and of the pending
partial block, and its FAM. The parallel forward is the same function on an empty context, so streaming
equals the parallel forward by construction, and the tests check both against a slow reference.

The execution order (spec §9):
  1. project all new tokens at once (q, k, v);
  2. `lax.scan` over blocks carrying only the F x D FAM state: an F-row attention + MLP per block;
  3. the block attention of every block at once, given the FAM each block saw (or
     `ModelConfig.attention_chunk` blocks at a time, their key/value windows and scores built inside
     the group and recomputed in the backward pass);
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


def _fam_step(p, cfg, fam, from_prompt, hist, hist_valid, k_blk, v_blk, valid_blk, offset):
  """One block of the FAM scan: the update (spec §3 step 3) and the FAM keys/values the block's tokens
  read (F_prev's, after the older states' with fam_history > 1) with their mask [B, k*F]."""
  new, kF, vF = fam_update(p, cfg, fam, from_prompt, k_blk, v_blk, valid_blk, offset)
  mask = jnp.ones(kF.shape[:2], bool)  # the spec's F_{tau-1}: always there
  if cfg.fam_history > 1:
    kH, vH, mH = history_keys(p, cfg, hist, hist_valid, offset)
    kF, vF = jnp.concatenate([kH, kF], axis=1), jnp.concatenate([vH, vF], axis=1)
    mask = jnp.concatenate([mH, mask], axis=1)
    hist, hist_valid = _push_history(hist, hist_valid, fam, jnp.all(valid_blk, axis=-1))
  return new, hist, hist_valid, kF, vF, mask


def fam_restarts(p: dict, cfg: ModelConfig, fam0: jax.Array, from_prompt0: jax.Array, hist0, hist_valid0,
                 k_blocks, v_blocks, valid, seg, offset):
  """The FAM scan of a chunk of packed examples (segment ids `seg` [B, C, S], 0 = padding) **[famjax]**.

  Masking between packed examples is not in the paper (it packs without masks); famjax defines it so
  that every example of a row computes what it would alone in its row: a block whose first token starts
  another example than the one the FAM belongs to restarts the FAM from `fam0` (the state the chunk
  started from: the prompt's, or a passed state under RSP, with its `from_prompt` flag), and the FAM
  updates only from a complete block of its own example. Exact when every example starts at a block
  boundary (DataConfig.pack_align); an example that starts inside a block reads no FAM there.
  Padding blocks (segment 0) leave the FAM as it is, so the returned state is the last example's.
  With fam_history > 1 a restart empties the history (hist0, hist_valid0: the chunk's).

  Returns (F after the chunk [B, F, D], its history and validity, kF, vF [C, B, k*F, K, H] and their
  mask [C, B, k*F] (the FAM states each block saw; None with fam_history = 1: all there), the example id
  of that FAM per block [B, C]).
  """
  def step(carry, blk):
    fam, from_prompt, owner, hist, hist_valid = carry
    k_blk, v_blk, valid_blk, seg_blk = blk
    first = seg_blk[:, 0]
    restart = (first > 0) & (first != owner)
    fam = jnp.where(restart[:, None, None], fam0, fam)
    from_prompt = jnp.where(restart, from_prompt0, from_prompt)
    hist_valid = jnp.where(restart[:, None], False, hist_valid)
    owner = jnp.where(restart, first, owner)
    own = valid_blk & (seg_blk == owner[:, None])  # an example's last, shared block does not update
    fam, hist, hist_valid, kF, vF, mask = _fam_step(p, cfg, fam, from_prompt, hist, hist_valid, k_blk,
                                                    v_blk, own, offset)
    carry = (fam, from_prompt & ~jnp.all(own, axis=-1), owner, hist, hist_valid)
    return carry, (kF, vF, owner, None if cfg.fam_history == 1 else mask)

  blocks_first = lambda a: jnp.moveaxis(a, 1, 0)
  (fam, _, _, hist, hist_valid), (kF, vF, owner, mask) = jax.lax.scan(
      step, (fam0, from_prompt0, seg[:, 0, 0], hist0, hist_valid0),
      (blocks_first(k_blocks), blocks_first(v_blocks), blocks_first(valid), blocks_first(seg)))
  return fam, hist, hist_valid, kF, vF, mask, jnp.moveaxis(owner, 0, 1)


def block_attention_layer(p: dict, cfg: ModelConfig, q, k, v, ctx: LayerContext, info: ChunkInfo,
                          max_pending: int):
  """bswa / fam attention of a chunk's queries (spec §2, §3 step 2), plus the layer's next context.

  q [B, n, N, H], k/v [B, n, K, H] are the new tokens' projections. The chunk continues the pending
  block: new token i sits at slot `pending + i` of the chunk's blocks. `max_pending` (static) bounds
  `pending` and so fixes how many blocks the chunk spans.
  """
  S, m = cfg.block_size, cfg.memory_blocks  # m: mem_segments, or the blocks a swa window covers
  Bsz, n, K, H = k.shape
  C = -(-(max_pending + n) // S)  # blocks the chunk touches
  start = info.pending

  def lay_out(new, pending_block, fill):
    """New rows at slots start..start+n-1 of C blocks, after the pending rows: [B, C, S, ...]."""
    buf = jnp.full((Bsz, C * S) + new.shape[2:], fill, new.dtype)
    if max_pending and pending_block is not None:
      buf = buf.at[:, :S].set(pending_block)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, new, start, axis=1)
    return buf.reshape((Bsz, C, S) + new.shape[2:])

  mem_k, pend_k = ctx.k[:, :m * S].reshape(Bsz, m, S, K, H), ctx.k[:, m * S:]
  mem_v, pend_v = ctx.v[:, :m * S].reshape(Bsz, m, S, K, H), ctx.v[:, m * S:]
  kb = lay_out(k, pend_k, 0)
  vb = lay_out(v, pend_v, 0)
  slot = jnp.arange(C * S).reshape(C, S)
  valid = jnp.broadcast_to(slot < start + n, (Bsz, C, S))
  if info.token_valid is not None:
    valid = valid & lay_out(info.token_valid, None, True)

  # Memory: the context's m blocks, then the chunk's own; block c's memory is ext[c .. c+m-1].
  mem_valid = jnp.broadcast_to((jnp.arange(m) >= m - info.context)[None, :, None], (Bsz, m, S))
  ext_k = jnp.concatenate([mem_k, kb], axis=1)
  ext_v = jnp.concatenate([mem_v, vb], axis=1)
  ext_valid = jnp.concatenate([mem_valid, valid], axis=1)

  def block_positions(shift):  # positions of a block starting `shift` tokens before the query block
    return _positions(jnp.arange(S) - shift, info.position_offset)[..., None, :]  # [(B,) 1, S]

  # Query rows [B, C, Q, N, H] and their slots in their block [C, Q]. A chunk inside one block (decode)
  # computes only its n rows; otherwise every slot of every block, of which n are kept.
  if C == 1:
    q_slot = (start + jnp.arange(n))[None]
    q_rows = q[:, None]
  else:
    q_slot = jnp.broadcast_to(jnp.arange(S), (C, S))
    q_rows = lay_out(q, None, 0)
  Q = q_slot.shape[1]
  q_rot = rope(q_rows, _positions(q_slot, info.position_offset), cfg.rope_theta)

  k_self = rope(kb, block_positions(0), cfg.rope_theta)
  # What the attention of each query block reads: rows [B, C, ...], one entry per query block; ext
  # [B, m + C, ...], the blocks memory keys come from (see _in_groups).
  rows = {"q": q_rot, "k": k_self, "v": vb, "valid": valid}
  ext = {"k": ext_k, "v": ext_v, "valid": ext_valid}
  if info.segment_ids is not None:  # packed examples' ids, for the masks
    seg = lay_out(info.segment_ids, None, -1)
    q_seg = info.segment_ids[:, None] if C == 1 else seg
    rows["seg"] = q_seg
    ext["seg"] = jnp.concatenate([jnp.full((Bsz, m, S), -1, seg.dtype), seg], axis=1)

  new_fam, new_hist, new_hist_valid = ctx.fam, ctx.fam_hist, ctx.fam_hist_valid
  if cfg.has_fam:
    # Step 2 of spec §9: the only sequential part, F rows per block (k*F keys with fam_history = k).
    blocks_first = lambda a: jnp.moveaxis(a, 1, 0)
    if info.segment_ids is None:
      def step(carry, blk):
        fam, from_prompt, hist, hist_valid = carry
        k_blk, v_blk, valid_blk = blk
        fam, hist, hist_valid, kF, vF, mask = _fam_step(p, cfg, fam, from_prompt, hist, hist_valid, k_blk,
                                                        v_blk, valid_blk, info.position_offset)
        carry = (fam, from_prompt & ~jnp.all(valid_blk, axis=-1), hist, hist_valid)
        return carry, ((kF, vF) if cfg.fam_history == 1 else (kF, vF, mask))

      (new_fam, _, new_hist, new_hist_valid), seen = jax.lax.scan(
          step, (ctx.fam, info.fam_from_prompt, ctx.fam_hist, ctx.fam_hist_valid),
          (blocks_first(k_self), blocks_first(vb), blocks_first(valid)))
      if cfg.fam_history == 1:  # the spec: F_{c-1} only, always there
        (kF, vF), fam_mask = seen, jnp.ones((Bsz, C, Q, cfg.fam_len), bool)
      else:
        kF, vF, fam_mask = seen
        fam_mask = jnp.moveaxis(fam_mask, 0, 1)[:, :, None]  # [B, C, 1, k*F]
    else:
      new_fam, new_hist, new_hist_valid, kF, vF, fam_mask, fam_seg = fam_restarts(
          p, cfg, ctx.fam, info.fam_from_prompt, ctx.fam_hist, ctx.fam_hist_valid, k_self, vb, valid, seg,
          info.position_offset)
      # A query reads the FAM only if it belongs to its example (an example that starts inside a block
      # reads no FAM in that block); [B, C, Q, k*F].
      same = (q_seg == fam_seg[:, :, None])[..., None]
      fam_mask = jnp.broadcast_to(same, (Bsz, C, Q, cfg.fam_len)) if fam_mask is None else \
          same & jnp.moveaxis(fam_mask, 0, 1)[:, :, None]
    # [B, C, k*F, K, H]: the FAM block c saw (F_{c-1}, older ones first)
    rows.update(fam_k=jnp.moveaxis(kF, 0, 1), fam_v=jnp.moveaxis(vF, 0, 1), fam_mask=fam_mask)

  def attend_group(rows, ext):
    """The attention of G query blocks (rows [B, G, ...]) given their memory blocks (ext [B, m+G, ...])."""
    G = rows["q"].shape[1]
    slots = q_slot[:G]
    if info.segment_ids is not None:  # a key from another packed example counts as padding
      same_example = lambda j, seen: seen & (rows["seg"][:, :, :, None]
                                             == ext["seg"][:, m - j:m - j + G, None, :])
    else:
      same_example = lambda j, seen: seen

    def sliding(mask, j):
      """[famjax ablation] swa: a key j*S + q_slot - key_slot tokens back is seen only if < window."""
      if cfg.attention != "swa":
        return mask
      return mask & ((j * S + slots[:, :, None] - jnp.arange(S)[None, None, :]) < cfg.window)  # [G, Q, S]

    def memory(x):
      """[famjax ablation] mem_stop_gradient: memory keys/values as Transformer-XL's cached memory."""
      return jax.lax.stop_gradient(x) if cfg.mem_stop_gradient else x

    keys, values = [rows["k"]], [rows["v"]]
    causal = jnp.arange(S)[None, None, :] <= slots[:, :, None]  # [G, Q, S]
    masks = [sliding(same_example(0, causal & rows["valid"][:, :, None, :]), 0)]
    for j in range(1, m + 1):  # memory block j blocks back: whole, no sliding mask (spec §2; swa: sliding)
      keys.append(memory(rope(ext["k"][:, m - j:m - j + G], block_positions(j * S), cfg.rope_theta)))
      values.append(memory(ext["v"][:, m - j:m - j + G]))
      seen = same_example(j, ext["valid"][:, m - j:m - j + G, None, :]) & jnp.ones((Q, 1), bool)
      masks.append(sliding(seen, j))
    if cfg.has_fam:
      keys.append(rows["fam_k"])
      values.append(rows["fam_v"])
      masks.append(rows["fam_mask"])
    masks = [jnp.broadcast_to(mask, (Bsz, G, Q, mask.shape[-1])) for mask in masks]
    return _attention(cfg)(rows["q"], jnp.concatenate(keys, axis=2), jnp.concatenate(values, axis=2),
                           jnp.concatenate(masks, axis=-1))

  out = _in_groups(cfg, attend_group, rows, ext, m)
  if C == 1:
    out = out[:, 0]
  else:
    out = jax.lax.dynamic_slice_in_dim(out.reshape(Bsz, C * S, *out.shape[-2:]), start, n, axis=1)

  # Next context: the m blocks before the (new) pending block, then that block.
  complete_blocks = (start + n) // S
  pad = lambda a: jnp.concatenate([a, jnp.zeros_like(a[:, :1])], axis=1)
  window = lambda a: jax.lax.dynamic_slice_in_dim(pad(a), complete_blocks, m + 1, axis=1).reshape(
      Bsz, (m + 1) * S, K, H)
  return out, LayerContext(window(ext_k), window(ext_v), new_fam, new_hist, new_hist_valid)


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
