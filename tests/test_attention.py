"""How a layer runs (issue 13): `attention_chunk` (a bounded number of blocks' key/value windows and scores
at a time), `mlp_chunk` (a bounded number of tokens' MLP activations at a time) and `attention_impl` (the
kernel) change memory and speed, never the logits or the gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from famjax import ModelConfig, Transformer
from famjax.model import fam, init_params, transformer
from famjax.model.layers import attend, dot_product_attention
from famjax.workdir.model import _runnable_here

TINY = dict(vocab_size=37, d_model=32, n_layers=2, mlp_dim=48, dtype="float32", n_heads=4, n_kv_heads=2,
            remat="none", block_size=4)


def tokens(batch, length, seed=1):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 37, (batch, length)))


@functools.partial(jax.jit, static_argnames="cfg")
def logits_and_grads(params, cfg, toks, token_mask, segment_ids):
  """The training forward's logits and the gradients of a loss over every logit."""
  def loss(p):
    state = transformer.empty_state(p, cfg, toks.shape[0])
    out, _ = transformer.forward(p, cfg, toks, state, max_pending=0, token_mask=token_mask,
                                 segment_ids=segment_ids)
    return jnp.mean(jax.nn.log_softmax(out) * jnp.cos(jnp.arange(out.shape[-1]))), out
  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return out, grads


def assert_same(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = float(jnp.abs(y).max()) or 1.0
    np.testing.assert_allclose(np.asarray(x) / scale, np.asarray(y) / scale, rtol=0, atol=tol)


# (attention, mem_segments, fam_len, packed examples, remat); 29 tokens = 8 blocks of 4 (the last partial),
# taken 3 at a time: groups of 3, 3 and 2 blocks, so the last group is padded.
CASES = [("bswa", 0, 0, False, "none"), ("bswa", 2, 0, True, "none"), ("fam", 0, 2, False, "full"),
         ("fam", 1, 2, True, "none")]


@pytest.mark.slow
@pytest.mark.parametrize("attention,mem,fam_len,packed,remat", CASES)
def test_attention_chunk_keeps_logits_and_gradients(attention, mem, fam_len, packed, remat):
  cfg = ModelConfig(**{**TINY, "remat": remat}, attention=attention, mem_segments=mem, fam_len=fam_len)
  params = init_params(cfg, jax.random.key(0))
  toks = tokens(2, 29)
  mask = np.ones((2, 29), bool)
  mask[1, 21:] = False  # right padding: fully masked padding queries in the last blocks
  seg = jnp.asarray(np.array([[1] * 12 + [2] * 17, [1] * 8 + [2] * 13 + [0] * 8])) if packed else None
  ref = logits_and_grads(params, cfg, toks, jnp.asarray(mask), seg)
  assert_same(logits_and_grads(params, cfg.replace(attention_chunk=3), toks, jnp.asarray(mask), seg), ref)


@pytest.mark.slow
@pytest.mark.parametrize("field,value", [("attention_chunk", 2), ("mlp_chunk", 3)])
def test_chunked_layers_stream(field, value):
  """Streaming chunks of fewer blocks (tokens) than the setting run as one group; longer ones in groups."""
  cfg = ModelConfig(**TINY, attention="fam", mem_segments=1, fam_len=2)
  model = Transformer(cfg, params=init_params(cfg, jax.random.key(0)))
  chunked = Transformer(cfg.replace(**{field: value}), params=model.params_dict())
  toks = tokens(1, 30)
  state, outs = chunked.init_state(1), []
  for a, b in ((0, 13), (13, 14), (14, 30)):  # 4 blocks (2 groups), one token, 4 blocks from pending 2
    out, state = chunked.stream(toks[:, a:b], state)
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), model(toks), rtol=2e-5, atol=2e-5)


