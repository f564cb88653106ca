"""The training step's math: weighted loss, schedules, Adafactor, LoRA, RSP and RPO (spec §6), FLOPs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from famjax import ModelConfig, Transformer
from famjax.model import FamState, init_params, transformer
from famjax.training import flops, lora
from famjax.training.config import FamTrainingConfig, LoraConfig, OptimizerConfig
from famjax.training.loss import weighted_cross_entropy
from famjax.training.optimizer import _bias_corrected_decay, learning_rate_schedule, make_optimizer
from famjax.training.state import new_state
from famjax.training.step import make_train_step, random_position_offset
from famjax.training.synthetic import SyntheticBatches
from famjax.workdir.model import merged_params

TINY = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64,
                   attention="fam", block_size=8, mem_segments=1, fam_len=2, dtype="float32", remat="none")


def batches(n, batch=2, seq=32, seed=0):
  it = SyntheticBatches(batch, seq, seed)
  return [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(n)]


ADAMW = OptimizerConfig(name="adamw", learning_rate=1e-2)
BSWA = TINY.replace(attention="bswa", fam_len=0)


@functools.lru_cache(maxsize=None)
def compiled_step(cfg, lora_cfg, fam_cfg, opt, steps=20):
  """One jitted step per distinct config (compiling dominates these tests' time)."""
  optimizer = make_optimizer(opt, steps)
  step = make_train_step(cfg, lora_cfg, fam_cfg, optimizer, learning_rate_schedule(opt, steps))
  return jax.jit(step), optimizer


@functools.lru_cache(maxsize=None)
def params_of(cfg, seed=0):
  return init_params(cfg, jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def compiled_init(cfg, lora_cfg, opt):
  optimizer = compiled_step(cfg, lora_cfg, FamTrainingConfig(), opt)[1]
  return jax.jit(lambda params, seed: new_state(params, cfg, lora_cfg, optimizer, seed), static_argnums=1)


def make(cfg=TINY, lora_cfg=LoraConfig(), fam_cfg=FamTrainingConfig(), opt=ADAMW, seed=0):
  step, _ = compiled_step(cfg, lora_cfg, fam_cfg, opt)
  return step, compiled_init(cfg, lora_cfg, opt)(params_of(cfg, seed), seed)


# -- the loss --------------------------------------------------------------------------------------------

def test_weighted_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = rng.choice([0.0, 0.1, 1.0], (2, 5)).astype(np.float32)
  lse = np.log(np.exp(logits).sum(-1))
  ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  loss, m = weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), 1e-3)
  np.testing.assert_allclose(m["ce"], (weights * ce).sum() / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(loss, (weights * (ce + 1e-3 * lse ** 2)).sum() / weights.sum(), rtol=1e-5)
  # Normalised by the sum of weights: scaling every weight changes nothing.
  loss2, _ = weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(3 * weights),
                                    1e-3)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  zero, _ = weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((2, 5)))
  assert float(zero) == 0.0


# -- learning rates and Adafactor ---------------------------------------------------------------------

def test_schedules():
  const = learning_rate_schedule(OptimizerConfig(learning_rate=3e-3), 100)
  assert float(const(0)) == float(const(99)) == pytest.approx(3e-3)
  cos = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, schedule="cosine", warmup_steps=10,
                                               final_learning_rate_ratio=0.1), 110)
  assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5)
  assert float(cos(10)) == pytest.approx(1.0) and float(cos(110)) == pytest.approx(0.1)
  assert float(cos(60)) == pytest.approx(0.55, abs=1e-3)  # half-way down the cosine


def test_adafactor_second_moment_is_a_debiased_constant_decay():
  # The weights (1 - w_t) of the new squared gradient reproduce Adam's bias-corrected average.
  beta, v_hat = 0.99, 0.0
  g2 = np.random.default_rng(0).random(6)
  for t in range(6):
    decay = float(_bias_corrected_decay(t, beta))
    v_hat = decay * v_hat + (1 - decay) * g2[t]
  adam = sum((1 - beta) * beta ** (5 - i) * g2[i] for i in range(6)) / (1 - beta ** 6)
  assert v_hat == pytest.approx(adam, rel=1e-5)


