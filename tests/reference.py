"""Slow, literal float64 NumPy reference of the famjax decoder (TransformerFAM, docs/fam.md).

This file is the test oracle for the JAX model. It is written for clarity, not speed: one function per
step of the specification, explicit loops over examples, layers, blocks and heads, float64 throughout
(including the softmax). It imports neither JAX nor famjax; `cfg` only needs the ModelConfig attributes
vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, mlp_dim, attention, block_size,
mem_segments, fam_len, rope_theta, rms_eps, tie_embeddings, embed_scale, and optionally fam_gate and the
ablations of docs/ablations.md: window (attention "swa"), fam_position, fam_init, fam_history
(mem_stop_gradient changes gradients only, not the forward this file computes).

Public API:
  reference_forward(params, cfg, tokens, *, position_offset=0.0, initial_fam=None, return_fam=False)
  reference_params(cfg, seed)

Parameter layout (as famjax.model.params):
  embed [V, D], final_norm [D], lm_head [D, V] (only when not tied), fam_prompt [F, D] (only with FAM),
  layers: attn_norm [L, D], q [L, D, N, H], k [L, D, K, H], v [L, D, K, H], o [L, N, H, D],
          mlp_norm [L, D], gate [L, D, M], up [L, D, M], down [L, M, D],
          fam_gate [L, D], fam_gate_bias [L, F] (only with cfg.fam_gate, a famjax extension).

Conventions resolved here where the spec leaves room (see also the docstrings below):
  * Positions are float64 `p_i = offset_b + i` (spec §2); `offset` may be a scalar or one per example.
  * The FAM state used by block tau has the positions of the last F tokens of block tau-1, i.e.
    start(tau)-F .. start(tau)-1 (spec §5); the initial state takes p_0-F .. p_0-1.
  * The learned-prompt pass (spec §4) runs at positions -F .. -1 (with the fam_position ablation, at the
    initial state's positions); with bidirectional attention among the prompt rows only, the result
    depends only on position differences, so the offset is immaterial.
  * The residual of the FAM update is 0 for the very first update from the learned prompt and F_prev
    otherwise, including the very first update from a passed `initial_fam` (spec §3 step 3, §6 RSP).
  * A trailing partial block updates no FAM (spec §3 [famjax]); its tokens still attend to the memory
    blocks, to the previous FAM state and causally to their own block.
  * Ablations (docs/ablations.md; defaults = the spec):
    - attention "swa" with cfg.window: token i sees tokens j with i - window < j <= i (`swa_mask`).
    - cfg.fam_position: a FAM state's rows sit at "last" (the spec), "between" (row i at the compressed
      block's start + (i+1)*B/F - 1) or "zero" (all at its start) positions of the block it compressed
      (`fam_rows_in_block`); the initial state as if it had compressed the block before p_0; the prompt
      pass at those positions minus B.
    - cfg.fam_init "prefix": layer l's initial FAM is params["layers"]["fam_prefix"][l] as is (no prompt
      pass); its first update uses R = 0, as the prompt's.
    - cfg.fam_history = k: block tokens also see the k-1 FAM states before F_prev (those that exist),
      each at the positions of the block it compressed. The FAM update reads F_prev only.
  * cfg.fam_gate (a famjax extension, not in the spec): every update with R = F_prev becomes
    F_prev + g * (F_new - F_prev) with one gate per FAM row, g = sigmoid(w . RMSNorm(F_new - F_prev) + b)
    (RMSNorm without a scale, b one bias per FAM row). The first update from the learned prompt is not gated.
"""

from __future__ import annotations

import numpy as np

__all__ = ["reference_forward", "reference_params"]


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------

def _head_dim(cfg) -> int:
  """H: cfg.head_dim, or d_model // n_heads when it is None (ModelConfig resolves it the same way)."""
  return int(cfg.head_dim) if cfg.head_dim is not None else cfg.d_model // cfg.n_heads