def _step_temp_bytes(cfg, length):
  params = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  toks = jax.ShapeDtypeStruct((1, length), jnp.int32)

  def loss(p, t):
    return jnp.mean(transformer.forward(p, cfg, t, transformer.empty_state(p, cfg, 1), max_pending=0)[0])
  return jax.jit(jax.grad(loss)).lower(params, toks).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_attention_chunk_bounds_the_scores_memory():
  """Block 128, 16 blocks, 3 memory blocks: the scores dominate the step; taken 2 blocks at a time, the
  compiled forward + backward needs well under half the temporary memory."""
  cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, mlp_dim=128,
                    attention="bswa", block_size=128, mem_segments=3, fam_len=0, dtype="float32",
                    remat="full")
  whole, chunked = _step_temp_bytes(cfg, 2048), _step_temp_bytes(cfg.replace(attention_chunk=2), 2048)
  assert chunked < 0.45 * whole, (chunked, whole)


# The ablation switches whose masks and keys are built inside each group (docs/ablations.md).
SWITCHES = [dict(attention="swa", window=6, mem_segments=0, fam_len=0),
            dict(attention="bswa", mem_segments=2, fam_len=0, mem_stop_gradient=True),
            dict(attention="fam", mem_segments=1, fam_len=2, fam_history=3, fam_position="between")]


@pytest.mark.slow
@pytest.mark.parametrize("switches", SWITCHES, ids=lambda d: d["attention"])
@pytest.mark.parametrize("packed", [False, True])
def test_attention_chunk_keeps_the_ablation_switches(switches, packed):
  cfg = ModelConfig(**TINY, **switches)
  params = init_params(cfg, jax.random.key(0))
  toks = tokens(2, 29)
  seg = jnp.asarray(np.array([[1] * 12 + [2] * 17, [1] * 8 + [2] * 13 + [0] * 8])) if packed else None
  mask = jnp.ones((2, 29), bool) if seg is None else seg > 0
  ref = logits_and_grads(params, cfg, toks, mask, seg)
  assert_same(logits_and_grads(params, cfg.replace(attention_chunk=3), toks, mask, seg), ref)


@pytest.mark.slow
@pytest.mark.parametrize("attention,remat,chunk", [("fam", "full", 8), ("bswa", "none", 5),
                                                   ("full", "none", 7), ("fam", "save_qkv_proj", 29)])
def test_mlp_chunk_keeps_logits_and_gradients(attention, remat, chunk):
  """29 tokens in groups of `chunk` (the last padded; 29: one group, the unchunked path), with packed
  examples and padding, also with attention_chunk."""
  cfg = ModelConfig(**{**TINY, "remat": remat}, attention=attention, mem_segments=1,
                    fam_len=2 if attention == "fam" else 0)
  params = init_params(cfg, jax.random.key(0))
  toks = tokens(2, 29)
  seg = jnp.asarray(np.array([[1] * 12 + [2] * 17, [1] * 8 + [2] * 13 + [0] * 8]))
  ref = logits_and_grads(params, cfg, toks, seg > 0, seg)
  assert_same(logits_and_grads(params, cfg.replace(mlp_chunk=chunk), toks, seg > 0, seg), ref)
  both = cfg.replace(mlp_chunk=chunk, attention_chunk=2)
  assert_same(logits_and_grads(params, both, toks, seg > 0, seg), ref)


@pytest.mark.slow
def test_mlp_chunk_sums_the_weight_gradient_in_float32():
  """In bfloat16 the chunked MLP's weight gradient (a float32 sum over the groups, rounded once) is as
  close to the float32 model's as the unchunked one's (one bfloat16 matmul over all tokens)."""
  cfg = ModelConfig(**{**TINY, "dtype": "bfloat16", "mlp_dim": 64}, attention="fam", mem_segments=1,
                    fam_len=2)
  params = init_params(cfg, jax.random.key(0))
  toks = tokens(2, 64)
  exact = logits_and_grads(params, cfg.replace(dtype="float32"), toks, None, None)[1]["layers"]["up"]
  errors = {}
  for chunk in (0, 4):
    up = logits_and_grads(params, cfg.replace(mlp_chunk=chunk), toks, None, None)[1]["layers"]["up"]
    errors[chunk] = float(jnp.abs(up - exact).max() / jnp.abs(exact).max())
  assert errors[4] < 1.5 * errors[0] + 1e-3, errors


