"""The parallel forward of famjax.Transformer against the float64 reference of spec §3-§5 (tests/reference.py),
and the relations the spec states between the attention modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from famjax import FamState, ModelConfig, Transformer
from reference import reference_forward, reference_params

TINY = dict(vocab_size=37, d_model=32, n_layers=2, mlp_dim=48, dtype="float32", remat="none")


def tiny(**kw) -> ModelConfig:
  return ModelConfig(**{**TINY, "n_heads": 4, "n_kv_heads": 2, **kw})


def build(cfg, seed=0):
  """A model and the float64 parameters it was built from (shared with the reference)."""
  p64 = reference_params(cfg, seed)
  return Transformer(cfg, params=jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p64)), p64


def rel_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def tokens(batch, length, seed=1, vocab=37):
  return np.random.RandomState(seed).randint(0, vocab, (batch, length))


SLOW = pytest.mark.slow  # (the fast tier, make test-fast, keeps one case of each mode)
CASES = [
    # (attention, block_size, mem_segments, fam_len, n_heads, n_kv_heads)
    ("full", 8, 1, 0, 4, 4),      # MHA
    pytest.param("full", 8, 1, 0, 4, 1, marks=SLOW),      # MQA
    pytest.param("bswa", 8, 0, 0, 4, 2, marks=SLOW),      # GQA, no memory: block-local only
    pytest.param("bswa", 8, 1, 0, 4, 4, marks=SLOW),
    ("bswa", 4, 3, 0, 4, 2),
    ("fam", 8, 1, 4, 4, 2),
    ("fam", 8, 0, 3, 4, 1),       # the paper's PassKey setting: FAM with 0 memory segments, MQA
    pytest.param("fam", 4, 2, 4, 4, 4, marks=SLOW),       # F == B
    pytest.param("fam", 6, 1, 1, 2, 2, marks=SLOW),
]


@pytest.mark.parametrize("attention,block,mem,fam,heads,kv", CASES)
def test_parallel_forward_matches_reference(attention, block, mem, fam, heads, kv):
  cfg = tiny(attention=attention, block_size=block, mem_segments=mem, fam_len=fam, n_heads=heads,
             n_kv_heads=kv)
  model, p64 = build(cfg)
  toks = tokens(2, 29)  # several blocks and a partial last block
  ref, ref_fam = reference_forward(p64, cfg, toks, return_fam=True)
  logits, fam_state = model(toks, return_fam_state=True)
  assert logits.shape == (2, 29, cfg.vocab_size) and logits.dtype == jnp.float32
  assert rel_err(logits, ref) < 2e-5
  if cfg.has_fam:
    assert rel_err(fam_state.values, ref_fam) < 2e-5
    assert not np.asarray(fam_state.from_prompt).any()


@pytest.mark.slow
def test_tied_embeddings_and_embed_scale_match_reference():
  cfg = tiny(attention="fam", block_size=8, mem_segments=1, fam_len=4, tie_embeddings=True,
             embed_scale=True)
  model, p64 = build(cfg)
  assert "lm_head" not in model.params_dict()
  toks = tokens(1, 20)
  assert rel_err(model(toks), reference_forward(p64, cfg, toks)) < 2e-5


@pytest.mark.slow
def test_initial_fam_state_rsp_matches_reference():
  """Spec §6 RSP: start from a passed state, whose first update keeps the residual."""
  cfg = tiny(attention="fam", block_size=8, mem_segments=1, fam_len=4)
  model, p64 = build(cfg)
  toks = tokens(2, 24)
  init = np.random.RandomState(3).normal(size=(2, 2, 4, 32))
  ref, ref_fam = reference_forward(p64, cfg, toks, initial_fam=init, return_fam=True)
  state = FamState(jnp.asarray(init, jnp.float32), jnp.zeros((2,), bool))
  logits, fam_state = model(toks, fam_state=state, return_fam_state=True)
  assert rel_err(logits, ref) < 2e-5
  assert rel_err(fam_state.values, ref_fam) < 2e-5


@pytest.mark.parametrize("mem", [0, pytest.param(1, marks=SLOW)])
def test_fam_gate_matches_reference(mem):
  """The FAM write gate (ModelConfig.fam_gate, a famjax extension) against the reference, from the
  prompt (the first update ungated) and from a passed state (every update gated)."""
  cfg = tiny(attention="fam", block_size=8, mem_segments=mem, fam_len=4, fam_gate=True)
  model, p64 = build(cfg)
  toks = tokens(2, 29)
  ref, ref_fam = reference_forward(p64, cfg, toks, return_fam=True)
  logits, fam_state = model(toks, return_fam_state=True)
  assert rel_err(logits, ref) < 2e-5 and rel_err(fam_state.values, ref_fam) < 2e-5
  init = np.random.RandomState(3).normal(size=(2, 2, 4, 32))
  ref, ref_fam = reference_forward(p64, cfg, toks, initial_fam=init, return_fam=True)
  logits, fam_state = model(toks, fam_state=FamState(jnp.asarray(init, jnp.float32), jnp.zeros((2,), bool)),
                            return_fam_state=True)
  assert rel_err(logits, ref) < 2e-5 and rel_err(fam_state.values, ref_fam) < 2e-5
  # The gate does something: the ungated model differs.
  plain = Transformer(cfg.replace(fam_gate=False), params={
      **model.params_dict(), "layers": {k: v for k, v in model.params_dict()["layers"].items()
                                        if not k.startswith("fam_gate")}})
  assert rel_err(plain(toks), ref) > 1e-3


@pytest.mark.parametrize("mem", [0, pytest.param(1, marks=SLOW)])
def test_fam_gate_with_packed_examples_matches_reference(mem):
  """The path the gated PassKey model trains on: packed examples under segment ids, with gate weights
  that spread the gate over (0, 1) (the reference's N(0, 1) draws, not the zero init's g = 1/2). Each
  example computes the reference's result for it alone, from the prompt (its later updates gated) and
  from a passed state (every update gated), and the row's final FAM is the last example's."""
  cfg = tiny(attention="fam", block_size=4, mem_segments=mem, fam_len=2, fam_gate=True)
  model, p64 = build(cfg)
  a, b = tokens(2, 8, seed=5), tokens(2, 12, seed=6)  # 2 and 3 blocks, each example block-aligned
  packed = jnp.asarray(np.concatenate([a, b, np.zeros((2, 4), int)], axis=1))
  seg = jnp.asarray(np.array([[1] * 8 + [2] * 12 + [0] * 4] * 2))
  init = np.random.RandomState(9).normal(size=(2, 2, 2, 32))
  for start in (None, init):
    state = None if start is None else FamState(jnp.asarray(start, jnp.float32), jnp.zeros((2,), bool))
    out, final = model(packed, segment_ids=seg, token_mask=seg > 0, fam_state=state, return_fam_state=True)
    ref_a = reference_forward(p64, cfg, a, initial_fam=start)
    ref_b, ref_b_fam = reference_forward(p64, cfg, b, initial_fam=start, return_fam=True)
    assert rel_err(out[:, :8], ref_a) < 2e-5 and rel_err(out[:, 8:20], ref_b) < 2e-5
    assert rel_err(final.values, ref_b_fam) < 2e-5


def test_fam_gate_needs_fam():
  with pytest.raises(ValueError, match="fam_gate"):
    tiny(attention="bswa", block_size=8, fam_len=0, fam_gate=True)
  with pytest.raises(ValueError, match="fam_gate"):
    tiny(attention="fam", block_size=8, fam_len=0, fam_gate=True)
  with pytest.raises(ValueError, match="fam_gate"):
    tiny(attention="fam", block_size=8, fam_len=4, fam_gate="yes")


@pytest.mark.slow
def test_prompt_fam_is_the_prompt_pass():
  """With fewer tokens than a block there is no update: the returned state is the prompt's (§4)."""
  cfg = tiny(attention="fam", block_size=8, mem_segments=1, fam_len=4)
  model, p64 = build(cfg)
  _, ref_fam = reference_forward(p64, cfg, tokens(1, 5), return_fam=True)
  logits, fam_state = model(tokens(1, 5), return_fam_state=True)
  assert rel_err(fam_state.values, ref_fam) < 2e-5
  assert np.asarray(fam_state.from_prompt).all()
  np.testing.assert_allclose(model.prompt_fam()[0], p64["fam_prompt"], rtol=1e-6)  # Z_1 = P