def _has_fam(cfg) -> bool:
  """A learned prompt and per-layer FAM state exist only for attention == "fam" with F > 0 (spec §2)."""
  return cfg.attention == "fam" and cfg.fam_len > 0


def _to_f64(tree):
  """Convert a nested dict of arrays to float64 numpy arrays."""
  if isinstance(tree, dict):
    return {key: _to_f64(value) for key, value in tree.items()}
  return np.asarray(tree, dtype=np.float64)


def _ablation(cfg, name: str, default):
  """An ablation field of cfg (docs/ablations.md), or its default (the spec) when cfg lacks it."""
  return getattr(cfg, name, default)


def fam_rows_in_block(cfg) -> np.ndarray:
  """Positions [F] of a FAM state's rows relative to the first token of the block it compressed."""
  B, F = cfg.block_size, cfg.fam_len
  where = _ablation(cfg, "fam_position", "last")
  if where == "last":
    return np.arange(B - F, B, dtype=np.float64)          # spec §5: the last F tokens of the block
  if where == "between":
    return np.array([(i + 1) * B / F - 1 for i in range(F)], dtype=np.float64)  # evenly spread
  if where == "zero":
    return np.zeros(F, dtype=np.float64)                  # all at the block's first token
  raise ValueError(f"fam_position {where!r}")


def _layer_weights(params: dict, layer: int) -> dict:
  """The weights of one layer, sliced out of the arrays stacked over layers."""
  return {name: stacked[layer] for name, stacked in params["layers"].items()}


# ----------------------------------------------------------------------------------------------------
# §1 Base decoder building blocks
# ----------------------------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
  """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) * scale (spec §1)."""
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def mlp(h: np.ndarray, w: dict) -> np.ndarray:
  """SwiGLU MLP: down(silu(gate(h)) * up(h)) (spec §1). h: [T, D] (already normalised)."""
  return (silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]


def rope_cos_sin(positions: np.ndarray, head_dim: int, theta: float):
  """cos and sin tables [T, H] of RoPE, HF Llama convention (spec §1).

  inv_freq[i] = theta^(-2i/H) for i < H/2; angle[t, i] = pos[t] * inv_freq[i]; the tables repeat the H/2
  angles twice: concat([angle, angle]).
  """
  positions = np.asarray(positions, dtype=np.float64)
  half = head_dim // 2
  inv_freq = np.array([float(theta) ** (-2.0 * i / head_dim) for i in range(half)], dtype=np.float64)
  angle = positions[:, None] * inv_freq[None, :]               # [T, H/2]
  angle = np.concatenate([angle, angle], axis=-1)              # [T, H]
  return np.cos(angle), np.sin(angle)


def rotate_half(x: np.ndarray) -> np.ndarray:
  """rotate_half(x) = concat([-x2, x1]) with x1, x2 the first and second halves of the last axis."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([-x2, x1], axis=-1)


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
  """Rotate x [T, heads, H] at the positions [T] of its rows: x*cos + rotate_half(x)*sin (spec §1)."""
  cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
  return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Multi-head (GQA) attention of the query rows over the key rows.

  q: [Tq, N, H]; k, v: [Tk, K, H]; mask: bool [Tq, Tk], True where query row i may see key row j.
  Query head n uses key/value head n // (N // K). Scores q.k / sqrt(H), softmax over the allowed keys
  (float64). Returns [Tq, N, H].
  """
  n_q_heads, head_dim = q.shape[1], q.shape[2]
  n_kv_heads = k.shape[1]
  group = n_q_heads // n_kv_heads
  out = np.zeros(q.shape, dtype=np.float64)
  for n in range(n_q_heads):
    kv = n // group
    scores = (q[:, n, :] @ k[:, kv, :].T) / np.sqrt(head_dim)  # [Tq, Tk]
    for i in range(q.shape[0]):
      allowed = mask[i]
      assert allowed.any(), "every query row must see at least one key"
      s = scores[i, allowed]
      p = np.exp(s - s.max())
      p = p / p.sum()
      out[i, n, :] = p @ v[allowed, kv, :]
  return out