ADAFACTOR = OptimizerConfig(name="adafactor", learning_rate=1e-2)


@pytest.mark.parametrize("cfg,opt", [(BSWA, ADAFACTOR), (BSWA.replace(dtype="bfloat16"), ADAMW)])
def test_loss_falls_with_each_optimizer(cfg, opt):
  step, state = make(cfg, opt=opt)
  batch = batches(1)[0]
  losses = []
  for _ in range(10):  # one batch, memorised
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 1.0, losses
  assert int(state.step) == 10
  # Mixed precision: whatever the compute dtype, master weights and updates stay float32.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.trainable))
  assert np.isfinite(float(m["grad_norm"])) and float(m["grad_norm"]) > 0


# -- LoRA -------------------------------------------------------------------------------------------------

LORA = LoraConfig(rank=4, alpha=8.0)
RSP = FamTrainingConfig(rsp_prob=0.5)


def test_lora_merge_math_and_shapes():
  params = params_of(TINY)
  adapters = lora.init_adapters(params["layers"], LORA, jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B != 0
  merged = lora.merge(params, adapters, LORA)
  for name in LORA.targets:
    w = params["layers"][name]
    a, b = adapters[name]["a"], adapters[name]["b"]
    assert a.shape[-1] == b.shape[1] == 4 and a.shape[0] == b.shape[0] == TINY.n_layers
    for layer in range(TINY.n_layers):
      A = np.asarray(a[layer]).reshape(-1, 4)
      B = np.asarray(b[layer]).reshape(4, -1)
      want = np.asarray(w[layer]) + 2.0 * (A @ B).reshape(w.shape[1:])  # alpha / rank = 2
      np.testing.assert_allclose(merged["layers"][name][layer], want, rtol=1e-5, atol=1e-6)
  untouched = {"attn_norm", "mlp_norm"}
  for name in untouched:
    np.testing.assert_array_equal(merged["layers"][name], params["layers"][name])


@pytest.mark.slow
def test_lora_trains_only_adapters_and_prompt_and_merges_for_inference():
  step, state = make(lora_cfg=LORA, fam_cfg=RSP)
  assert set(state.trainable) == {"lora", "fam_prompt"}
  base_before = jax.tree.map(np.asarray, state.frozen)
  merged0 = lora.combine(state.trainable, state.frozen, LORA)
  for name in LORA.targets:  # B = 0: the merged model is the base model
    np.testing.assert_array_equal(merged0["layers"][name], base_before["layers"][name])
  prompt_before = np.asarray(state.trainable["fam_prompt"])
  for batch in batches(3):
    state, _ = step(state, batch)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), base_before)
  assert not np.array_equal(state.trainable["fam_prompt"], prompt_before)
  assert float(jnp.abs(state.trainable["lora"]["q"]["b"]).max()) > 0
  # The exported model (plain params) computes what training computed.
  merged = state.params(LORA)
  tokens = batches(1)[0]["inputs"]
  model = Transformer(TINY, params=merged)
  inner = transformer.forward(merged, TINY, tokens, transformer.empty_state(merged, TINY, 2),
                              max_pending=0)[0]
  np.testing.assert_allclose(model(tokens), inner, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_lora_trains_the_fam_gate_in_full_and_the_workdir_merge_agrees():
  """The FAM write gate (ModelConfig.fam_gate) is a new weight: LoRA trains it in full, like the prompt,
  and famjax.workdir's merge of a saved state gives the parameters training used."""
  cfg = TINY.replace(fam_gate=True)
  step, state = make(cfg, lora_cfg=LORA)
  assert set(state.trainable) == {"lora", "fam_prompt", "fam_gate"}
  assert set(state.trainable["fam_gate"]) == {"fam_gate", "fam_gate_bias"}
  assert not set(state.frozen["layers"]) & {"fam_gate", "fam_gate_bias"}
  for batch in batches(2):
    state, _ = step(state, batch)
  assert float(jnp.abs(state.trainable["fam_gate"]["fam_gate"]).max()) > 0
  merged = state.params(LORA)
  saved = merged_params({"trainable": state.trainable, "frozen": state.frozen},
                        {"lora": {"rank": LORA.rank, "alpha": LORA.alpha}})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), merged, saved)
  Transformer(cfg, params=merged)  # every parameter present with its shape


