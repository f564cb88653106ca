"""Self-consistency checks of the NumPy reference (tests/reference.py) alone, from docs/fam.md.

No JAX model is involved: these test properties the specification implies, so the oracle the JAX model is
held against is itself trustworthy.
"""

import dataclasses
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import reference as ref  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Cfg:
  """Stand-in for famjax.ModelConfig with just the attributes the reference reads."""
  vocab_size: int = 23
  d_model: int = 16
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 6
  mlp_dim: int = 24
  attention: str = "fam"
  block_size: int = 4
  mem_segments: int = 1
  fam_len: int = 2
  rope_theta: float = 10_000.0
  rms_eps: float = 1e-6
  tie_embeddings: bool = False
  embed_scale: bool = False

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


def _tokens(cfg, batch, T, seed=0):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(batch, T))


MODES = [
    Cfg(attention="full"),
    Cfg(attention="bswa", mem_segments=1),
    Cfg(attention="bswa", mem_segments=0),
    Cfg(attention="fam", mem_segments=1, fam_len=2),
    Cfg(attention="fam", mem_segments=0, fam_len=4),
    Cfg(attention="fam", mem_segments=2, fam_len=3, n_kv_heads=1, tie_embeddings=True, embed_scale=True),
]


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------

def test_rope_identity_at_zero_and_relative():
  rng = np.random.default_rng(1)
  H = 8
  q = rng.standard_normal((1, 1, H))
  k = rng.standard_normal((1, 1, H))
  np.testing.assert_allclose(ref.rope(q, np.array([0.0]), 10_000.0), q, atol=0)
  # Norm preserved, and <rope(q, a), rope(k, b)> depends only on a - b.
  r = ref.rope(q, np.array([7.5]), 10_000.0)
  np.testing.assert_allclose(np.linalg.norm(r), np.linalg.norm(q), rtol=1e-12)
  dots = [float(np.sum(ref.rope(q, np.array([a + 3.0]), 100.0) * ref.rope(k, np.array([a]), 100.0)))
          for a in (0.0, 11.0, -5.25, 1000.0)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-10, atol=1e-12)


def test_rope_hf_rotate_half_pairs():
  # Pair (i, i + H/2) rotates by angle pos * theta^(-2i/H).
  H, theta, pos = 4, 100.0, 3.0
  x = np.zeros((1, 1, H))
  x[0, 0, 1] = 1.0                                  # first half, i = 1
  out = ref.rope(x, np.array([pos]), theta)[0, 0]
  ang = pos * theta ** (-2.0 * 1 / H)
  np.testing.assert_allclose(out, [0.0, np.cos(ang), 0.0, np.sin(ang)], atol=1e-15)


def test_bswa_mask_shape():
  mask = ref.bswa_mask(7, 3, 1)
  # token 6 (block 2, partial) sees block 1 whole (3, 4, 5) and itself.
  assert mask[6].tolist() == [False, False, False, True, True, True, True]
  # token 3 (first of block 1) sees all of block 0 and itself, not token 4.
  assert mask[3].tolist() == [True, True, True, True, False, False, False]