def attention_sublayer(w: dict, cfg, x_q: np.ndarray, pos_q: np.ndarray,
                       x_kv: np.ndarray, pos_kv: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Attn(RMSNorm(.)) for query rows x_q over key/value rows x_kv (residual NOT included).

  Both row sets go through the SAME attn_norm and q/k/v weights (spec §3 step 1 for FAM rows); RoPE is
  applied to q and k at the positions of their own rows. Output projection 'TNH,NHD->TD'.
  """
  theta = cfg.rope_theta
  h_q = rms_norm(x_q, w["attn_norm"], cfg.rms_eps)
  h_kv = rms_norm(x_kv, w["attn_norm"], cfg.rms_eps)
  q = np.einsum("TD,DNH->TNH", h_q, w["q"])
  k = np.einsum("TD,DKH->TKH", h_kv, w["k"])
  v = np.einsum("TD,DKH->TKH", h_kv, w["v"])
  q = rope(q, pos_q, theta)
  k = rope(k, pos_kv, theta)
  heads = attend(q, k, v, mask)
  return np.einsum("TNH,NHD->TD", heads, w["o"])


def layer_block(w: dict, cfg, x_q: np.ndarray, pos_q: np.ndarray, x_kv: np.ndarray,
                pos_kv: np.ndarray, mask: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
  """One pre-norm decoder layer for the query rows x_q (spec §1, §3 steps 2-3):

    A = R + Attn(RMSNorm(x_q) over RMSNorm(x_kv)),   O = A + MLP(RMSNorm_mlp(A)),

  with R = x_q unless `residual` is given (the FAM update passes R = 0 or F_prev).
  """
  r = x_q if residual is None else residual
  a = r + attention_sublayer(w, cfg, x_q, pos_q, x_kv, pos_kv, mask)
  return a + mlp(rms_norm(a, w["mlp_norm"], cfg.rms_eps), w)


# ----------------------------------------------------------------------------------------------------
# §2 Attention patterns without FAM: full and bswa (one example, one layer)
# ----------------------------------------------------------------------------------------------------

def full_mask(T: int) -> np.ndarray:
  """Plain causal mask: token i sees tokens j <= i (spec §2, full)."""
  return np.array([[j <= i for j in range(T)] for i in range(T)], dtype=bool)


def bswa_mask(T: int, block_size: int, mem_segments: int) -> np.ndarray:
  """Block sliding window (spec §2, bswa): token i of block tau = i // B sees every token of blocks
  tau-m .. tau-1 (whole blocks; missing blocks are absent) plus the tokens j <= i of its own block."""
  mask = np.zeros((T, T), dtype=bool)
  for i in range(T):
    tau = i // block_size
    for j in range(T):
      sigma = j // block_size
      in_memory = tau - mem_segments <= sigma <= tau - 1
      in_own_block_causal = sigma == tau and j <= i
      mask[i, j] = in_memory or in_own_block_causal
  return mask


def swa_mask(T: int, window: int) -> np.ndarray:
  """Token-level sliding window (the ablation "swa", the paper's Figure 1a): token i sees the previous
  `window` tokens, itself included: j with i - window < j <= i."""
  return np.array([[i - window < j <= i for j in range(T)] for i in range(T)], dtype=bool)


def plain_layer(w: dict, cfg, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
  """A full, bswa or swa layer over all T tokens of one example (memory keys come from this layer's
  input)."""
  T = x.shape[0]
  if cfg.attention == "full":
    mask = full_mask(T)
  elif cfg.attention == "swa":
    mask = swa_mask(T, cfg.window)
  else:  # "bswa", or "fam" with fam_len == 0 (spec §2: then fam equals bswa)
    mask = bswa_mask(T, cfg.block_size, cfg.mem_segments)
  return layer_block(w, cfg, x, positions, x, positions, mask)


# ----------------------------------------------------------------------------------------------------
# §4 The initial FAM: a forward pass of the learned prompt alone
# ----------------------------------------------------------------------------------------------------

def prompt_pass(params: dict, cfg) -> list:
  """Initial FAM of every layer from the learned prompt (spec §4 [famjax]).

  Z_1 = fam_prompt (used as is: no sqrt(D) scaling even with embed_scale), Z_{l+1} = layer_l(Z_l), each an
  ordinary decoder layer over the F prompt rows alone with bidirectional attention among them, RoPE at
  positions -F .. -1 (only differences matter). Returns [Z_1, ..., Z_L]: layer l's initial FAM is the
  prompt activation ENTERING layer l.
  """
  F = cfg.fam_len
  positions = fam_rows_in_block(cfg) - cfg.block_size  # -F .. -1 for the spec's "last"
  bidirectional = np.ones((F, F), dtype=bool)
  z = params["fam_prompt"]
  states = []
  for layer in range(cfg.n_layers):
    states.append(z)
    w = _layer_weights(params, layer)
    z = layer_block(w, cfg, z, positions, z, positions, bidirectional)
  return states


# ----------------------------------------------------------------------------------------------------
# §3 Feedback Attention Memory: one layer, one block (Algorithm 2), and one layer over all blocks
# ----------------------------------------------------------------------------------------------------

def fam_block_tokens(w: dict, cfg, x_mem: np.ndarray, pos_mem: np.ndarray, f_prev: np.ndarray,
                     pos_fam: np.ndarray, x_block: np.ndarray, pos_block: np.ndarray) -> np.ndarray:
  """Outputs O of the block tokens (spec §3 step 2).

  Keys/values, in this order: the memory blocks' input tokens (all visible), the F rows of F_prev (all
  visible; with the fam_history ablation, the rows of the older states too, stacked before F_prev's),
  the block's own tokens (causal). A = I + Attn, O = A + MLP(RMSNorm(A)).
  """
  n_mem, F, n_blk = x_mem.shape[0], f_prev.shape[0], x_block.shape[0]
  x_kv = np.concatenate([x_mem, f_prev, x_block], axis=0)
  pos_kv = np.concatenate([pos_mem, pos_fam, pos_block])
  mask = np.zeros((n_blk, n_mem + F + n_blk), dtype=bool)
  mask[:, : n_mem + F] = True
  for i in range(n_blk):
    for j in range(n_blk):
      mask[i, n_mem + F + j] = j <= i
  return layer_block(w, cfg, x_block, pos_block, x_kv, pos_kv, mask)


def write_gate(w: dict, cfg, f_prev: np.ndarray, f_new: np.ndarray) -> np.ndarray:
  """The famjax FAM write gate (not in the spec): F_prev + g * (F_new - F_prev), row by row."""
  out = np.zeros_like(f_new)
  for row in range(f_new.shape[0]):
    delta = f_new[row] - f_prev[row]
    unit = delta / np.sqrt(np.mean(delta ** 2) + cfg.rms_eps)
    g = 1.0 / (1.0 + np.exp(-(unit @ w["fam_gate"] + w["fam_gate_bias"][row])))
    out[row] = f_prev[row] + g * delta
  return out


def fam_update(w: dict, cfg, f_prev: np.ndarray, pos_fam: np.ndarray, x_block: np.ndarray,
               pos_block: np.ndarray, residual: np.ndarray) -> np.ndarray:
  """New FAM state from a COMPLETE block (spec §3 step 3).

  AF = R + Attn(qF, [kF, k_block]) with FAM->FAM bidirectional and every FAM query seeing the whole
  block (never the memory blocks); F_new = AF + MLP(RMSNorm(AF)). qF and kF at the positions of F_prev.
  """
  F, n_blk = f_prev.shape[0], x_block.shape[0]
  x_kv = np.concatenate([f_prev, x_block], axis=0)
  pos_kv = np.concatenate([pos_fam, pos_block])
  mask = np.ones((F, F + n_blk), dtype=bool)
  return layer_block(w, cfg, f_prev, pos_fam, x_kv, pos_kv, mask, residual=residual)


def fam_layer(w: dict, cfg, x: np.ndarray, positions: np.ndarray, f_init: np.ndarray,
              first_residual_zero: bool):
  """One FAM layer over all blocks of one example (spec §3, positions §5).

  x: this layer's input [T, D]; positions [T]; f_init: this layer's initial FAM [F, D].
  first_residual_zero: R = 0 at the first update (state from the learned prompt), else R = F_prev.
  Returns (outputs [T, D], the FAM after the last complete block, or f_init if there was none).
  """
  T = x.shape[0]
  B, m, F = cfg.block_size, cfg.mem_segments, cfg.fam_len
  p0 = positions[0]
  out = np.zeros_like(x)
  f_prev = f_init
  rows = fam_rows_in_block(cfg)
  pos_fam = p0 - B + rows  # §5: initial state at p_0-F .. p_0-1 (as if it compressed the block before)
  older = []  # fam_history ablation: up to k-1 (state, positions) before f_prev, oldest first
  history = _ablation(cfg, "fam_history", 1)
  first_update = True
  n_blocks = -(-T // B)
  for tau in range(n_blocks):
    start, stop = tau * B, min((tau + 1) * B, T)
    mem_start = max(0, (tau - m) * B)                  # blocks tau-m .. tau-1 that exist
    x_block, pos_block = x[start:stop], positions[start:stop]
    x_mem, pos_mem = x[mem_start:start], positions[mem_start:start]
    f_seen = np.concatenate([f for f, _ in older] + [f_prev], axis=0)
    pos_seen = np.concatenate([p for _, p in older] + [pos_fam])
    out[start:stop] = fam_block_tokens(w, cfg, x_mem, pos_mem, f_seen, pos_seen, x_block, pos_block)
    if stop - start == B:                              # §3 [famjax]: only complete blocks update the FAM
      from_prompt = first_update and first_residual_zero
      residual = np.zeros_like(f_prev) if from_prompt else f_prev
      f_prev_old = f_prev
      f_new = fam_update(w, cfg, f_prev, pos_fam, x_block, pos_block, residual)
      f_prev = write_gate(w, cfg, f_prev, f_new) if getattr(cfg, "fam_gate", False) and not from_prompt \
          else f_new
      first_update = False
      if history > 1:
        older = (older + [(f_prev_old, pos_fam)])[-(history - 1):]
      # §5: the new state takes the positions of the last F tokens of the block it compressed.
      pos_fam = pos_block[0] + rows
  return out, f_prev


# ----------------------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------------------

def reference_forward(params: dict, cfg, tokens, *, position_offset=0.0, initial_fam=None,
                      return_fam=False):
  """Logits of the decoder, computed literally from docs/fam.md in float64.

  Args:
    params: nested dict of arrays (layout in the module docstring); converted to float64.
    cfg: object with the ModelConfig attributes listed in the module docstring.
    tokens: int array [batch, T].
    position_offset: scalar or [batch]; token i of example b sits at position offset_b + i (§2, §6 RPO).
    initial_fam: optional [L, batch, F, D]; layer l of example b starts from initial_fam[l, b] instead of
      the learned prompt, and its very first update then uses R = F_prev (§6 RSP). Only with FAM.
    return_fam: also return the FAM state of each layer after the last complete block (or the initial
      state when no block is complete), float64 [L, batch, F, D], or None when the model has no FAM.

  Returns:
    logits float64 [batch, T, V], or (logits, fam) when return_fam.
  """
  params = _to_f64(params)
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, T], got shape {tokens.shape}")
  batch, T = tokens.shape
  D, L = cfg.d_model, cfg.n_layers
  assert _head_dim(cfg) % 2 == 0
  offsets = np.broadcast_to(np.asarray(position_offset, dtype=np.float64), (batch,))
  has_fam = _has_fam(cfg)
  if initial_fam is not None:
    if not has_fam:
      raise ValueError("initial_fam given but the model has no FAM (attention != 'fam' or fam_len == 0)")
    initial_fam = np.broadcast_to(np.asarray(initial_fam, dtype=np.float64),
                                  (L, batch, cfg.fam_len, D))

  prompt_states = None
  if has_fam and initial_fam is None:
    if _ablation(cfg, "fam_init", "prompt") == "prefix":  # a learned initial state per layer, as is
      prompt_states = list(params["layers"]["fam_prefix"])
    else:
      prompt_states = prompt_pass(params, cfg)

  logits = np.zeros((batch, T, cfg.vocab_size), dtype=np.float64)
  final_fam = np.zeros((L, batch, cfg.fam_len, D), dtype=np.float64) if has_fam else None
  for b in range(batch):
    positions = offsets[b] + np.arange(T, dtype=np.float64)       # §2: p_i = offset + i
    x = params["embed"][tokens[b]]                                # [T, D]
    if cfg.embed_scale:
      x = x * np.sqrt(D)
    for layer in range(L):
      w = {k: v for k, v in _layer_weights(params, layer).items() if k != "fam_prefix"}
      if has_fam:
        if initial_fam is not None:
          f_init, first_residual_zero = initial_fam[layer, b], False   # §6 RSP
        else:
          f_init, first_residual_zero = prompt_states[layer], True     # §4
        x, f_last = fam_layer(w, cfg, x, positions, f_init, first_residual_zero)
        final_fam[layer, b] = f_last
      else:
        x = plain_layer(w, cfg, x, positions)
    h = rms_norm(x, params["final_norm"], cfg.rms_eps)
    out_matrix = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    logits[b] = h @ out_matrix

  if return_fam:
    return logits, final_fam
  return logits


def reference_params(cfg, seed: int) -> dict:
  """Random float64 parameters in the famjax layout.

  Matrices, embeddings and the FAM prompt ~ N(0, 0.2^2) (large enough that attention is far from
  uniform); norm scales 1 + 0.1 * N(0, 1).
  """
  rng = np.random.default_rng(seed)
  V, D, L = cfg.vocab_size, cfg.d_model, cfg.n_layers
  N, K, H, M = cfg.n_heads, cfg.n_kv_heads, _head_dim(cfg), cfg.mlp_dim

  def mat(*shape):
    return 0.2 * rng.standard_normal(shape)

  def norm(*shape):
    return 1.0 + 0.1 * rng.standard_normal(shape)

  params = {
      "embed": mat(V, D),
      "final_norm": norm(D),
      "layers": {
          "attn_norm": norm(L, D),
          "q": mat(L, D, N, H),
          "k": mat(L, D, K, H),
          "v": mat(L, D, K, H),
          "o": mat(L, N, H, D),
          "mlp_norm": norm(L, D),
          "gate": mat(L, D, M),
          "up": mat(L, D, M),
          "down": mat(L, M, D),
      },
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = mat(D, V)
  if _has_fam(cfg) and _ablation(cfg, "fam_init", "prompt") == "prefix":
    params["layers"]["fam_prefix"] = mat(L, cfg.fam_len, D)
  elif _has_fam(cfg):
    params["fam_prompt"] = mat(cfg.fam_len, D)
  if getattr(cfg, "fam_gate", False):
    params["layers"]["fam_gate"] = rng.standard_normal((L, D))  # gates spread over (0, 1)
    params["layers"]["fam_gate_bias"] = rng.standard_normal((L, cfg.fam_len))
  return params
