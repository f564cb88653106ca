"""The ablation switches of ModelConfig (docs/ablations.md): attention="swa" with `window`,
`mem_stop_gradient`, `fam_position`, `fam_init`, `fam_history`.

Each against the float64 reference (tests/reference.py), streaming against the parallel forward for
random chunkings, far-from-the-origin streams, the parameters a switch adds (LoRA, sharding axes, HF),
and the config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from famjax import FamState, ModelConfig, Transformer, from_hf, to_hf
from famjax.model import layers as L
from famjax.training import lora
from famjax.training.config import LoraConfig
from famjax.training.state import model_logical_axes
from reference import reference_forward, reference_params
from test_streaming import random_chunks, run_stream

TINY = dict(vocab_size=37, d_model=32, n_layers=2, mlp_dim=48, n_heads=4, n_kv_heads=2, dtype="float32",
            remat="none")

CASES = {
    "swa_w1": dict(attention="swa", window=1, block_size=8),          # only itself
    "swa_w5": dict(attention="swa", window=5, block_size=8),          # window < block
    "swa_w8": dict(attention="swa", window=8, block_size=8),          # window = block
    "swa_w11": dict(attention="swa", window=11, block_size=4),        # three memory blocks
    "swa_w20": dict(attention="swa", window=20, block_size=8),
    "between": dict(attention="fam", block_size=8, mem_segments=1, fam_len=3, fam_position="between"),
    "zero": dict(attention="fam", block_size=8, mem_segments=0, fam_len=4, fam_position="zero"),
    "prefix": dict(attention="fam", block_size=8, mem_segments=1, fam_len=4, fam_init="prefix"),
    "history2": dict(attention="fam", block_size=8, mem_segments=1, fam_len=4, fam_history=2),
    "history3_m0": dict(attention="fam", block_size=4, mem_segments=0, fam_len=2, fam_history=3),
    "all": dict(attention="fam", block_size=4, mem_segments=1, fam_len=2, fam_history=2,
                fam_position="between", fam_init="prefix", fam_gate=True, mem_stop_gradient=True),
}


def tiny(**kw) -> ModelConfig:
  return ModelConfig(**{**TINY, **kw})


def build(cfg, seed=0):
  """A model and the float64 parameters it was built from (shared with the reference)."""
  p64 = reference_params(cfg, seed)
  return Transformer(cfg, params=jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p64)), p64


def rel_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def tokens(batch, length, seed=1):
  return np.random.RandomState(seed).randint(0, 37, (batch, length))


# -- against the float64 reference ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_parallel_forward_matches_reference(name):
  cfg = tiny(**CASES[name])
  model, p64 = build(cfg)
  toks = tokens(2, 29)  # several blocks and a partial last one
  ref, ref_fam = reference_forward(p64, cfg, toks, return_fam=True)
  logits, fam_state = model(toks, return_fam_state=True)
  assert rel_err(logits, ref) < 2e-5
  if cfg.has_fam:
    assert rel_err(fam_state.values, ref_fam) < 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["history2", "all"])
def test_passed_state_matches_reference(name):
  """RSP (spec §6) with the ablations: only the latest state is passed, the older ones start missing."""
  cfg = tiny(**CASES[name])
  model, p64 = build(cfg)
  toks = tokens(2, 24)
  init = np.random.RandomState(3).normal(size=(2, 2, cfg.fam_len, 32))
  ref, ref_fam = reference_forward(p64, cfg, toks, initial_fam=init, return_fam=True)
  logits, fam_state = model(toks, fam_state=FamState(jnp.asarray(init, jnp.float32), jnp.zeros((2,), bool)),
                            return_fam_state=True)
  assert rel_err(logits, ref) < 2e-5 and rel_err(fam_state.values, ref_fam) < 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("switch", [dict(fam_position="between"), dict(fam_position="zero"),
                                    dict(fam_history=2), dict(fam_init="prefix")])
def test_each_fam_switch_changes_the_model(switch):
  """The switches do something: the reference of the spec's model differs from the switched one."""
  cfg = tiny(attention="fam", block_size=4, mem_segments=0, fam_len=2, **switch)
  model, p64 = build(cfg)
  spec = cfg.replace(**{k: ModelConfig.__dataclass_fields__[k].default for k in switch})
  if "fam_init" in switch:  # the spec's model from the prompt, with the same other weights
    p64 = {**p64, "fam_prompt": p64["layers"]["fam_prefix"][0],
           "layers": {k: v for k, v in p64["layers"].items() if k != "fam_prefix"}}
  toks = tokens(1, 16)
  assert rel_err(model(toks), reference_forward(p64, spec, toks)) > 1e-3