# -- RSP and RPO (spec §6) ------------------------------------------------------------------------------

def _loss_from(params, batch, fam_state):
  model = Transformer(TINY, params=params)
  logits, final = model(batch["inputs"], fam_state=fam_state, return_fam_state=True)
  return weighted_cross_entropy(logits, batch["targets"], batch["weights"])[0], final


def test_rsp_keeps_example_0_final_fam_and_starts_from_it():
  step, state = make(lora_cfg=LORA, fam_cfg=RSP)  # (LoRA: the same compiled step as the test above)
  assert not bool(state.rsp_valid)
  used = []
  for batch in batches(6):
    params, saved, valid = state.params(LORA), state.rsp_fam, bool(state.rsp_valid)
    state, m = step(state, batch)
    used.append(float(m["rsp_used"]))
    if not valid:  # nothing saved before the first step: the prompt
      assert used[-1] == 0.0
    if used[-1]:  # every example starts from the saved state, as F_prev with its residual
      L, F, D = saved.shape
      start = FamState(jnp.broadcast_to(saved[:, None], (L, 2, F, D)), jnp.zeros((2,), bool))
    else:
      start = None
    want_loss, final = _loss_from(params, batch, start)
    np.testing.assert_allclose(m["loss"], want_loss, rtol=1e-5)
    # The state kept for the next step: example 0's final FAM of every layer.
    np.testing.assert_allclose(state.rsp_fam, final.values[:, 0], rtol=1e-5, atol=1e-5)  # float32, values O(1)
    assert bool(state.rsp_valid)
  assert 0 < sum(used) < 5, used  # p = 0.5, drawn per step (deterministic for this seed)


@pytest.mark.slow
def test_rsp_waits_for_its_start_step():
  cfg = FamTrainingConfig(rsp_prob=1.0, rsp_start_step=3)
  step, state = make(lora_cfg=LORA, fam_cfg=cfg)
  used = []
  for batch in batches(5):
    state, m = step(state, batch)
    used.append(float(m["rsp_used"]))
  assert used == [0.0, 0.0, 0.0, 1.0, 1.0] and bool(state.rsp_valid)


def test_rpo_offsets():
  theta = 10_000.0
  offsets = np.asarray(random_position_offset(jax.random.key(0), 4000, theta))
  zero = offsets == 0
  assert 0.45 < zero.mean() < 0.55
  assert offsets.min() >= 0 and offsets.max() < 2 * math.pi * theta
  # U(0, 2*pi*theta): each tenth of the range holds a tenth of the non-zero offsets (about 200 of ~2000,
  # standard deviation 13; 60 is 4.5 of them)
  counts, _ = np.histogram(offsets[~zero], bins=10, range=(0, 2 * math.pi * theta))
  assert np.abs(counts - (~zero).sum() / 10).max() < 60, counts
  # the key decides the draw: the step's key changes every step, and so do the offsets
  other = np.asarray(random_position_offset(jax.random.key(1), 4000, theta))
  assert 0.45 < (other == 0).mean() < 0.55
  assert not (np.equal(offsets, other) & ~zero).any()


@pytest.mark.slow
def test_rpo_changes_only_rounding():
  # In exact arithmetic the offset cancels (famjax uses block-relative angles): the step's loss moves
  # by float32 rounding only.
  step_off, s_off = make(BSWA, opt=ADAFACTOR)
  step_on, s_on = make(BSWA, fam_cfg=FamTrainingConfig(rpo=True), opt=ADAFACTOR)
  b = batches(1)[0]
  _, m_off = step_off(s_off, b)
  _, m_on = step_on(s_on, b)
  np.testing.assert_allclose(m_on["loss"], m_off["loss"], rtol=2e-2)


# -- FLOPs ----------------------------------------------------------------------------------------------