@pytest.mark.slow
def test_small_position_offsets_match_reference():
  cfg = tiny(attention="fam", block_size=8, mem_segments=1, fam_len=4)
  model, p64 = build(cfg)
  toks = tokens(2, 20)
  offset = np.array([0.0, 37.5])
  ref = reference_forward(p64, cfg, toks, position_offset=offset)
  assert rel_err(model(toks, position_offset=jnp.asarray(offset)), ref) < 2e-5


@pytest.mark.slow
def test_rpo_offset_acts_only_through_float32_rounding():
  """Spec §6: a zero offset is exactly no offset; an offset of order 2*pi*theta perturbs logits by
  float32 angle rounding only (exact relative angles would cancel it)."""
  cfg = tiny(attention="fam", block_size=8, mem_segments=1, fam_len=4)
  model, _ = build(cfg)
  toks = tokens(2, 20)
  base = np.asarray(model(toks))
  np.testing.assert_array_equal(np.asarray(model(toks, position_offset=jnp.zeros(2))), base)
  rpo = np.asarray(model(toks, position_offset=jnp.array([0.0, 2 * np.pi * cfg.rope_theta * 0.9])))
  np.testing.assert_array_equal(rpo[0], base[0])
  diff = np.abs(rpo[1] - base[1]).max() / np.abs(base[1]).max()
  assert 1e-6 < diff < 5e-2, diff