@pytest.mark.slow
def test_swa_does_not_depend_on_block_size_and_a_long_window_is_full():
  toks = tokens(2, 27)
  outs = [np.asarray(build(tiny(attention="swa", window=11, block_size=b))[0](toks)) for b in (4, 8, 16)]
  for out in outs[1:]:
    np.testing.assert_allclose(out, outs[0], rtol=1e-5, atol=1e-5)
  full, _ = build(tiny(attention="full", block_size=8))
  swa, _ = build(tiny(attention="swa", window=27, block_size=8))
  np.testing.assert_allclose(np.asarray(swa(toks)), np.asarray(full(toks)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("window,block", [(5, 8), (11, 4)])
def test_swa_is_causal_and_forgets_beyond_its_window(window, block):
  model, _ = build(tiny(attention="swa", window=window, block_size=block))
  toks = tokens(1, 40)
  base = np.asarray(model(toks))
  t = 6
  changed = toks.copy()
  changed[0, t] = (changed[0, t] + 1) % 37
  out = np.asarray(model(changed))
  np.testing.assert_array_equal(out[:, :t], base[:, :t])
  assert np.abs(out[:, t] - base[:, t]).max() > 0
  # Two layers: token t reaches t + 2 * (window - 1) at most.
  np.testing.assert_allclose(out[:, t + 2 * (window - 1) + 1:], base[:, t + 2 * (window - 1) + 1:],
                             rtol=1e-6, atol=1e-6)


# -- streaming --------------------------------------------------------------------------------------

STREAMED = ["swa_w5", "swa_w11", "swa_w20", "between", "zero", "prefix", "history2", "history3_m0", "all"]


@pytest.mark.slow
@pytest.mark.parametrize("name", STREAMED)
def test_stream_equals_parallel_for_random_chunkings(name):
  model = Transformer(tiny(**CASES[name]), rngs=nnx.Rngs(7))
  toks = np.random.RandomState(0).randint(0, 37, (2, 45))
  parallel = np.asarray(model(toks))
  rng = np.random.RandomState(1)
  for chunks in ([45], random_chunks(rng, 45)):  # whole, and chunks crossing block boundaries
    streamed, _ = run_stream(model, toks, chunks)
    np.testing.assert_allclose(streamed, parallel, rtol=1e-5, atol=1e-5, err_msg=str(chunks))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swa_w11", "history3_m0"])
def test_state_has_constant_size(name):
  model = Transformer(tiny(**CASES[name]), rngs=nnx.Rngs(7))
  cfg = model.config
  toks = tokens(2, 64)
  state = model.init_state(2)
  shapes = jax.tree.map(np.shape, state)
  for i in range(0, 64, 13):
    _, state = model.stream(toks[:, i:i + 13], state)
    assert jax.tree.map(np.shape, state) == shapes.replace(aligned=state.aligned)
  assert state.k.shape[2] == (cfg.memory_blocks + 1) * cfg.block_size
  if cfg.attention == "swa":  # the blocks that cover the window, and the pending one
    assert cfg.memory_blocks == 3 and state.k.shape[2] < cfg.window + 2 * cfg.block_size
  else:
    assert state.fam_hist.shape == (2, 2, 2, 2, 32) and bool(np.asarray(state.fam_hist_valid).all())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["swa_w11", "between", "history3_m0"])
def test_stream_far_from_the_origin_is_exact(name):
  """Spec §5: angles from block-relative positions, so a stream at 1e8 equals one at 0."""
  model = Transformer(tiny(**CASES[name]), rngs=nnx.Rngs(7))
  toks = tokens(1, 30, seed=4)
  chunks = [7, 9, 14]
  at_zero, _ = run_stream(model, toks, chunks, start_position=0)
  far, _ = run_stream(model, toks, chunks, start_position=100_000_000)
  np.testing.assert_array_equal(far, at_zero)


@pytest.mark.slow
def test_history_restarts_with_every_packed_example():
  """[famjax] packed examples at block boundaries compute what they compute alone, fam_history too."""
  model, _ = build(tiny(attention="fam", block_size=4, mem_segments=1, fam_len=2, fam_history=2))
  a, b = tokens(2, 12, seed=5), tokens(2, 12, seed=6)
  packed = jnp.asarray(np.concatenate([a, b], axis=1))
  seg = jnp.asarray(np.array([[1] * 12 + [2] * 12] * 2))
  out = np.asarray(model(packed, segment_ids=seg))
  np.testing.assert_allclose(out[:, :12], np.asarray(model(a)), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(out[:, 12:], np.asarray(model(b)), rtol=2e-5, atol=2e-5)


# -- mem_stop_gradient ------------------------------------------------------------------------------

def dense_bswa_logits(params, cfg, toks, stop_memory):
  """bswa with an explicit T x T mask in JAX (MHA), the memory blocks' keys/values optionally
  stop_gradient'ed: the reference for the gradient of mem_stop_gradient."""
  S, m, T = cfg.block_size, cfg.mem_segments, toks.shape[1]
  pos = jnp.arange(T)
  qb, kb = (pos // S)[:, None], (pos // S)[None, :]
  own = (qb == kb) & (pos[None, :] <= pos[:, None])
  mem = (kb < qb) & (kb >= qb - m)
  x = params["embed"][toks]
  for layer in range(cfg.n_layers):
    w = {k: v[layer] for k, v in params["layers"].items()}
    h = L.rms_norm(x, w["attn_norm"], cfg.rms_eps)
    q = L.rope(jnp.einsum("BTD,DNH->BTNH", h, w["q"]), pos, cfg.rope_theta)
    k = L.rope(jnp.einsum("BTD,DNH->BTNH", h, w["k"]), pos, cfg.rope_theta)
    v = jnp.einsum("BTD,DNH->BTNH", h, w["v"])
    k_mem, v_mem = (jax.lax.stop_gradient(k), jax.lax.stop_gradient(v)) if stop_memory else (k, v)
    scale = cfg.head_dim ** -0.5
    scores = jnp.where(mem[None, None], jnp.einsum("BSNH,BRNH->BNSR", q, k_mem),
                       jnp.einsum("BSNH,BRNH->BNSR", q, k)) * scale
    probs = jax.nn.softmax(jnp.where((own | mem)[None, None], scores, -1e30), axis=-1)
    out = (jnp.einsum("BNSR,BRNH->BSNH", probs * own[None, None], v)
           + jnp.einsum("BNSR,BRNH->BSNH", probs * mem[None, None], v_mem))
    a = x + jnp.einsum("BTNH,NHD->BTD", out, w["o"])
    x = a + L.swiglu(L.rms_norm(a, w["mlp_norm"], cfg.rms_eps), w["gate"], w["up"], w["down"])
  return L.rms_norm(x, params["final_norm"], cfg.rms_eps) @ params["lm_head"]


def _loss(logits):
  return jnp.mean(jax.nn.log_softmax(logits)[..., 3] * jnp.arange(logits.shape[1])[None, :])


def _grads(model, toks):
  return nnx.to_pure_dict(nnx.grad(lambda m: _loss(m(toks)))(model))


@pytest.mark.slow
def test_mem_stop_gradient_matches_a_dense_reference():
  cfg = tiny(attention="bswa", block_size=4, mem_segments=1, n_kv_heads=4)
  toks = jnp.asarray(tokens(2, 14))
  model, _ = build(cfg)
  stopped = Transformer(cfg.replace(mem_stop_gradient=True), params=model.params_dict())
  np.testing.assert_array_equal(np.asarray(stopped(toks)), np.asarray(model(toks)))  # forward unchanged
  params = model.params_dict()
  for m, stop in ((model, False), (stopped, True)):
    want = jax.grad(lambda p: _loss(dense_bswa_logits(p, cfg, toks, stop)))(params)
    got = _grads(m, toks)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  g_default, g_stopped = _grads(model, toks), _grads(stopped, toks)
  assert np.abs(g_default["layers"]["k"] - g_stopped["layers"]["k"]).max() > 1e-4


@pytest.mark.slow
def test_mem_stop_gradient_in_fam_touches_only_the_memory_blocks():
  toks = jnp.asarray(tokens(2, 14))
  for mem, differs in ((0, False), (1, True)):  # without memory blocks there is nothing to stop
    cfg = tiny(attention="fam", block_size=4, mem_segments=mem, fam_len=2)
    model, _ = build(cfg)
    stopped = Transformer(cfg.replace(mem_stop_gradient=True), params=model.params_dict())
    np.testing.assert_array_equal(np.asarray(stopped(toks)), np.asarray(model(toks)))
    g, gs = _grads(model, toks), _grads(stopped, toks)
    delta = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gs)))
    assert (delta > 1e-5) == differs, (mem, delta)
    assert float(np.abs(gs["fam_prompt"]).max()) > 0  # the FAM path still learns