def test_flops_follow_the_attention_pattern():
  full = TINY.replace(attention="full", fam_len=0)
  bswa = TINY.replace(attention="bswa", fam_len=0, mem_segments=1)
  T = 64
  assert flops._keys_per_token(full, T) == T * (T + 1) / 2
  # bswa with memory covering the whole sequence is full attention.
  assert flops._keys_per_token(bswa.replace(mem_segments=7), T) == flops._keys_per_token(full, T)
  assert flops._keys_per_token(bswa, T) < flops._keys_per_token(full, T)
  fam = TINY.replace(mem_segments=1)
  extra = flops.forward_flops_per_sequence(fam, T) - flops.forward_flops_per_sequence(bswa, T)
  assert extra > 0
  # Without attention, the forward is 2 x (matmul parameters) per token.
  D, M, V, L = TINY.d_model, TINY.mlp_dim, TINY.vocab_size, TINY.n_layers
  NH, KH = TINY.n_heads * TINY.head_dim, TINY.n_kv_heads * TINY.head_dim
  matmul_params = L * (2 * D * NH + 2 * D * KH + 3 * D * M) + D * V
  attention = 4 * NH * flops._keys_per_token(full, T) * L
  assert flops.forward_flops_per_sequence(full, T) == 2 * matmul_params * T + attention
  assert flops.train_flops_per_step(full, 3, T) == 3 * 3 * flops.forward_flops_per_sequence(full, T)


def test_peak_table_and_mfu():
  cpu = jax.devices()[0]
  assert flops.peak_flops_per_device(cpu) is None
  assert flops.mfu(1e12, 2.0, 1e12) == 0.5
  kinds = [k for k, _ in flops.PEAK_FLOPS]
  assert "TPU v4" in kinds and "H100" in kinds


# -- gradient accumulation -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("lora_cfg,fam_cfg", [
    (LoraConfig(), FamTrainingConfig(rsp_prob=1.0, rpo=True)),   # full fine-tuning, RSP and RPO on
    (LoraConfig(rank=2, alpha=4.0), FamTrainingConfig()),        # LoRA adapters and the FAM prompt
])
def test_microbatches_give_the_same_update_and_metrics(lora_cfg, fam_cfg):
  optimizer = make_optimizer(ADAMW, 20)
  init = jax.jit(lambda params: new_state(params, TINY, lora_cfg, optimizer, 0))
  data = batches(2, batch=4)
  rng = np.random.default_rng(0)
  for b in data:  # uneven weights: the normalisation must be the whole batch's, not each microbatch's
    b["weights"] = b["weights"] * jnp.asarray(rng.integers(0, 3, b["weights"].shape), jnp.float32)
  results = {}
  for k in (1, 2, 4):
    step = jax.jit(make_train_step(TINY, lora_cfg, fam_cfg, optimizer, learning_rate_schedule(ADAMW, 20),
                                   microbatches=k))
    state = init(params_of(TINY))
    history = []
    for b in data:
      state, metrics = step(state, b)
      history.append(metrics)
    results[k] = (state, history)
  state1, history1 = results[1]
  for k in (2, 4):
    state_k, history_k = results[k]
    # AdamW divides by sqrt(v): a float-rounding difference in a near-zero gradient moves that weight by a
    # fraction of a learning rate of 1e-2 (seen: 1.3e-5 on 1 of 4096 weights); 1e-4 is a hundredth of one
    # step's move. A wrong normalisation of the microbatches shows in the metrics below (loss, grad_norm:
    # AdamW's update itself does not see the gradient's scale).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
                 state_k.trainable, state1.trainable)
    for m1, mk in zip(history1, history_k):
      for name in ("loss", "ce", "accuracy", "weight_sum", "grad_norm", "rsp_used"):
        np.testing.assert_allclose(mk[name], m1[name], rtol=1e-5, err_msg=f"{name}, microbatches={k}")
    np.testing.assert_allclose(state_k.rsp_fam, state1.rsp_fam, rtol=1e-5, atol=1e-5)  # the batch's row 0