# ---------------------------------------------------------------------------------------------------
# Equivalences stated in spec §2
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [13, 16])
def test_bswa_with_all_memory_equals_full(T):
  cfg = Cfg(attention="bswa", block_size=4, mem_segments=-(-T // 4) - 1)
  params = ref.reference_params(cfg, 0)
  tokens = _tokens(cfg, 2, T)
  full = ref.reference_forward(params, cfg.replace(attention="full"), tokens)
  bswa = ref.reference_forward(params, cfg, tokens)
  np.testing.assert_allclose(bswa, full, rtol=1e-12, atol=1e-12)
  # and with less memory it differs (the test has teeth)
  short = ref.reference_forward(params, cfg.replace(mem_segments=1), tokens)
  assert np.max(np.abs(short - full)) > 1e-3


@pytest.mark.parametrize("m", [0, 1, 2])
def test_fam_with_zero_length_equals_bswa(monkeypatch, m):
  """The reference's FAM layer (fam_layer: Algorithm 2, block by block) with F = 0 rows gives its bswa
  layer's result (plain_layer: one T x T mask), two independent implementations of spec §2's relation."""
  cfg = Cfg(attention="fam", fam_len=0, mem_segments=m)
  params = ref.reference_params(cfg, 3)
  assert "fam_prompt" not in params  # fam_len = 0: no FAM (reference_forward runs plain_layer)
  tokens = _tokens(cfg, 2, 11)
  bswa = ref.reference_forward(params, cfg.replace(attention="bswa"), tokens)
  monkeypatch.setattr(ref, "_has_fam", lambda c: c.attention == "fam")  # through fam_layer instead
  fam, state = ref.reference_forward({**params, "fam_prompt": np.zeros((0, cfg.d_model))}, cfg, tokens,
                                     return_fam=True)
  assert state.shape == (cfg.n_layers, 2, 0, cfg.d_model)
  np.testing.assert_allclose(fam, bswa, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# Causality and positions
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", MODES, ids=lambda c: f"{c.attention}-m{c.mem_segments}-F{c.fam_len}")
@pytest.mark.parametrize("t", [0, 5, 8, 10])
def test_causality(cfg, t):
  params = ref.reference_params(cfg, 5)
  tokens = _tokens(cfg, 1, 11)
  changed = tokens.copy()
  changed[0, t] = (changed[0, t] + 1) % cfg.vocab_size
  a = ref.reference_forward(params, cfg, tokens)
  b = ref.reference_forward(params, cfg, changed)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.max(np.abs(a[:, t] - b[:, t])) > 1e-6


@pytest.mark.parametrize("cfg", MODES, ids=lambda c: f"{c.attention}-m{c.mem_segments}-F{c.fam_len}")
def test_scalar_offset_is_invisible(cfg):
  params = ref.reference_params(cfg, 7)
  tokens = _tokens(cfg, 2, 10)
  base, fam0 = ref.reference_forward(params, cfg, tokens, return_fam=True)
  for offset in (37.5, 1234.25):
    out, fam1 = ref.reference_forward(params, cfg, tokens, position_offset=offset, return_fam=True)
    np.testing.assert_allclose(out, base, rtol=0, atol=1e-9)
    if fam0 is not None:
      np.testing.assert_allclose(fam1, fam0, rtol=0, atol=1e-9)


def test_per_example_offset_matches_separate_runs():
  cfg = Cfg(attention="fam", mem_segments=1, fam_len=2, rope_theta=10.0)  # small theta: angles matter
  params = ref.reference_params(cfg, 8)
  tokens = _tokens(cfg, 2, 9)
  offsets = np.array([0.0, 2.5])
  both = ref.reference_forward(params, cfg, tokens, position_offset=offsets)
  for b in range(2):
    alone = ref.reference_forward(params, cfg, tokens[b:b + 1], position_offset=offsets[b])
    np.testing.assert_allclose(both[b:b + 1], alone, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# FAM specifics (spec §3-§6)
# ---------------------------------------------------------------------------------------------------

def test_initial_state_is_prompt_pass_and_prompt_unscaled():
  cfg = Cfg(attention="fam", fam_len=3, embed_scale=True)
  params = ref.reference_params(cfg, 9)
  tokens = _tokens(cfg, 2, 3)  # T < B: no complete block, the returned state is the initial one
  _, state = ref.reference_forward(params, cfg, tokens, return_fam=True)
  assert state.shape == (cfg.n_layers, 2, cfg.fam_len, cfg.d_model)
  z = ref.prompt_pass(params, cfg)
  for layer in range(cfg.n_layers):
    for b in range(2):
      np.testing.assert_array_equal(state[layer, b], z[layer])
  np.testing.assert_array_equal(state[0, 0], params["fam_prompt"])  # Z_1 = P, no sqrt(D)


def test_partial_block_does_not_update_fam():
  cfg = Cfg(attention="fam", fam_len=2, block_size=4)
  params = ref.reference_params(cfg, 10)
  tokens = _tokens(cfg, 2, 11)
  out_full, fam_full = ref.reference_forward(params, cfg, tokens, return_fam=True)
  out_cut, fam_cut = ref.reference_forward(params, cfg, tokens[:, :8], return_fam=True)
  np.testing.assert_array_equal(fam_full, fam_cut)
  np.testing.assert_array_equal(out_full[:, :8], out_cut)
  _, fam_one = ref.reference_forward(params, cfg, tokens[:, :4], return_fam=True)
  assert np.max(np.abs(fam_one - fam_cut)) > 1e-6


def test_single_block_equals_prefix_lm_with_prompt():
  """With T <= B, fam equals prepending the prompt (bidirectional among itself, seen by every token) in
  every layer at positions p_0-F .. p_0-1 (spec §4, §5)."""
  cfg = Cfg(attention="fam", fam_len=3, block_size=8, mem_segments=1)
  params = ref._to_f64(ref.reference_params(cfg, 11))
  tokens = _tokens(cfg, 1, 6)
  offset = 5.0
  expected = ref.reference_forward(params, cfg, tokens, position_offset=offset)

  F, T = cfg.fam_len, tokens.shape[1]
  mask = np.zeros((F + T, F + T), dtype=bool)
  mask[:F, :F] = True
  for i in range(T):
    mask[F + i, :F + i + 1] = True
  positions = offset + np.arange(-F, T, dtype=np.float64)
  x = np.concatenate([params["fam_prompt"], params["embed"][tokens[0]]], axis=0)
  for layer in range(cfg.n_layers):
    w = {name: a[layer] for name, a in params["layers"].items()}
    x = ref.layer_block(w, cfg, x, positions, x, positions, mask)
  logits = ref.rms_norm(x[F:], params["final_norm"], cfg.rms_eps) @ params["lm_head"]
  np.testing.assert_allclose(expected[0], logits, rtol=1e-12, atol=1e-12)


def test_streaming_chunks_with_passed_state():
  """With m = 0, running blocks [0, 8) then [8, 14) from the returned FAM (R = F_prev, offset 8) equals
  one pass over all 14 tokens (spec §3 residual rule, §5 positions, §6 passed state)."""
  cfg = Cfg(attention="fam", fam_len=2, block_size=4, mem_segments=0)
  params = ref.reference_params(cfg, 12)
  tokens = _tokens(cfg, 2, 14)
  whole, fam_whole = ref.reference_forward(params, cfg, tokens, return_fam=True)
  first, fam_first = ref.reference_forward(params, cfg, tokens[:, :8], return_fam=True)
  second, fam_second = ref.reference_forward(params, cfg, tokens[:, 8:], position_offset=8.0,
                                             initial_fam=fam_first, return_fam=True)
  np.testing.assert_allclose(first, whole[:, :8], rtol=0, atol=1e-12)
  np.testing.assert_allclose(second, whole[:, 8:], rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(fam_second, fam_whole, rtol=1e-10, atol=1e-10)


def test_passed_prompt_state_differs_only_by_residual():
  """Passing the prompt states as initial_fam changes the first update's residual (0 -> F_prev), so the
  first block's logits agree and later ones differ."""
  cfg = Cfg(attention="fam", fam_len=2, block_size=4, mem_segments=1)
  params = ref.reference_params(cfg, 13)
  tokens = _tokens(cfg, 1, 10)
  z = np.stack(ref.prompt_pass(ref._to_f64(params), cfg))[:, None]
  a = ref.reference_forward(params, cfg, tokens)
  b = ref.reference_forward(params, cfg, tokens, initial_fam=z)
  np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=0, atol=1e-12)
  assert np.max(np.abs(a[:, 4:] - b[:, 4:])) > 1e-6


def test_fam_reaches_beyond_memory():
  """FAM carries information past the bswa receptive field; bswa does not (spec §8 in miniature)."""
  cfg = Cfg(attention="fam", fam_len=2, block_size=4, mem_segments=0)
  params = ref.reference_params(cfg, 14)
  tokens = _tokens(cfg, 1, 12)
  changed = tokens.copy()
  changed[0, 0] = (changed[0, 0] + 1) % cfg.vocab_size
  for attention, moves in (("fam", True), ("bswa", False)):
    c = cfg.replace(attention=attention)
    d = np.max(np.abs(ref.reference_forward(params, c, tokens)[:, 8:]
                      - ref.reference_forward(params, c, changed)[:, 8:]))
    assert (d > 1e-6) == moves, (attention, d)


def test_gqa_equals_mha_with_repeated_kv():
  cfg = Cfg(attention="fam", n_heads=4, n_kv_heads=2, fam_len=2)
  params = ref.reference_params(cfg, 15)
  group = cfg.n_heads // cfg.n_kv_heads
  mha = {**params, "layers": dict(params["layers"])}
  for name in ("k", "v"):
    mha["layers"][name] = np.repeat(params["layers"][name], group, axis=2)  # head n -> kv head n // group
  tokens = _tokens(cfg, 2, 9)
  a = ref.reference_forward(params, cfg, tokens)
  b = ref.reference_forward(mha, cfg.replace(n_kv_heads=cfg.n_heads), tokens)
  np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_tied_embeddings():
  cfg = Cfg(attention="bswa", tie_embeddings=True)
  params = ref.reference_params(cfg, 16)
  assert "lm_head" not in params
  untied = {**params, "lm_head": params["embed"].T.copy()}
  tokens = _tokens(cfg, 1, 7)
  np.testing.assert_allclose(ref.reference_forward(params, cfg, tokens),
                             ref.reference_forward(untied, cfg.replace(tie_embeddings=False), tokens),
                             rtol=1e-12, atol=1e-12)
