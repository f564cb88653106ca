"""The Pallas attention kernel (famjax.model.pallas_attention, ModelConfig.attention_impl="pallas") against
the reference `attend`, in Pallas' interpret mode on CPU (the same kernels the TPU compiles; their Mosaic
lowering is compiled in tests/test_tpu_compile.py): values and gradients within 1e-4 relative in float32,
for the kernel alone (padded query and key tiles, grouped and multi-query heads, queries that see no key)
and for the whole model (fam, bswa and full, packed examples and padding), and the configurations it
refuses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from famjax import ModelConfig
from famjax.model import init_params, layers, pallas_attention
from famjax.training.config import ConfigError, check_platform
from test_attention import logits_and_grads  # the training forward's logits and gradients

TOLERANCE = 1e-4  # relative to the largest magnitude of each compared array


def assert_close(got, want):
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = np.abs(y).max() or 1.0
    assert np.abs(x - y).max() / scale < TOLERANCE, (np.abs(x - y).max(), scale)


@functools.partial(jax.jit, static_argnames="kernel")
def value_and_input_grads(kernel, q, k, v, mask, cotangent):
  out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, mask), q, k, v)
  return out, vjp(cotangent)


# (leading axes, queries S, keys R, heads N, key/value heads K, head size H): S and R off the tiles' sizes
# (padded inside), MHA, GQA and MQA.
SHAPES = [((2, 3), 40, 170, 4, 2, 16), ((2,), 64, 64, 4, 1, 32), ((1, 2), 96, 300, 2, 2, 8)]


@pytest.mark.parametrize("lead,S,R,N,K,H", SHAPES)
def test_kernel_equals_attend(lead, S, R, N, K, H):
  """Values and the gradients of q, k and v, under a random mask where some queries see no key at all
  (attend gives them the mean of the values; so does the kernel's wrapper)."""
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (*lead, S, N, H), jnp.float32)
  k = jax.random.normal(keys[1], (*lead, R, K, H), jnp.float32)
  v = jax.random.normal(keys[2], (*lead, R, K, H), jnp.float32)
  mask = jax.random.bernoulli(keys[3], 0.5, (*lead, S, R)).at[..., :3, :].set(False)
  cotangent = jax.random.normal(keys[4], q.shape, jnp.float32)
  want = value_and_input_grads(layers.attend, q, k, v, mask, cotangent)
  got = value_and_input_grads(pallas_attention.attend, q, k, v, mask, cotangent)
  assert_close(got, want)


SMALL = dict(vocab_size=37, d_model=32, n_layers=2, mlp_dim=48, dtype="float32", n_heads=4, n_kv_heads=2,
             remat="full", block_size=8)


@pytest.mark.parametrize("attention,mem,fam_len", [("fam", 2, 2), ("bswa", 1, 0), ("full", 0, 0)])
def test_model_with_the_kernel_equals_xla(attention, mem, fam_len):
  """The whole model, attention_impl "pallas" against "xla": logits and every parameter's gradient, with
  two packed examples in one row, padding in the other (a partial last block), GQA, remat full; fam
  (its own block, two memory blocks, the FAM rows), bswa (its own block and one memory block) and full
  attention."""
  cfg = ModelConfig(**SMALL, attention=attention, mem_segments=mem, fam_len=fam_len)
  params = init_params(cfg, jax.random.key(1))
  toks = jnp.asarray(np.random.RandomState(2).randint(0, 37, (2, 29)))
  seg = jnp.asarray(np.array([[1] * 16 + [2] * 13, [1] * 21 + [0] * 8]))
  want = logits_and_grads(params, cfg, toks, seg > 0, seg)
  got = logits_and_grads(params, cfg.replace(attention_impl="pallas"), toks, seg > 0, seg)
  assert_close(got, want)


def test_what_the_kernel_does_not_take_is_refused_before_compiling():
  with pytest.raises(ValueError, match=r"ModelConfig\.attention_impl='pallas' needs dtype bfloat16 or float32"):
    ModelConfig(**{**SMALL, "dtype": "float16"}, attention_impl="pallas")
  cfg = ModelConfig(**{**SMALL, "dtype": "bfloat16"}, attention_impl="pallas")
  with pytest.raises(ConfigError, match=r"^config\.model\.attention_impl='pallas' is a TPU kernel"):
    check_platform(cfg, "gpu")
  check_platform(cfg, "tpu")
  check_platform(cfg, "cpu")  # interpret mode: what these tests run
