"""Pure building blocks of the decoder (spec §1): RMSNorm, RoPE, SwiGLU, masked GQA attention.

Axis letters in einsum strings: B batch, T/S query time, R key time, D model, N query heads,
K key/value heads, G query heads per key/value head (N = K * G), H head dim, M mlp hidden, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite "minus infinity": a fully masked row (a padding query) then gets a uniform softmax, not NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x / sqrt(mean(x^2) + eps) * scale, statistics in float32 (as HF Llama)."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y.astype(x.dtype) * scale.astype(x.dtype))


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [..., T, H] of the HF rotate-half convention for float `positions` [..., T].

  famjax passes positions relative to the current block (spec §5), so they stay small and the angles
  exact however far a stream has gone.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [..., T, heads, H] by tables [..., T, H] (broadcast over heads); HF `rotate_half`."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x.astype(jnp.float32) * cos[..., None, :] + rotated * sin[..., None, :]
  return out.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """apply_rope at float `positions` [..., T] (broadcastable to x's leading axes)."""
  cos, sin = rope_tables(positions, x.shape[-1], theta)
  return apply_rope(x, cos, sin)


def swiglu(h: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
  """down(silu(gate(h)) * up(h)) for h [..., D]."""
  g = jnp.einsum("...D,DM->...M", h, gate)
  u = jnp.einsum("...D,DM->...M", h, up)
  return jnp.einsum("...M,MD->...D", jax.nn.silu(g) * u, down)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked softmax attention with grouped key/value heads.

  q [..., S, N, H], k and v [..., R, K, H], mask broadcastable to [..., S, R] (True = may attend).
  Scores q.k / sqrt(H) and the softmax in float32. Returns [..., S, N, H] in q's dtype.
  """
  *lead, S, N, H = q.shape
  K = k.shape[-2]
  qg = q.reshape(*lead, S, K, N // K, H)
  scores = jnp.einsum("...SKGH,...RKH->...KGSR", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (H ** -0.5)
  scores = jnp.where(mask[..., None, None, :, :], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("...KGSR,...RKH->...SKGH", probs, v)
  return out.reshape(*lead, S, N, H)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          implementation: str) -> jax.Array:
  """`attend`'s contract through `jax.nn.dot_product_attention(..., implementation=implementation)`.

  "cudnn" is the fused cuDNN kernel (GPU, bfloat16/float16 only); "xla" is JAX's own XLA version of the
  same function, which runs anywhere and is what the tests compare with `attend` on CPU. The leading
  axes [...] are flattened into JAX's batch axis. GQA (K < N) is native to both. The boolean mask is
  broadcast over heads ([B, 1, S, R]); both implementations turn a False into a large finite negative
  score, so a fully masked row (a padding query) is finite, not NaN. XLA: -0.7 * float32 max, as
  `attend`: a uniform softmax. cuDNN (JAX 0.10): an additive bias of -2**41 (bfloat16; the scores then
  round away: uniform) or -2**15 (float16: the row's own scores remain), which matters to no output,
  since padding is masked as a key everywhere.
  """
  *lead, S, N, H = q.shape
  R = k.shape[-3]
  batch = lambda x: x.reshape((-1,) + x.shape[len(lead):])  # noqa: E731
  mask = jnp.broadcast_to(mask, (*lead, S, R)).reshape(-1, 1, S, R)
  out = jax.nn.dot_product_attention(batch(q), batch(k), batch(v), mask=mask, implementation=implementation)
  return out.reshape(q.shape)
