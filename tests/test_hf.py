"""The Hugging Face checkpoint bridge (famjax.conversion.hf), against transformers' own models.

Every checkpoint is a tiny random model built here and saved into tmp_path: nothing is downloaded.
"""

import contextlib
import json
import math
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from famjax import ModelConfig, Transformer  # noqa: E402
from famjax.model import param_shapes  # noqa: E402
from famjax.conversion import from_hf, to_hf  # noqa: E402
from famjax.conversion import hf as hf_lib  # noqa: E402

SIZES = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
THETA = 5000.0
TOKENS = np.random.default_rng(1).integers(0, SIZES["vocab_size"], size=(2, 40))


def _randomize_norms(model, seed=0):
  """HF initialises norm scales to 1; random ones make a swapped norm mapping visible."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
  return model


def _hf_model(cls, config, seed=0):
  torch.manual_seed(seed)
  return _randomize_norms(cls(config).eval(), seed)


def _torch_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _rel_err(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _flat(params):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _assert_params_bitwise(a, b):
  fa, fb = _flat(a.params_dict()), _flat(b.params_dict())
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    assert fa[k].tobytes() == fb[k].tobytes(), k


def _famjax_model(cfg, seed=0):
  """A famjax Transformer with random NumPy parameters, norm scales near 1 (quicker than its own init)."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    w = 0.3 * rng.standard_normal(shape) + 1 if path[-1].key.endswith("norm") else \
        0.05 * rng.standard_normal(shape)
    return w.astype(cfg.param_dtype)

  shapes = param_shapes(cfg)
  return Transformer(cfg, params=jax.tree_util.tree_map_with_path(
      draw, shapes, is_leaf=lambda x: isinstance(x, tuple)))


def _rewrite_weights(path, edit):
  """Apply `edit(dict of arrays)` to a single-file checkpoint in place."""
  tensors = load_file(path / "model.safetensors")
  edit(tensors)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, edit):
  cfg = json.loads((path / "config.json").read_text())
  edit(cfg)
  (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """An untied Llama checkpoint (theta 5000) and its torch model."""
  path = tmp_path_factory.mktemp("llama")
  model = _hf_model(transformers.LlamaForCausalLM,
                    transformers.LlamaConfig(**SIZES, rope_theta=THETA, tie_word_embeddings=False))
  model.save_pretrained(path)
  return path, model


@pytest.fixture
def llama_copy(llama, tmp_path):
  """A copy of the Llama checkpoint that a test may damage."""
  return shutil.copytree(llama[0], tmp_path / "ckpt")


# -- parity with transformers ------------------------------------------------------------------------

@pytest.mark.slow
def test_llama_untied_parity(llama):
  path, hf = llama
  model = from_hf(path, dtype="float32")
  cfg = model.config
  assert (cfg.attention, cfg.rope_theta, cfg.tie_embeddings, cfg.n_kv_heads, cfg.head_dim) == \
      ("full", THETA, False, 2, 16)
  assert cfg.param_dtype == "float32"
  assert _rel_err(model(TOKENS), _torch_logits(hf)) < 1e-4


def test_llama_tied_parity(tmp_path):
  hf = _hf_model(transformers.LlamaForCausalLM,
                 transformers.LlamaConfig(**SIZES, rope_theta=THETA, tie_word_embeddings=True))
  hf.save_pretrained(tmp_path)
  model = from_hf(tmp_path, dtype="float32")
  assert model.config.tie_embeddings and "lm_head" not in model.params_dict()
  assert _rel_err(model(TOKENS), _torch_logits(hf)) < 1e-4


@pytest.mark.slow
def test_mistral_parity_warns_about_sliding_window(tmp_path):
  hf = _hf_model(transformers.MistralForCausalLM, transformers.MistralConfig(**SIZES, sliding_window=4096))
  hf.save_pretrained(tmp_path)
  with pytest.warns(UserWarning, match="sliding_window=4096"):
    model = from_hf(tmp_path, dtype="float32")
  assert _rel_err(model(TOKENS), _torch_logits(hf)) < 1e-4


def test_qwen2_with_biases_is_refused(tmp_path):
  transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES)).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="bias") as e:
    from_hf(tmp_path)
  assert "Qwen2" in str(e.value) and "q_proj.bias" in str(e.value)


@pytest.mark.slow
def test_qwen2_without_biases_loads(tmp_path):
  hf = _hf_model(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**SIZES, rope_theta=THETA))
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith(".bias"):
        p.zero_()
  hf.save_pretrained(tmp_path)
  _rewrite_weights(tmp_path, lambda t: [t.pop(n) for n in list(t) if n.endswith(".bias")])
  model = from_hf(tmp_path, dtype="float32")
  assert model.config.rope_theta == THETA
  assert _rel_err(model(TOKENS), _torch_logits(hf)) < 1e-4


