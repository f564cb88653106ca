"""The block attention as a Pallas kernel (`ModelConfig.attention_impl="pallas"`): `attend`'s contract
(famjax.model.layers.attend: q [..., S, N, H], k and v [..., R, K, H], a boolean mask broadcastable to
[..., S, R]) computed flash-attention style, a tile of queries x a tile of keys at a time in the chip's
vector memory, so no [S, R] scores exist in device memory, forward or backward.

famjax.model.fam builds the mask of every pattern (spec §2-§3): a block's own keys causally, its memory
blocks whole, the FAM rows it reads; padding, packed examples, the swa window, fam_history. The kernel
takes that mask as it is (int8, [S, R] per query block, shared by the heads), so the same kernel serves
bswa, fam, swa and full, and the mask stays the one written next to the spec. A tile whose mask is all
False is skipped (the causal half of the own block, the memory blocks a block does not have yet, padded
tiles). Queries that see no key at all (padding) get what `attend` gives them, the mean of the values.

Three kernels: the forward (also returning each row's log-sum-exp), and the two halves of the backward
(FlashAttention-2): dq, a query tile against every key tile; dk and dv, a key tile against every query
tile of the query heads that share it (grouped-query and multi-query attention sum their gradient there).
Scores and the softmax in float32; the products in the inputs' dtype with float32 accumulation, as
`attend`.

Where it runs: `jax.lax.platform_dependent` lowers the Mosaic kernels for a TPU and the same kernels in
Pallas' interpret mode elsewhere (what the tests run on CPU), so a program traced on a CPU machine and
compiled for a TPU topology (famjax.training.aot) gets the TPU kernels. Under a device mesh the kernels
run per device: `partitioned(mesh, batch_axes, head_axes)` (the trainer enters it while the step is
traced) wraps them in a shard_map over the batch and heads; without it, one device's program.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

# A finite "minus infinity", as famjax.model.layers.attend's.
MASKED = -0.7 * float(np.finfo(np.float32).max)
LANES = 128  # a TPU vector register's lanes: row statistics are kept replicated over them
TRANS_B = (((1,), (1,)), ((), ()))  # x @ y.T
MAX_BLOCK = 512  # query and key tile sizes (fewer if the sequence is shorter)


class Blocks(NamedTuple):
  q: int  # queries per tile (a multiple of 32: the int8 mask's sublane tiling)
  k: int  # keys per tile (a multiple of 128: lanes)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def blocks_for(S: int, R: int) -> Blocks:
  return Blocks(min(MAX_BLOCK, _round_up(S, 32)), min(MAX_BLOCK, _round_up(R, LANES)))


def _lanes(x: jax.Array, n: int) -> jax.Array:
  """A [rows, LANES] lane-replicated statistic as [rows, n]."""
  if n % LANES == 0:
    return jnp.tile(x, (1, n // LANES))
  if n < LANES:
    return x[:, :n]
  return jnp.broadcast_to(x[:, :1], (x.shape[0], n))


# -- the kernels (one grid program: one query tile x one key tile of one head) --------------------------------

def _forward_kernel(tiles_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, m_scratch, l_scratch, acc_scratch,
                    *, scale: float, key_tiles: int):
  z, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _start():
    m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
    l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
    acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

  @pl.when(tiles_ref[z, i, j] > 0)
  def _tile():
    seen = mask_ref[0] != 0  # [bq, bk]
    q, k, v = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0]  # [bq, H], [bk, H], [bk, H]
    s = jax.lax.dot_general(q, k, TRANS_B, preferred_element_type=jnp.float32) * scale
    s = jnp.where(seen, s, MASKED)
    m_prev, l_prev = m_scratch[...], l_scratch[...]  # [bq, LANES]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1)[:, None])
    p = jnp.exp(s - _lanes(m_next, s.shape[1]))
    alpha = jnp.exp(m_prev - m_next)
    m_scratch[...] = m_next
    l_scratch[...] = alpha * l_prev + jnp.sum(p, axis=1)[:, None]
    pv = jax.lax.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    acc_scratch[...] = acc_scratch[...] * _lanes(alpha, pv.shape[1]) + pv

  @pl.when(j == key_tiles - 1)
  def _finish():
    l = l_scratch[...]
    safe = jnp.where(l == 0.0, 1.0, l)
    o_ref[0, 0] = (acc_scratch[...] / _lanes(safe, acc_scratch.shape[1])).astype(o_ref.dtype)
    lse_ref[0, 0] = jnp.where(l == 0.0, 0.0, m_scratch[...] + jnp.log(safe))


def _probabilities(q, k, seen, lse, scale):
  """The softmax of a tile, recomputed from the row log-sum-exps; 0 where masked. [bq, bk] float32."""
  s = jax.lax.dot_general(q, k, TRANS_B, preferred_element_type=jnp.float32) * scale
  return jnp.where(seen, jnp.exp(s - _lanes(lse, s.shape[1])), 0.0)


def _dq_kernel(tiles_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scratch, *,
               scale: float, key_tiles: int):
  z, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _start():
    dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

  @pl.when(tiles_ref[z, i, j] > 0)
  def _tile():
    seen = mask_ref[0] != 0
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    p = _probabilities(q, k, seen, lse_ref[0, 0], scale)
    dp = jax.lax.dot_general(do, v, TRANS_B, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_ref[0, 0], dp.shape[1]))
    dq_scratch[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32) * scale

  @pl.when(j == key_tiles - 1)
  def _finish():
    dq_ref[0, 0] = dq_scratch[...].astype(dq_ref.dtype)


def _dkv_kernel(tiles_ref, q_ref, k_ref, v_ref, mask_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scratch,
                dv_scratch, *, scale: float, steps: int, query_tiles: int):
  z, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)  # t: (query head of the group, query tile)

  @pl.when(t == 0)
  def _start():
    dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
    dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

  @pl.when(tiles_ref[z, t % query_tiles, j] > 0)
  def _tile():
    seen = mask_ref[0] != 0
    q, k, v, do = q_ref[0, 0], k_ref[0, 0], v_ref[0, 0], do_ref[0, 0]
    p = _probabilities(q, k, seen, lse_ref[0, 0], scale)
    dv_scratch[...] += jax.lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, TRANS_B, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(delta_ref[0, 0], dp.shape[1]))
    dk_scratch[...] += jax.lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32) * scale

  @pl.when(t == steps - 1)
  def _finish():
    dk_ref[0, 0] = dk_scratch[...].astype(dk_ref.dtype)
    dv_ref[0, 0] = dv_scratch[...].astype(dv_ref.dtype)


# -- the calls (padded shapes: q [Z, N, Sp, H], k/v [Z, K, Rp, H], mask [Z, Sp, Rp] int8; tiles [Z, Sp/bq,
# Rp/bk] int32, 1 where a tile of the mask holds a True: read from scalar memory, it decides whether a
# program computes anything) -----------------------------------------------------------------------------------

def tile_map(mask: jax.Array, blocks: Blocks) -> jax.Array:
  """[Z, Sp/bq, Rp/bk] int32: does the (query tile, key tile) of the padded mask hold a True?"""
  Z, Sp, Rp = mask.shape
  tiles = mask.reshape(Z, Sp // blocks.q, blocks.q, Rp // blocks.k, blocks.k) != 0
  return jnp.any(tiles, axis=(2, 4)).astype(jnp.int32)


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, cost, interpret, name, tiles, *args):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                           out_specs=out_specs, scratch_shapes=scratch)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel",
                                                                "arbitrary")),
      cost_estimate=cost, interpret=interpret, name=name)(tiles, *args)


def _forward(tiles, q, k, v, mask, *, blocks: Blocks, interpret: bool):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  Z, N, Sp, H = q.shape
  K, Rp = k.shape[1], k.shape[2]
  group, key_tiles = N // K, Rp // blocks.k
  row = pl.BlockSpec((1, 1, blocks.q, H), lambda z, n, i, j, tiles: (z, n, i, 0))
  key = pl.BlockSpec((1, 1, blocks.k, H), lambda z, n, i, j, tiles: (z, n // group, j, 0))
  mask_spec = pl.BlockSpec((1, blocks.q, blocks.k), lambda z, n, i, j, tiles: (z, i, j))
  stat = pl.BlockSpec((1, 1, blocks.q, LANES), lambda z, n, i, j, tiles: (z, n, i, 0))
  return _call(
      functools.partial(_forward_kernel, scale=H ** -0.5, key_tiles=key_tiles), (Z, N, Sp // blocks.q, key_tiles),
      [row, key, key, mask_spec], [row, stat],
      [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((Z, N, Sp, LANES), jnp.float32)],
      [pltpu.VMEM((blocks.q, LANES), jnp.float32), pltpu.VMEM((blocks.q, LANES), jnp.float32),
       pltpu.VMEM((blocks.q, H), jnp.float32)],
      pl.CostEstimate(flops=4 * Z * N * Sp * Rp * H, transcendentals=Z * N * Sp * Rp,
                      bytes_accessed=_bytes(q, k, v, mask, q)),
      interpret, "fam_attention_forward", tiles, q, k, v, mask)


def _dq(tiles, q, k, v, mask, do, lse, delta, *, blocks: Blocks, interpret: bool):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  Z, N, Sp, H = q.shape
  K, Rp = k.shape[1], k.shape[2]
  group, key_tiles = N // K, Rp // blocks.k
  row = pl.BlockSpec((1, 1, blocks.q, H), lambda z, n, i, j, tiles: (z, n, i, 0))
  stat = pl.BlockSpec((1, 1, blocks.q, LANES), lambda z, n, i, j, tiles: (z, n, i, 0))
  key = pl.BlockSpec((1, 1, blocks.k, H), lambda z, n, i, j, tiles: (z, n // group, j, 0))
  mask_spec = pl.BlockSpec((1, blocks.q, blocks.k), lambda z, n, i, j, tiles: (z, i, j))
  return _call(
      functools.partial(_dq_kernel, scale=H ** -0.5, key_tiles=key_tiles), (Z, N, Sp // blocks.q, key_tiles),
      [row, key, key, mask_spec, row, stat, stat], row, jax.ShapeDtypeStruct(q.shape, q.dtype),
      [pltpu.VMEM((blocks.q, H), jnp.float32)],
      pl.CostEstimate(flops=6 * Z * N * Sp * Rp * H, transcendentals=Z * N * Sp * Rp,
                      bytes_accessed=_bytes(q, k, v, mask, do, q)),
      interpret, "fam_attention_dq", tiles, q, k, v, mask, do, lse, delta)


def _dkv(tiles, q, k, v, mask, do, lse, delta, *, blocks: Blocks, interpret: bool):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  Z, N, Sp, H = q.shape
  K, Rp = k.shape[1], k.shape[2]
  group, query_tiles = N // K, Sp // blocks.q
  steps = group * query_tiles
  # program (z, kv head h, key tile j, step t): query head h * group + t // query_tiles, tile t % query_tiles
  row = pl.BlockSpec((1, 1, blocks.q, H),
                     lambda z, h, j, t, tiles: (z, h * group + t // query_tiles, t % query_tiles, 0))
  stat = pl.BlockSpec((1, 1, blocks.q, LANES),
                      lambda z, h, j, t, tiles: (z, h * group + t // query_tiles, t % query_tiles, 0))
  key = pl.BlockSpec((1, 1, blocks.k, H), lambda z, h, j, t, tiles: (z, h, j, 0))
  mask_spec = pl.BlockSpec((1, blocks.q, blocks.k), lambda z, h, j, t, tiles: (z, t % query_tiles, j))
  return _call(
      functools.partial(_dkv_kernel, scale=H ** -0.5, steps=steps, query_tiles=query_tiles),
      (Z, K, Rp // blocks.k, steps), [row, key, key, mask_spec, row, stat, stat], [key, key],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      [pltpu.VMEM((blocks.k, H), jnp.float32), pltpu.VMEM((blocks.k, H), jnp.float32)],
      pl.CostEstimate(flops=8 * Z * N * Sp * Rp * H, transcendentals=Z * N * Sp * Rp,
                      bytes_accessed=_bytes(q, k, v, mask, do, k, v)),
      interpret, "fam_attention_dkv", tiles, q, k, v, mask, do, lse, delta)


def _bytes(*arrays) -> int:
  return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays))


def _on_platform(kernel, *args, blocks: Blocks):
  """kernel(*args) as Mosaic on a TPU, in Pallas' interpret mode on any other platform (decided where the
  program is lowered, not where it is traced)."""
  return jax.lax.platform_dependent(
      *args, tpu=functools.partial(kernel, blocks=blocks, interpret=False),
      default=functools.partial(kernel, blocks=blocks, interpret=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, mask, blocks: Blocks):
  return _flash_forward(q, k, v, mask, blocks)[0]


def _flash_forward(q, k, v, mask, blocks):
  tiles = tile_map(mask, blocks)
  o, lse = _on_platform(_forward, tiles, q, k, v, mask, blocks=blocks)
  return o, (tiles, q, k, v, mask, o, lse)


def _flash_backward(blocks, residuals, do):
  tiles, q, k, v, mask, o, lse = residuals
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
  delta = jnp.broadcast_to(delta, lse.shape)  # lane-replicated, as lse
  dq = _on_platform(_dq, tiles, q, k, v, mask, do, lse, delta, blocks=blocks)
  dk, dv = _on_platform(_dkv, tiles, q, k, v, mask, do, lse, delta, blocks=blocks)
  return dq, dk, dv, np.zeros(mask.shape, jax.dtypes.float0)


_flash.defvjp(_flash_forward, _flash_backward)


# -- attend's contract -------------------------------------------------------------------------------------------

def _local_attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`attend` on one device's arrays (the mask already [..., S, R])."""
  *lead, S, N, H = q.shape
  R, K = k.shape[-3], k.shape[-2]
  Z = math.prod(lead)
  blocks = blocks_for(S, R)
  Sp, Rp = _round_up(S, blocks.q), _round_up(R, blocks.k)

  def heads_first(x, length, padded):  # [..., length, heads, H] -> [Z, heads, padded, H], zeros after
    x = jnp.swapaxes(x.reshape(Z, length, x.shape[-2], H), 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, padded - length), (0, 0)))

  qz, kz, vz = heads_first(q, S, Sp), heads_first(k, R, Rp), heads_first(v, R, Rp)
  mz = jnp.pad(mask.reshape(Z, S, R).astype(jnp.int8), ((0, 0), (0, Sp - S), (0, Rp - R)))  # padding: unseen
  o = _flash(qz, kz, vz, mz, blocks)[:, :, :S]  # [Z, N, S, H]
  o = jnp.swapaxes(o, 1, 2).reshape(q.shape)
  # A query that sees no key (padding): attend's uniform softmax over all R keys, the mean of the values.
  mean = jnp.mean(v.astype(jnp.float32), axis=-3)  # [..., K, H]
  mean = jnp.repeat(mean, N // K, axis=-2).astype(q.dtype)[..., None, :, :]  # [..., 1, N, H]
  return jnp.where(jnp.any(mask, axis=-1)[..., None, None], o, mean)


class _Partition(NamedTuple):
  mesh: jax.sharding.Mesh
  batch_axes: tuple[str, ...]
  head_axes: tuple[str, ...]


_PARTITION: contextvars.ContextVar[_Partition | None] = contextvars.ContextVar("pallas_partition", default=None)


@contextlib.contextmanager
def partitioned(mesh: jax.sharding.Mesh, batch_axes, head_axes):
  """While active (around tracing), `attend` runs its kernels per device of `mesh`: the leading (batch)
  axis split over `batch_axes`, the heads over `head_axes` where they divide (a Mosaic kernel is opaque
  to XLA's partitioner, which would otherwise gather its inputs onto every device)."""
  as_tuple = lambda a: () if a is None else (a,) if isinstance(a, str) else tuple(a)  # noqa: E731
  token = _PARTITION.set(_Partition(mesh, as_tuple(batch_axes), as_tuple(head_axes)))
  try:
    yield
  finally:
    _PARTITION.reset(token)


def _axes_dividing(size: int, axes: tuple[str, ...], mesh) -> tuple[str, ...] | None:
  axes = tuple(a for a in axes if mesh.shape[a] > 1)
  if not axes or size % math.prod(mesh.shape[a] for a in axes):
    return None
  return axes


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """famjax.model.layers.attend's contract and result, computed by the Pallas kernels."""
  *lead, S, N, H = q.shape
  R, K = k.shape[-3], k.shape[-2]
  mask = jnp.broadcast_to(mask, (*lead, S, R))
  partition = _PARTITION.get()
  if partition is None or partition.mesh.size == 1 or not lead:
    return _local_attend(q, k, v, mask)
  mesh = partition.mesh
  batch = _axes_dividing(lead[0], partition.batch_axes, mesh)
  q_heads = _axes_dividing(N, partition.head_axes, mesh)
  kv_heads = _axes_dividing(K, partition.head_axes, mesh)
  if K > 1 and q_heads != kv_heads:  # a device's query heads must find their key/value heads locally
    q_heads = kv_heads = None
  rest = (None,) * (len(lead) - 1)
  spec_q = P(batch, *rest, None, q_heads, None)
  spec_kv = P(batch, *rest, None, kv_heads, None)
  spec_mask = P(batch, *rest, None, None)
  return jax.shard_map(_local_attend, mesh=mesh, in_specs=(spec_q, spec_kv, spec_kv, spec_mask),
                       out_specs=spec_q, check_vma=False)(q, k, v, mask)
