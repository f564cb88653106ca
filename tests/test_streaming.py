"""Streaming (init_state + stream) equals the parallel forward however the sequence is chunked."""

import jax
import numpy as np
import pytest
from flax import nnx

from famjax import ModelConfig, Transformer
from reference import reference_forward, reference_params

CONFIGS = {
    "full": dict(attention="full", block_size=8),
    "bswa": dict(attention="bswa", block_size=8, mem_segments=2),
    "fam": dict(attention="fam", block_size=8, mem_segments=1, fam_len=4),
    "fam_m0": dict(attention="fam", block_size=8, mem_segments=0, fam_len=3),
    "fam_gate": dict(attention="fam", block_size=8, mem_segments=1, fam_len=4, fam_gate=True),
}


def make(name, **kw):
  cfg = ModelConfig(vocab_size=41, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                    dtype="float32", remat="none", **{**CONFIGS[name], **kw})
  return Transformer(cfg, rngs=nnx.Rngs(7))


def run_stream(model, toks, chunks, start_position=0):
  state = model.init_state(toks.shape[0], start_position=start_position)
  outs, i = [], 0
  for n in chunks:
    logits, state = model.stream(toks[:, i:i + n], state)
    outs.append(np.asarray(logits))
    i += n
  assert i == toks.shape[1]
  return np.concatenate(outs, axis=1), state


def random_chunks(rng, total):
  """Chunk lengths from a small set (every length one compilation, shared by the tests) that cross block
  boundaries; the last chunk leaves a partial block."""
  sizes, chunks = (1, 3, 8, 13), []
  while sum(chunks) < total:
    left = total - sum(chunks)
    size = int(rng.choice(sizes))
    chunks.append(size if size <= left else max(s for s in sizes if s <= left))
  return chunks


@pytest.mark.parametrize("name", [n if n == "fam" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(CONFIGS)])  # (the fast tier: fam)
def test_stream_equals_parallel_for_random_chunkings(name):
  model = make(name)
  toks = np.random.RandomState(0).randint(0, 41, (2, 45))  # 5 blocks of 8 and a partial one
  parallel = np.asarray(model(toks))
  rng = np.random.RandomState(1)
  for chunks in ([45], [8] * 5 + [5], random_chunks(rng, 45), random_chunks(rng, 45)):
    streamed, _ = run_stream(model, toks, chunks)
    np.testing.assert_allclose(streamed, parallel, rtol=1e-5, atol=1e-5, err_msg=str(chunks))


def test_stream_with_the_gate_open_and_shut_matches_reference():
  """The write gate (fam_gate) streamed with gate weights that spread it over (0, 1) (the reference's
  N(0, 1) draws; at the zero init every gate is 1/2), against the float64 reference, for chunkings that
  split blocks, so that a gated update happens inside a chunk and across chunk boundaries."""
  cfg = make("fam_gate").config
  p64 = reference_params(cfg, 0)
  model = Transformer(cfg, params=jax.tree.map(lambda a: np.asarray(a, np.float32), p64))
  toks = np.random.RandomState(0).randint(0, 41, (2, 45))
  ref = reference_forward(p64, cfg, toks)
  rng = np.random.RandomState(1)
  for chunks in ([45], [8] * 5 + [5], random_chunks(rng, 45)):
    streamed, _ = run_stream(model, toks, chunks)
    assert np.abs(streamed - ref).max() / np.abs(ref).max() < 2e-5, chunks


@pytest.mark.slow
def test_token_by_token_decode_equals_parallel():
  model = make("fam")
  toks = np.random.RandomState(2).randint(0, 41, (1, 21))
  streamed, _ = run_stream(model, toks, [1] * 21)
  np.testing.assert_allclose(streamed, np.asarray(model(toks)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bswa", "fam"])
def test_state_has_constant_size(name):
  model = make(name)
  toks = np.random.RandomState(3).randint(0, 41, (2, 64))
  state = model.init_state(2)
  shapes = jax.tree.map(np.shape, state)
  for i in range(0, 64, 13):
    _, state = model.stream(toks[:, i:i + 13], state)
    assert jax.tree.map(np.shape, state) == shapes.replace(aligned=state.aligned)
  cfg = model.config
  assert state.k.shape == (cfg.n_layers, 2, (cfg.mem_segments + 1) * cfg.block_size, cfg.n_kv_heads,
                           cfg.head_dim)
  assert int(state.position) == 64 and int(state.pending) == 64 % cfg.block_size


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "fam", "fam_gate"])
def test_stream_far_from_the_origin_is_exact(name):
  """Spec §5: angles come from block-relative positions, so a stream at 1e8 equals one at 0."""
  model = make(name)
  toks = np.random.RandomState(4).randint(0, 41, (1, 30))
  chunks = [7, 9, 14]
  at_zero, _ = run_stream(model, toks, chunks, start_position=0)
  far, state = run_stream(model, toks, chunks, start_position=100_000_000)
  np.testing.assert_array_equal(far, at_zero)
  assert int(state.position) == 100_000_030


@pytest.mark.slow
def test_full_stream_grows_its_cache():
  model = make("full")
  toks = np.random.RandomState(5).randint(0, 41, (1, 100))
  streamed, state = run_stream(model, toks, [40, 40, 20])
  assert state.k.shape[2] >= 100 and int(state.context) == 100
  np.testing.assert_allclose(streamed, np.asarray(model(toks)), rtol=1e-5, atol=1e-5)


def test_stream_rejects_bad_input():
  model = make("fam")
  state = model.init_state(2)
  with pytest.raises(ValueError, match="batch"):
    model.stream(np.zeros((3, 4), np.int32), state)
  with pytest.raises(ValueError, match="n >= 1"):
    model.stream(np.zeros((2, 0), np.int32), state)