@pytest.mark.slow
def test_bfloat16_checkpoint(tmp_path, monkeypatch):
  hf = _hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**SIZES, rope_theta=THETA))
  hf.to(torch.bfloat16).save_pretrained(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  model = from_hf(tmp_path, dtype="float32")  # param_dtype float32: bf16 values upcast exactly
  assert model.config.param_dtype == "float32"
  embed = hf.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(model.params_dict()["embed"]), embed)
  assert _rel_err(model(TOKENS), _torch_logits(hf.float())) < 1e-4
  kept = from_hf(tmp_path, param_dtype="bfloat16")
  assert kept.params_dict()["layers"]["q"].dtype == np.dtype("bfloat16")

  # Older safetensors cannot return bfloat16 as NumPy; from_hf then reads those tensors through JAX.
  real_open, refused = hf_lib.safe_open, []

  class NoBfloat16:
    def __init__(self, handle):
      self._handle = handle

    def __getattr__(self, name):
      return getattr(self._handle, name)

    def get_tensor(self, name):
      if self._handle.get_slice(name).get_dtype() == "BF16":
        refused.append(name)
        raise TypeError("data type 'bfloat16' not understood")
      return self._handle.get_tensor(name)

  @contextlib.contextmanager
  def old_safe_open(file, framework):
    with real_open(file, framework=framework) as handle:
      yield NoBfloat16(handle) if framework == "numpy" else handle

  monkeypatch.setattr(hf_lib, "safe_open", old_safe_open)
  _assert_params_bitwise(from_hf(tmp_path, dtype="float32"), model)
  assert "model.embed_tokens.weight" in refused


@pytest.mark.slow
def test_sharded_hf_checkpoint(llama, tmp_path):
  _, hf = llama
  hf.save_pretrained(tmp_path, max_shard_size="50KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  model = from_hf(tmp_path, dtype="float32")
  assert _rel_err(model(TOKENS), _torch_logits(hf)) < 1e-4


# -- to_hf / round trip ------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [
    dict(),
    dict(tie_embeddings=True, embed_scale=True, param_dtype="bfloat16", n_kv_heads=1, head_dim=8),
    dict(fam_gate=True),  # the write gate's weights (a famjax extension) travel as extra tensors
])
def test_round_trip_fam_model(tmp_path, variant):
  cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48,
                    attention="fam", block_size=8, fam_len=4, mem_segments=1, rope_theta=THETA,
                    rms_eps=1e-5, dtype="float32", remat="none", init_std=0.05).replace(**variant)
  model = _famjax_model(cfg, seed=3)
  written = to_hf(model, tmp_path / "rt")
  assert "model.fam_prompt" in load_file(written / "model.safetensors")
  hf_cfg = json.loads((written / "config.json").read_text())
  assert hf_cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": THETA}
  assert hf_cfg["rope_theta"] == THETA and hf_cfg["dtype"] == cfg.param_dtype
  loaded = from_hf(written)
  assert loaded.config == cfg
  _assert_params_bitwise(model, loaded)
  np.testing.assert_array_equal(np.asarray(loaded(TOKENS % 97)), np.asarray(model(TOKENS % 97)))


@pytest.mark.slow
def test_to_hf_sharded(tmp_path):
  cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=48,
                    attention="fam", block_size=8, fam_len=2, dtype="float32")
  model = _famjax_model(cfg)
  to_hf(model, tmp_path, max_shard_size=20_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
  _assert_params_bitwise(model, from_hf(tmp_path))
  to_hf(model, tmp_path)  # re-saving unsharded removes the old shards and index
  assert (tmp_path / "model.safetensors").exists()
  assert not (tmp_path / "model.safetensors.index.json").exists()
  assert not any((tmp_path / s).exists() for s in shards)


@pytest.mark.slow
def test_to_hf_reads_in_transformers(llama, tmp_path):
  """famjax -> to_hf -> transformers gives the same logits: the written layout is really HF Llama's."""
  model = from_hf(llama[0], dtype="float32")
  to_hf(model, tmp_path)
  hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
  assert _rel_err(model(TOKENS), _torch_logits(hf)) < 1e-4


# -- FAM and BSWA on loaded weights ------------------------------------------------------------------

@pytest.mark.slow
def test_fam_on_llama_weights_and_prompt_initialisation(llama):
  path, _ = llama
  model = from_hf(path, attention="fam", block_size=8, fam_len=4, mem_segments=1, dtype="float32")
  assert model.config.has_fam
  logits = np.asarray(model(TOKENS))
  assert logits.shape == (2, 40, SIZES["vocab_size"]) and np.isfinite(logits).all()
  params = model.params_dict()
  ids = np.random.default_rng(0).choice(SIZES["vocab_size"], size=4, replace=False)
  embed = np.asarray(params["embed"])
  np.testing.assert_array_equal(np.asarray(params["fam_prompt"]), embed[ids])
  gated = from_hf(path, attention="fam", block_size=8, fam_len=4, fam_gate=True).params_dict()["layers"]
  assert not np.asarray(gated["fam_gate"]).any() and not np.asarray(gated["fam_gate_bias"]).any()
  scaled = from_hf(path, attention="fam", block_size=8, fam_len=4, embed_scale=True)
  np.testing.assert_allclose(np.asarray(scaled.params_dict()["fam_prompt"]),
                             embed[ids] * math.sqrt(SIZES["hidden_size"]), rtol=1e-6)


@pytest.mark.slow
def test_bswa_and_fam0_equal_full_on_loaded_weights(llama):
  path, _ = llama
  full = np.asarray(from_hf(path, dtype="float32")(TOKENS))
  # 40 tokens in blocks of 8: 5 blocks, so 4 memory segments reach back to the first token.
  bswa = from_hf(path, attention="bswa", block_size=8, mem_segments=4, dtype="float32")
  fam0 = from_hf(path, attention="fam", block_size=8, mem_segments=4, fam_len=0, dtype="float32")
  assert "fam_prompt" not in fam0.params_dict()
  assert _rel_err(bswa(TOKENS), full) < 1e-5
  assert _rel_err(fam0(TOKENS), full) < 1e-5


def test_stored_prompt_with_other_fam_len_is_refused(tmp_path):
  cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=1, n_heads=4, mlp_dim=48, attention="fam",
                    block_size=8, fam_len=4)
  to_hf(_famjax_model(cfg), tmp_path)
  with pytest.raises(ValueError, match=r"model.fam_prompt.*\(4, 32\).*fam_len=2"):
    from_hf(tmp_path, fam_len=2)
  assert "fam_prompt" not in from_hf(tmp_path, attention="full").params_dict()  # ignored without FAM