def test_token_mask_padding_matches_unpadded():
  """Right padding is masked everywhere, and a block with padding does not update the FAM."""
  cfg = tiny(attention="fam", block_size=4, mem_segments=1, fam_len=2)
  model, _ = build(cfg)
  toks = tokens(2, 18)
  mask = np.ones((2, 18), bool)
  mask[1, 10:] = False
  logits, fam = model(toks, token_mask=jnp.asarray(mask), return_fam_state=True)
  short, short_fam = model(toks[1:, :10], return_fam_state=True)
  np.testing.assert_allclose(logits[1, :10], short[0], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(fam.values[:, 1], short_fam.values[:, 0], rtol=2e-5, atol=2e-5)
  full_logits = model(toks[:1])
  np.testing.assert_allclose(logits[0], full_logits[0], rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_bswa_with_enough_memory_equals_full():
  toks = tokens(2, 27)  # 4 blocks of 8: m = 3 covers every earlier block
  full, _ = build(tiny(attention="full"))
  bswa, _ = build(tiny(attention="bswa", block_size=8, mem_segments=3))
  np.testing.assert_allclose(bswa(toks), full(toks), rtol=1e-5, atol=1e-5)
  short, _ = build(tiny(attention="bswa", block_size=8, mem_segments=1))
  assert np.abs(np.asarray(short(toks)) - np.asarray(full(toks))).max() > 1e-3  # and m = 1 does not


@pytest.mark.parametrize("mem", [0, pytest.param(1, marks=SLOW)])
def test_fam_with_zero_length_equals_bswa(monkeypatch, mem):
  """Spec §2: FAM with F = 0 is BSWA. ModelConfig sends attention="fam" with fam_len=0 down the bswa
  path; here the FAM path itself runs with F = 0 (a [0, D] prompt and state, the scan over blocks, the
  FAM keys of every block) and gives bswa's logits, which the bswa path computes without any of it."""
  from famjax.model import config as model_config
  toks = tokens(2, 27)
  bswa, _ = build(tiny(attention="bswa", block_size=8, mem_segments=mem))
  monkeypatch.setattr(model_config.ModelConfig, "has_fam", property(lambda c: c.attention == "fam"))
  fam0 = Transformer(tiny(attention="fam", block_size=8, mem_segments=mem, fam_len=0),
                     params={**bswa.params_dict(), "fam_prompt": jnp.zeros((0, 32))})
  logits, state = fam0(toks, return_fam_state=True)
  assert state.values.shape == (2, 2, 0, 32)  # the FAM path ran
  np.testing.assert_allclose(np.asarray(logits), np.asarray(bswa(toks)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attention", ["full", "bswa", "fam"])
def test_causality(attention):
  model, _ = build(tiny(attention=attention, block_size=4, mem_segments=1, fam_len=2))
  toks = tokens(1, 21)
  base = np.asarray(model(toks))
  for t in (3, 4, 13, 20):  # inside a block, at a block start, later blocks
    changed = toks.copy()
    changed[0, t] = (changed[0, t] + 1) % 37
    out = np.asarray(model(changed))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.abs(out[:, t] - base[:, t]).max() > 0


def test_fam_carries_information_beyond_the_window():
  """Token 0 reaches a token 4 blocks later through FAM, never through bswa with m = 1."""
  toks = tokens(1, 24)
  changed = toks.copy()
  changed[0, 0] = (changed[0, 0] + 5) % 37
  for attention, reaches in (("bswa", False), ("fam", True)):
    model, _ = build(tiny(attention=attention, block_size=4, mem_segments=1, fam_len=2))
    delta = np.abs(np.asarray(model(toks))[0, 20:] - np.asarray(model(changed))[0, 20:]).max()
    assert (delta > 1e-6) == reaches, (attention, delta)


@pytest.mark.slow
def test_bfloat16_compute_tracks_float32():
  cfg = tiny(attention="fam", block_size=8, mem_segments=1, fam_len=4)
  model32, p64 = build(cfg)
  model16 = Transformer(cfg.replace(dtype="bfloat16"), params=model32.params_dict())
  toks = tokens(2, 24)
  out16 = model16(toks)
  assert out16.dtype == jnp.float32  # logits leave in float32 whatever the compute dtype
  assert rel_err(out16, reference_forward(p64, cfg, toks)) < 5e-2


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots", "save_qkv_proj", "offload_dots_no_batch", "offload_qkv_proj"])
def test_remat_policies_keep_gradients(remat):
  """Against no remat. The offload policies compile and run on CPU too, where JAX lowers the transfers to
  host memory to nothing (a training job refuses them there: tests/test_train_config.py)."""
  cfg = tiny(attention="fam", block_size=4, mem_segments=1, fam_len=2)
  toks = jnp.asarray(tokens(2, 13))

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(toks))[..., 0])

  ref_model = Transformer(cfg, rngs=nnx.Rngs(0))
  model = Transformer(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
  g_ref = nnx.grad(loss)(ref_model)
  g = nnx.grad(loss)(model)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(g["fam_prompt"][...]).max()) > 0  # the prompt learns through the prompt pass


def _forward_grads(params, cfg, toks, **kw):
  from famjax.model import transformer

  def loss(p):
    state = transformer.empty_state(p, cfg, toks.shape[0])
    out, new_state = transformer.forward(p, cfg, toks, state, max_pending=0, **kw)
    return jnp.mean(jax.nn.log_softmax(out)[..., 0]) + jnp.mean(new_state.fam.astype(jnp.float32) ** 2)
  return jax.jit(jax.grad(loss))(params)


@pytest.mark.slow
def test_remat_full_keeps_gradients_with_packing_padding_and_offsets():
  """remat="full" is a custom VJP (famjax.model.transformer.remat_full) that takes the packed examples'
  ids, the padding mask and the RPO offsets as explicit arguments; its gradients are no remat's, the
  FAM state's gradient included."""
  cfg = tiny(attention="fam", block_size=4, mem_segments=1, fam_len=2)
  params = Transformer(cfg, rngs=nnx.Rngs(0)).params_dict()
  toks = jnp.asarray(tokens(2, 13))
  seg = jnp.asarray(np.array([[1] * 8 + [2] * 5, [1] * 9 + [0] * 4]))
  kw = dict(token_mask=seg > 0, segment_ids=seg, position_offset=jnp.asarray([3.0, 70.0]))
  ref = _forward_grads(params, cfg, toks, **kw)
  got = _forward_grads(params, cfg.replace(remat="full"), toks, **kw)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_remat_full_keeps_the_layer_inputs_without_a_float32_copy(monkeypatch):
  """In bfloat16, what remat keeps of 4 layers of 256 tokens x 64 is the stack of the layers' inputs,
  [4, 1, 256, 64]. Under jax.checkpoint XLA:CPU converts that stack to float32 before the backward loop
  (an f32[4,1,256,64] array in the compiled program; the same at the 24B config's sizes, where it was
  7.44 GiB); kept as bits (remat_full) there is none, the temporaries are smaller, and the gradients are
  the same."""
  from famjax.model import transformer
  cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=4, mlp_dim=64,
                    attention="bswa", block_size=32, mem_segments=1, fam_len=0, dtype="bfloat16",
                    remat="full")
  params = Transformer(cfg, rngs=nnx.Rngs(0)).params_dict()
  toks = jnp.asarray(tokens(1, 256, vocab=64))

  def compiled():
    def loss(p, t):
      out, _ = transformer.forward(p, cfg, t, transformer.empty_state(p, cfg, 1), max_pending=0)
      return jnp.mean(out)
    step = jax.jit(jax.grad(loss))
    program = step.lower(params, toks).compile()
    return program.as_text(), program.memory_analysis().temp_size_in_bytes, step(params, toks)

  bits_text, bits, grads = compiled()
  monkeypatch.setattr(transformer, "remat_full",
                      lambda layer, dtype: jax.checkpoint(layer, prevent_cse=False))
  checkpoint_text, checkpointed, ref = compiled()
  assert "f32[4,1,256,64]" in checkpoint_text  # the copy this test looks for, where it exists
  assert "f32[4,1,256,64]" not in bits_text and "u16[4,1,256,64]" in bits_text
  assert bits < checkpointed, (bits, checkpointed)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):  # bfloat16 rounding of each array's scale
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


