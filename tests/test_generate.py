"""Sampling and streaming generation (famjax.inference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from famjax import ModelConfig, Transformer
from famjax.inference import SamplingConfig, generate, sample


@pytest.fixture(scope="module")
def model():
  cfg = ModelConfig(vocab_size=53, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                    attention="fam", block_size=8, mem_segments=1, fam_len=2, dtype="float32", remat="none")
  return Transformer(cfg, rngs=nnx.Rngs(3))


def test_greedy_generation_is_the_argmax_of_the_parallel_forward(model):
  prompt = np.random.RandomState(0).randint(0, 53, (2, 19))
  result = generate(model, prompt, max_new_tokens=10, prefill_chunk=8)
  text = np.concatenate([prompt, result.tokens], axis=1)
  logits = np.asarray(model(text))
  np.testing.assert_array_equal(result.tokens, logits[:, 18:-1].argmax(-1))
  assert result.prompt_tokens_per_second > 0 and result.generation_tokens_per_second > 0


@pytest.mark.slow
def test_sampling_is_deterministic_for_a_seed(model):
  prompt = np.random.RandomState(1).randint(0, 53, (1, 11))
  cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9)
  a = generate(model, prompt, max_new_tokens=12, sampling=cfg, seed=5).tokens
  b = generate(model, prompt, max_new_tokens=12, sampling=cfg, seed=5).tokens
  c = generate(model, prompt, max_new_tokens=12, sampling=cfg, seed=6).tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_stop_tokens_end_generation(model):
  prompt = np.random.RandomState(2).randint(0, 53, (1, 5))
  free = generate(model, prompt, max_new_tokens=6).tokens[0]
  stopped = generate(model, prompt, max_new_tokens=6, stop_tokens=[int(free[2])])
  assert stopped.stopped.all()
  assert len(stopped.tokens[0]) == list(free).index(free[2]) + 1


@pytest.mark.slow
def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda cfg: np.array([int(sample(logits, k, cfg)[0]) for k in keys])
  assert set(draw(SamplingConfig(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draw(SamplingConfig(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 reaches 0.7
  assert set(draw(SamplingConfig(temperature=1.0, top_p=0.4))) == {0}
  assert set(draw(SamplingConfig(temperature=1.0))) == {0, 1, 2, 3}
  assert int(sample(logits, keys[0], SamplingConfig())[0]) == 0
  frequencies = np.bincount(draw(SamplingConfig(temperature=1.0)), minlength=4) / len(keys)
  np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.08)


@pytest.mark.parametrize("bad,field", [(dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
                                       (dict(top_p=0.0), "top_p")])
def test_bad_sampling_settings_are_named(bad, field):
  with pytest.raises(ValueError, match=field):
    SamplingConfig(**bad)


def test_bad_prompts_are_refused(model):
  with pytest.raises(ValueError, match="token ids"):
    generate(model, np.array([[1, 99]]), max_new_tokens=2)
  with pytest.raises(ValueError, match="length >= 1"):
    generate(model, np.zeros((1, 0), np.int32), max_new_tokens=2)