# -- fam_init="prefix": its parameter everywhere ----------------------------------------------------

@pytest.mark.slow
def test_prefix_parameter_axes_lora_and_gradient():
  cfg = tiny(attention="fam", block_size=4, mem_segments=1, fam_len=2, fam_init="prefix")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  params = model.params_dict()
  assert "fam_prompt" not in params and params["layers"]["fam_prefix"].shape == (2, 2, 32)
  np.testing.assert_array_equal(np.asarray(model.prompt_fam()), np.asarray(params["layers"]["fam_prefix"]))
  axes = model_logical_axes(cfg)
  assert "fam_prompt" not in axes and axes["layers"]["fam_prefix"] == ("layers", "fam", "embed")
  lcfg = LoraConfig(rank=2)
  trainable, frozen = lora.split(params, lcfg, jax.random.key(0))
  assert "fam_prefix" in trainable["fam_gate"] and "fam_prefix" not in frozen["layers"]
  t_axes, f_axes = lora.trainable_logical_axes(lcfg, axes)
  assert t_axes["fam_gate"]["fam_prefix"] == ("layers", "fam", "embed") and "fam_prefix" not in f_axes["layers"]
  merged = lora.combine(trainable, frozen, lcfg)
  np.testing.assert_array_equal(np.asarray(merged["layers"]["fam_prefix"]),
                                np.asarray(params["layers"]["fam_prefix"]))
  toks = jnp.asarray(tokens(1, 13))
  grad = jax.grad(lambda t: _loss(Transformer(cfg, params=lora.combine(t, frozen, lcfg))(toks)))(trainable)
  assert float(jnp.abs(grad["fam_gate"]["fam_prefix"]).max()) > 0  # trained in full, as the prompt