@pytest.mark.slow
def test_mlp_chunk_bounds_the_mlp_memory():
  """A wide MLP (16 x d_model) over 2048 tokens dominates the step; 256 tokens at a time, the compiled
  forward + backward needs well under half the temporary memory."""
  cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, mlp_dim=1024,
                    attention="bswa", block_size=128, mem_segments=1, fam_len=0, dtype="float32",
                    remat="full", attention_chunk=1)
  whole, chunked = _step_temp_bytes(cfg, 2048), _step_temp_bytes(cfg.replace(mlp_chunk=256), 2048)
  assert chunked < 0.45 * whole, (chunked, whole)


@pytest.mark.slow
def test_attention_chunk_builds_the_key_value_windows_a_group_at_a_time():
  """8 memory blocks of 64 tokens and as many key/value heads as query heads: the key/value windows of
  every block (9 blocks of keys each) dominate the step. A group at a time, the compiled forward +
  backward needs well under half the temporary memory of all blocks at once (when the windows of every
  block were built before the groups' loop: 0.85 of it)."""
  cfg = ModelConfig(vocab_size=64, d_model=256, n_layers=1, n_heads=8, n_kv_heads=8, mlp_dim=64,
                    attention="bswa", block_size=64, mem_segments=8, fam_len=0, dtype="float32",
                    remat="full", attention_chunk=1)
  whole, chunked = _step_temp_bytes(cfg.replace(attention_chunk=0), 2048), _step_temp_bytes(cfg, 2048)
  assert chunked < 0.5 * whole, (chunked, whole)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("bfloat16", 2e-2)])
def test_dot_product_attention_equals_attend(dtype, tol):
  """The fused-kernel wrapper, run with JAX's XLA implementation: GQA, leading block axes, and fully
  masked rows (padding queries: a uniform softmax in both, not NaN)."""
  rng = np.random.RandomState(0)
  q, k, v = (jnp.asarray(rng.normal(size=s), dtype) for s in ((2, 3, 5, 4, 8), (2, 3, 7, 2, 8), (2, 3, 7, 2, 8)))
  mask = rng.rand(2, 3, 5, 7) < 0.5
  mask[0, 1, 2] = False  # a fully masked row
  mask[1, 2] = False  # a fully masked block
  ref = attend(q, k, v, jnp.asarray(mask))
  out = dot_product_attention(q, k, v, jnp.asarray(mask), implementation="xla")
  assert out.dtype == q.dtype and out.shape == q.shape and bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(out[1, 2], np.float32),
                             np.broadcast_to(np.asarray(v[1, 2], np.float32).mean(0).repeat(2, 0), (5, 4, 8)),
                             rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["full", "fam"])
def test_fused_attention_path_equals_attend(monkeypatch, attention):
  """The model with the wrapper in place of `attend` (what attention_impl="cudnn" runs, here with JAX's
  XLA implementation on CPU): the same logits and gradients with the fam/full masks, packed examples,
  padding and attention_chunk."""
  cfg = ModelConfig(**TINY, attention=attention, mem_segments=1, fam_len=2 if attention == "fam" else 0,
                    attention_chunk=3)
  params = init_params(cfg, jax.random.key(0))
  toks = tokens(2, 29)
  seg = jnp.asarray(np.array([[1] * 12 + [2] * 17, [1] * 8 + [2] * 13 + [0] * 8]))
  ref = logits_and_grads(params, cfg, toks, seg > 0, seg)
  xla = functools.partial(dot_product_attention, implementation="xla")
  monkeypatch.setattr(fam, "_attention", lambda cfg: xla)
  logits_and_grads.clear_cache()  # trace again, through the wrapper
  try:
    assert_same(logits_and_grads(params, cfg, toks, seg > 0, seg), ref)
  finally:
    logits_and_grads.clear_cache()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the cuDNN kernel runs here")
def test_a_cudnn_run_is_evaluated_with_the_reference_kernel_off_gpu():
  """famjax.eval / generate load a run trained with cuDNN attention anywhere: the same function, by XLA."""
  cfg = ModelConfig(**{**TINY, "dtype": "bfloat16"}, attention_impl="cudnn")
  with pytest.warns(RuntimeWarning, match="attention_impl='cudnn' needs a GPU"):
    assert _runnable_here(cfg) == cfg.replace(attention_impl="xla")