def test_microbatches_must_divide_the_batch():
  from famjax.training.config import TrainConfig
  with pytest.raises(ValueError, match="microbatches=3 must be >= 1 and divide batch_size=8"):
    TrainConfig(batch_size=8, microbatches=3)


# -- the chunked loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab_chunk", [0, 10, 16, 7, 64])  # one tile, even tiles, padded tiles, > V
def test_chunked_cross_entropy_equals_the_whole_logits_with_gradients(vocab_chunk):
  from famjax.training.loss import chunked_cross_entropy
  rng = np.random.default_rng(0)
  B, T, D, V = 2, 24, 16, 50
  h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  w_out = jnp.asarray(rng.normal(size=(D, V)) / 4, jnp.float32)
  targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 3, (B, T)) * 0.5, jnp.float32)

  def whole(h, w):
    return weighted_cross_entropy(jnp.einsum("BTD,DV->BTV", h, w), targets, weights, 1e-3)

  def chunked(h, w):
    return chunked_cross_entropy(h, w, targets, weights, 1e-3, chunk=8, vocab_chunk=vocab_chunk)

  (loss_a, m_a), grads_a = jax.value_and_grad(whole, argnums=(0, 1), has_aux=True)(h, w_out)
  (loss_b, m_b), grads_b = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(h, w_out)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for name in m_a:
    np.testing.assert_allclose(m_b[name], m_a[name], rtol=1e-6, err_msg=name)
  for a, b in zip(grads_a, grads_b):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="not a multiple of the chunk 7"):
    chunked_cross_entropy(h, w_out, targets, weights, chunk=7)


def test_chunked_accuracy_takes_the_first_of_tied_maxima_across_tiles():
  """Logits tied between vocabulary tiles: the argmax is the first, as jnp.argmax (accuracy agrees)."""
  from famjax.training.loss import chunked_cross_entropy
  D, V = 4, 12
  w_out = jnp.zeros((D, V), jnp.float32).at[0, 2].set(1.0).at[0, 9].set(1.0)  # columns 2 and 9 tie
  h = jnp.zeros((1, 4, D), jnp.float32).at[..., 0].set(3.0)
  weights = jnp.ones((1, 4), jnp.float32)
  for target, accuracy in ((2, 1.0), (9, 0.0)):
    targets = jnp.full((1, 4), target, jnp.int32)
    whole = weighted_cross_entropy(jnp.einsum("BTD,DV->BTV", h, w_out), targets, weights)[1]
    tiled = chunked_cross_entropy(h, w_out, targets, weights, chunk=2, vocab_chunk=5)[1]
    assert float(whole["accuracy"]) == float(tiled["accuracy"]) == accuracy


@pytest.mark.slow
def test_a_step_with_the_chunked_loss_equals_the_step_with_whole_logits():
  optimizer = make_optimizer(ADAMW, 20)
  init = jax.jit(lambda params: new_state(params, TINY, LoraConfig(), optimizer, 0))
  states, histories = {}, {}
  for chunk in (0, 8):
    step = jax.jit(make_train_step(TINY, LoraConfig(), FamTrainingConfig(), optimizer,
                                   learning_rate_schedule(ADAMW, 20), z_loss=1e-4, loss_chunk=chunk,
                                   loss_vocab_chunk=100 if chunk else 0, microbatches=2 if chunk else 1))
    state, history = init(params_of(TINY)), []
    for b in batches(2, batch=4):
      state, metrics = step(state, b)
      history.append(metrics)
    states[chunk], histories[chunk] = state, history
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               states[8].trainable, states[0].trainable)
  for m0, m8 in zip(histories[0], histories[8]):
    for name in ("loss", "ce", "z_loss", "accuracy", "weight_sum", "grad_norm"):
      np.testing.assert_allclose(m8[name], m0[name], rtol=1e-5, err_msg=name)


def test_loss_chunk_must_divide_the_sequence():
  from famjax.training.config import TrainConfig
  with pytest.raises(ValueError, match="loss_chunk=100 must be 0 or divide seq_len=512"):
    TrainConfig(seq_len=512, loss_chunk=100)
