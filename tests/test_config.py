"""ModelConfig validates on construction and names the field it rejects."""

import jax.numpy as jnp
import pytest

from famjax import ModelConfig


@pytest.mark.parametrize("changes,field", [
    (dict(fam_len=32, block_size=16), "fam_len"),
    (dict(n_heads=6, n_kv_heads=4, head_dim=8), "n_kv_heads"),
    (dict(d_model=0), "d_model"),
    (dict(block_size=-4), "block_size"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(n_layers=True), "n_layers"),
    (dict(mem_segments=-1), "mem_segments"),
    (dict(attention="sliding"), "attention"),
    (dict(head_dim=7), "head_dim"),
    (dict(d_model=30, n_heads=4), "head_dim"),
    (dict(dtype="int32"), "dtype"),
    (dict(param_dtype="not-a-dtype"), "param_dtype"),
    (dict(remat="sometimes"), "remat"),
    (dict(attention_chunk=-1), "attention_chunk"),
    (dict(attention_chunk=1.5), "attention_chunk"),
    (dict(mlp_chunk=-4), "mlp_chunk"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(attention_impl="cudnn", dtype="float32"), "attention_impl"),  # cuDNN: bfloat16/float16 only
    (dict(rope_theta=0.5), "rope_theta"),
    (dict(rms_eps=0.0), "rms_eps"),
])
def test_bad_values_name_the_field(changes, field):
  with pytest.raises(ValueError, match=rf"\b{field}\b"):
    ModelConfig(**changes)


def test_dtype_strings_and_defaults():
  cfg = ModelConfig(dtype="float32", param_dtype=jnp.bfloat16)
  assert cfg.dtype == "float32" and cfg.param_dtype == "bfloat16"
  assert cfg.compute_dtype == jnp.float32 and cfg.storage_dtype == jnp.bfloat16
  default = ModelConfig()
  assert default.compute_dtype == jnp.bfloat16 and default.storage_dtype == jnp.float32
  assert default.head_dim == default.d_model // default.n_heads
  hash(cfg)  # static argument of jitted functions


def test_replace_validates_and_rejects_unknown_fields():
  cfg = ModelConfig()
  assert cfg.replace(attention="bswa").attention == "bswa"
  with pytest.raises(ValueError, match="fam_len"):
    cfg.replace(fam_len=cfg.block_size + 1)
  with pytest.raises(ValueError, match="no_such_field"):
    cfg.replace(no_such_field=1)


def test_mode_properties():
  assert ModelConfig(attention="fam", fam_len=4).has_fam
  assert not ModelConfig(attention="fam", fam_len=0).has_fam
  assert not ModelConfig(attention="bswa").has_fam
  assert not ModelConfig(attention="full").uses_blocks


def test_init_std_defaults_to_the_width_fan_in_scale():
  assert ModelConfig(d_model=64).init_std == 0.125
  assert ModelConfig(d_model=1536, n_heads=12).init_std == pytest.approx(1536 ** -0.5)
  assert ModelConfig(init_std=0.02).init_std == 0.02  # an explicit value (and old saved configs) wins
  assert ModelConfig(d_model=64) == ModelConfig(d_model=64, init_std=0.125)  # resolved, so hashable/equal
  for bad in (0.0, -1.0, "0.1", True):
    with pytest.raises(ValueError, match="init_std"):
      ModelConfig(init_std=bad)