def test_bad_params_are_named():
  cfg = tiny(attention="fam", block_size=8, mem_segments=1, fam_len=4)
  params = Transformer(cfg).params_dict()
  wrong = {**params, "layers": {**params["layers"], "q": params["layers"]["q"][:, :, :2]}}
  with pytest.raises(ValueError, match="layers/q"):
    Transformer(cfg, params=wrong)
  missing = {k: v for k, v in params.items() if k != "fam_prompt"}
  with pytest.raises(ValueError, match="fam_prompt"):
    Transformer(cfg, params=missing)


def _named_leaves(params: dict) -> dict:
  """{"layers/q": array, ...} of a parameter tree."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(entry.key for entry in path): np.asarray(a) for path, a in flat}


def test_init_draws_every_parameter_from_its_name():
  """init_params: a parameter's draw depends only on the key and its name (params.param_key), so a switch
  that adds parameters (fam_gate; fam's prompt) leaves every other one as it was at the same seed, and
  different names get different draws."""
  from famjax.model import init_params
  key = jax.random.key(3)
  fam = _named_leaves(init_params(tiny(attention="fam", block_size=8, mem_segments=1, fam_len=2), key))
  gated = _named_leaves(init_params(tiny(attention="fam", block_size=8, mem_segments=1, fam_len=2,
                                         fam_gate=True), key))
  bswa = _named_leaves(init_params(tiny(attention="bswa", block_size=8, mem_segments=1), key))
  assert set(gated) - set(fam) == {"layers/fam_gate", "layers/fam_gate_bias"}
  assert set(fam) - set(bswa) == {"fam_prompt"} and set(bswa) < set(fam)
  for name, value in fam.items():
    np.testing.assert_array_equal(gated[name], value, err_msg=name)
  for name, value in bswa.items():
    np.testing.assert_array_equal(fam[name], value, err_msg=name)

  mha = _named_leaves(init_params(tiny(n_kv_heads=4), key))
  for a, b in [("layers/q", "layers/k"), ("layers/k", "layers/v"), ("layers/gate", "layers/up")]:
    assert mha[a].shape == mha[b].shape and not np.any(mha[a] == mha[b]), (a, b)
  other = _named_leaves(init_params(tiny(n_kv_heads=4), jax.random.key(4)))
  assert not np.any(other["layers/q"] == mha["layers/q"])


@pytest.mark.slow
@pytest.mark.parametrize("attention,mem", [("full", 0), ("bswa", 4), ("bswa", 1)])
def test_segment_ids_isolate_packed_examples(attention, mem):
  """With segment ids, each packed example sees only itself (bswa with enough memory = full)."""
  model, _ = build(tiny(attention=attention, block_size=4, mem_segments=mem))
  a, b = tokens(1, 7, seed=5), tokens(1, 12, seed=6)
  packed = np.concatenate([a, b], axis=1)
  seg = np.array([[1] * 7 + [2] * 12])
  out = np.asarray(model(packed, segment_ids=jnp.asarray(seg)))
  np.testing.assert_allclose(out[:, :7], np.asarray(model(a)), rtol=2e-5, atol=2e-5)
  if mem >= 3:  # every earlier block is in the window, so block alignment does not matter
    np.testing.assert_allclose(out[:, 7:], np.asarray(model(b)), rtol=2e-5, atol=2e-5)
  unmasked = np.asarray(model(packed))
  assert np.abs(unmasked[:, 7:] - out[:, 7:]).max() > 1e-4  # without ids, b reads a


@pytest.mark.parametrize("mem", [0, pytest.param(1, marks=SLOW)])
def test_segment_ids_restart_the_fam_for_every_example(mem):
  """[famjax] With segment ids, a packed example that starts at a block boundary computes exactly what it
  computes alone (each from the row's initial FAM: the prompt's, or a passed RSP state), and trailing
  padding keeps the last example's FAM."""
  model, _ = build(tiny(attention="fam", block_size=4, mem_segments=mem, fam_len=2))
  a, b = tokens(2, 8, seed=5), tokens(2, 12, seed=6)
  packed = jnp.asarray(np.concatenate([a, b, np.zeros((2, 4), int)], axis=1))
  seg = jnp.asarray(np.array([[1] * 8 + [2] * 12 + [0] * 4] * 2))
  passed = FamState(values=jnp.asarray(np.random.RandomState(9).normal(size=(2, 2, 2, 32)), jnp.float32),
                    from_prompt=jnp.zeros((2,), bool))
  for state in (None, passed):
    out, final = model(packed, segment_ids=seg, token_mask=seg > 0, fam_state=state, return_fam_state=True)
    alone_b, final_b = model(b, fam_state=state, return_fam_state=True)
    np.testing.assert_allclose(out[:, :8], model(a, fam_state=state), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out[:, 8:20], alone_b, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(final.values, final_b.values, rtol=2e-5, atol=2e-5)
  unmasked = np.asarray(model(packed, token_mask=seg > 0))
  assert np.abs(unmasked[:, 8:20] - np.asarray(out[:, 8:20])).max() > 1e-4  # without ids, b reads a


@pytest.mark.slow
def test_segment_ids_with_fam_never_leak_across_unaligned_examples():
  """An example that starts inside a block reads no FAM there; nothing of the one before reaches it."""
  model, _ = build(tiny(attention="fam", block_size=4, mem_segments=1, fam_len=2))
  b = tokens(1, 13, seed=6)
  seg = jnp.asarray(np.array([[1] * 7 + [2] * 13]))
  outs = [np.asarray(model(jnp.asarray(np.concatenate([tokens(1, 7, seed=s), b], axis=1)), segment_ids=seg))
          for s in (5, 7)]
  np.testing.assert_allclose(outs[0][:, 7:], outs[1][:, 7:], rtol=1e-6, atol=1e-6)
  assert np.abs(outs[0][:, :7] - outs[1][:, :7]).max() > 1e-3