@pytest.mark.slow
def test_ablation_configs_round_trip_through_hf(tmp_path):
  cfg = tiny(attention="fam", block_size=4, mem_segments=1, fam_len=2, fam_init="prefix",
             fam_position="zero", fam_history=2, mem_stop_gradient=True)
  model, _ = build(cfg)
  loaded = from_hf(to_hf(model, tmp_path / "prefix"))
  assert loaded.config == cfg
  for a, b in zip(jax.tree.leaves(loaded.params_dict()), jax.tree.leaves(model.params_dict())):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  toks = tokens(1, 13)
  np.testing.assert_array_equal(np.asarray(loaded(toks)), np.asarray(model(toks)))
  swa = tiny(attention="swa", window=6, block_size=4)
  assert from_hf(to_hf(build(swa)[0], tmp_path / "swa")).config == swa
  # A checkpoint without a prefix (a prompt model): every layer starts from the prompt's initial rows.
  plain = from_hf(to_hf(build(tiny(attention="fam", block_size=4, fam_len=2))[0], tmp_path / "plain"),
                  fam_init="prefix")
  prefix = np.asarray(plain.params_dict()["layers"]["fam_prefix"])
  assert prefix.shape == (2, 2, 32)
  np.testing.assert_array_equal(prefix[0], prefix[1])


# -- config errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,field", [
    (dict(attention="swa"), "window"),                                  # swa without a window
    (dict(attention="bswa", window=8), "window"),                       # a window without swa
    (dict(attention="swa", window=-1), "window"),
    (dict(attention="full", mem_stop_gradient=True), "mem_stop_gradient"),
    (dict(attention="swa", window=4, mem_stop_gradient=True), "mem_stop_gradient"),
    (dict(attention="fam", mem_stop_gradient="yes"), "mem_stop_gradient"),
    (dict(attention="bswa", fam_len=0, fam_position="zero"), "fam_position"),
    (dict(attention="fam", fam_len=0, fam_init="prefix"), "fam_init"),
    (dict(attention="swa", window=4, fam_history=2), "fam_history"),
    (dict(attention="fam", fam_position="middle"), "fam_position"),
    (dict(attention="fam", fam_init="random"), "fam_init"),
    (dict(attention="fam", fam_history=0), "fam_history"),
    (dict(attention="fam", fam_history=True), "fam_history"),
])
def test_meaningless_combinations_are_refused(kw, field):
  with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
    tiny(**kw)


def test_defaults_are_the_spec():
  cfg = tiny()
  assert (cfg.window, cfg.mem_stop_gradient, cfg.fam_position, cfg.fam_init, cfg.fam_history) == \
      (0, False, "last", "prompt", 1)
  assert cfg.memory_blocks == cfg.mem_segments
  assert tiny(attention="swa", window=9, block_size=4).memory_blocks == 2
  assert tiny(attention="swa", window=1, block_size=4).memory_blocks == 0