# -- refusals ----------------------------------------------------------------------------------------

def test_refuses_pickled_weights(llama, tmp_path):
  shutil.copy(llama[0] / "config.json", tmp_path)
  torch.save(llama[1].state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match="pytorch_model.bin") as e:
    from_hf(tmp_path)
  assert "safetensors only" in str(e.value) and "arbitrary code" in str(e.value)


def test_refuses_missing_tensor(llama_copy):
  _rewrite_weights(llama_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    from_hf(llama_copy)


def test_refuses_wrong_shape(llama_copy):
  name = "model.layers.0.self_attn.k_proj.weight"
  _rewrite_weights(llama_copy, lambda t: t.update({name: t[name][:16]}))
  with pytest.raises(ValueError, match=rf"{name}.*shape \(16, 64\), expected \(32, 64\)"):
    from_hf(llama_copy)


def test_refuses_unexpected_tensor(llama_copy):
  _rewrite_weights(llama_copy, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match="unexpected tensors.*model.extra.weight"):
    from_hf(llama_copy)


def test_tied_checkpoint_with_a_saved_lm_head(llama_copy):
  """Some tied checkpoints store lm_head anyway: accepted when it equals the embedding, else refused."""
  _edit_config(llama_copy, lambda c: c.update(tie_word_embeddings=True))
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    from_hf(llama_copy)
  _rewrite_weights(llama_copy, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
  assert "lm_head" not in from_hf(llama_copy).params_dict()


def test_refuses_unknown_architecture(llama_copy):
  _edit_config(llama_copy, lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
  with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
    from_hf(llama_copy)


def test_refuses_unknown_override(llama):
  with pytest.raises(ValueError, match="unknown override.*not_a_field"):
    from_hf(llama[0], attention="fam", not_a_field=3)


@pytest.mark.parametrize("key, value, needle", [
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, "llama3"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "linear"),  # the older layout
])
def test_refuses_rope_scaling(llama_copy, key, value, needle):
  _edit_config(llama_copy, lambda c: c.update({key: value}))
  with pytest.raises(ValueError, match=rf"rope_type '{needle}'.*plain RoPE"):
    from_hf(llama_copy)


def test_refuses_biases_in_config(llama_copy):
  _edit_config(llama_copy, lambda c: c.update(mlp_bias=True))
  with pytest.raises(ValueError, match="mlp_bias"):
    from_hf(llama_copy)


def test_missing_directory_or_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    from_hf(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.json"):
    from_hf(tmp_path)


# -- config layouts ----------------------------------------------------------------------------------

def test_transformers5_config_layout(llama):
  hf_cfg = json.loads((llama[0] / "config.json").read_text())
  assert "rope_theta" not in hf_cfg and hf_cfg["rope_parameters"]["rope_theta"] == THETA
  assert from_hf(llama[0]).config.rope_theta == THETA


def test_older_config_layout(llama_copy):
  old = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 101,
         "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": None, "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "rope_theta": 2500.0, "rope_scaling": None, "torch_dtype": "float32",
         "transformers_version": "4.40.0"}
  (llama_copy / "config.json").write_text(json.dumps(old))
  cfg = from_hf(llama_copy).config
  assert (cfg.rope_theta, cfg.rms_eps, cfg.head_dim, cfg.tie_embeddings) == (2500.0, 1e-5, 16, False)
  del old["rope_theta"]
  (llama_copy / "config.json").write_text(json.dumps(old))
  assert from_hf(llama_copy).config.rope_theta == 10_000.0
