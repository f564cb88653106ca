"""Training configs: validation names the field; the paper configs have the paper's shapes and counts."""

import dataclasses
import json
import math
import os
import re
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `configs`

from configs import base, demo, fam_1b, fam_8b, fam_24b, paper  # noqa: E402
from famjax.model import init_params, param_shapes  # noqa: E402
from famjax.training import lora  # noqa: E402
from famjax.training.config import ConfigError, check_platform, incompatible_fields, job_config  # noqa: E402
from famjax.training.trainer import Trainer  # noqa: E402


def build(config, vocab=259):
  return job_config(config, vocab_size=vocab)


def test_base_and_demo_validate():
  job = build(base.get_config())
  assert job.model.vocab_size == 259  # 0 takes the data vocabulary
  for variant in ("fam", "bswa", "full", "lora"):
    job = build(demo.get_config(variant))
    assert job.model.attention == ("fam" if variant in ("fam", "lora") else variant)
  assert build(demo.get_config("lora")).lora.rank == 8


def _set(config, dotted, value):
  *path, last = dotted.split(".")
  target = config
  for p in path:
    target = target[p]
  with target.unlocked() if hasattr(target, "unlocked") else _null():
    target[last] = value


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("batch_size", -1), ("checkpoint_every", -1), ("z_loss", -0.1), ("steps", 2.5),
    ("log_every", "10"), ("tensorboard", 1),
    ("model.fam_len", 100), ("model.block_size", -4), ("model.n_kv_heads", 3), ("model.attention", "x"),
    ("model.d_model", "big"), ("model.attention_chunk", -1), ("model.mlp_chunk", -1),
    ("model.attention_impl", "flash"),
    ("optimizer.name", "sgd"), ("optimizer.learning_rate", 0.0), ("optimizer.b1", 1.0),
    ("optimizer.schedule", "linear"), ("lora.rank", -1), ("lora.targets", "q,proj"),
    ("fam.rsp_prob", 1.5), ("fam.rsp_start_step", -1), ("fam.rpo", "yes"), ("mesh.data", 0), ("mesh", -1),
])
def test_invalid_values_name_the_field(field, value):
  config = base.get_config()
  config = config.to_dict()
  if field == "mesh":  # two axes -1
    config["mesh"]["fsdp"] = -1
  else:
    _set(config, field, value)
  with pytest.raises(ConfigError, match=r"config\." + re.escape(field) + r"\b"):
    build(config)


def test_unknown_keys_name_the_field():
  for dotted in ("stepz", "model.nope", "optimizer.beta9", "lora.scale"):
    config = base.get_config().to_dict()
    _set(config, dotted, 1)
    with pytest.raises(ConfigError, match=r"config\." + re.escape(dotted) + ": unknown field"):
      build(config)


def test_masking_between_examples_with_fam_needs_block_aligned_packing():
  config = base.get_config().to_dict()
  config["data"]["mask_between_examples"] = True
  with pytest.raises(ConfigError, match=r"config\.data\.pack_align=1 must be a multiple of model\.block_size"):
    build(config)
  config["data"]["pack_align"] = 2 * config["model"]["block_size"]
  assert build(config).data.mask_between_examples
  config["data"]["pack_align"], config["model"]["attention"] = 1, "bswa"
  assert build(config).data.mask_between_examples


def test_vocab_smaller_than_data_is_refused():
  config = base.get_config().to_dict()
  config["model"]["vocab_size"] = 100
  with pytest.raises(ConfigError, match=r"config\.model\.vocab_size"):
    build(config)


@pytest.mark.parametrize("field,value", [("attention_impl", "cudnn"), ("remat", "offload_qkv_proj"),
                                         ("remat", "offload_dots_no_batch")])
def test_what_the_platform_cannot_run_is_refused_before_compiling(field, value):
  """cuDNN attention off GPU; host offload on CPU (JAX drops the transfers there: no memory saved)."""
  config = demo.get_config().to_dict()
  config["model"].update({field: value, "dtype": "bfloat16"})
  job = build(config)  # a valid model: the platform decides
  for backend in ("cpu", "tpu") if field == "attention_impl" else ("cpu",):
    with pytest.raises(ConfigError, match=rf"^config\.model\.{field}='?{value}'?\b") as e:
      check_platform(job.model, backend)
    assert "\n" not in str(e.value)
  check_platform(job.model, "gpu")
  if jax.default_backend() == "cpu":
    with pytest.raises(ConfigError, match=rf"config\.model\.{field}"):
      Trainer(job)


def test_incompatible_fields_ignore_resumable_ones():
  a = build(demo.get_config()).to_dict()
  b = build(demo.get_config()).to_dict()
  b["steps"], b["log_every"], b["mesh"]["data"] = 10_000, 1, 8
  b["model"]["attention_chunk"], b["model"]["attention_impl"] = 2, "cudnn"  # how, not what, it computes
  b["model"]["mlp_chunk"] = 512
  assert incompatible_fields(a, b) == []
  b["model"]["d_model"] = 512
  b["optimizer"]["learning_rate"] = 1.0
  assert [f.split()[0] for f in incompatible_fields(a, b)] == ["model.d_model", "optimizer.learning_rate"]


def test_a_run_saved_before_a_field_existed_matches_its_default():
  saved = build(demo.get_config()).to_dict()
  del saved["fam"]["rsp_start_step"], saved["init_from"]  # (init_from's default is None)
  current = build(demo.get_config()).to_dict()
  assert incompatible_fields(saved, current) == []
  current["fam"]["rsp_start_step"] = 100
  assert incompatible_fields(saved, current) == ["fam.rsp_start_step (0 -> 100)"]


# -- the paper's models (spec §7) -----------------------------------------------------------------------

def count(cfg):
  shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  return total, total - math.prod(shapes["embed"].shape)


def formula(L, D, N, K, M, V=256_000, H=128, F=0):
  per_layer = 2 * D + D * N * H + 2 * D * K * H + N * H * D + 3 * D * M
  return V * D + D + F * D + L * per_layer


# (module, layers, d_model, heads, kv heads, ff multiplier); counts with embeddings, in billions.
PAPER = [(fam_1b, 18, 1536, 12, 12, 8, 1.58, 61_931_520), (fam_8b, 32, 4096, 32, 32, 4, 9.64, 192_937_984),
         (fam_24b, 56, 4096, 32, 1, 8, 25.54, 485_359_616)]


@pytest.mark.parametrize("module,L,D,N,K,ff,billions,adapters", PAPER)
def test_paper_shapes_and_parameter_counts(module, L, D, N, K, ff, billions, adapters):
  job = build(module.get_config("fam"), vocab=256_000)
  m = job.model
  shape = (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim)
  assert shape == (L, D, N, K, 128, ff * D)
  assert (m.block_size, m.fam_len, m.mem_segments, m.vocab_size) == (1024, 64, 3, 256_000)
  assert (job.lora.rank, job.fam.rsp_prob, job.train.batch_size, job.train.steps) == (64, 0.8, 128, 50_000)
  assert job.optimizer.name == "adafactor" and job.optimizer.schedule == "constant"
  total, without_embed = count(m)
  assert total == formula(L, D, N, K, ff * D, F=64)
  assert round(total / 1e9, 2) == billions
  assert without_embed == total - 256_000 * D
  bswa = build(module.get_config("bswa_m0"), vocab=256_000).model
  assert count(bswa)[0] == total - 64 * D  # only the FAM prompt differs
  shapes = lora.adapter_shapes(param_shapes(m)["layers"], job.lora)
  assert sum(math.prod(s) for ab in shapes.values() for s in ab.values()) == adapters


def test_paper_variants():
  for variant in paper.VARIANTS:
    job = build(fam_1b.get_config(variant), vocab=256_000)
    if variant.startswith("bswa_m"):
      m = job.model
      assert (m.attention, m.mem_segments, m.fam_len) == ("bswa", int(variant[6:]), 0)
      assert job.fam.rsp_prob == 0
    else:
      assert job.model.attention == variant
  assert fam_8b.get_config().optimizer.learning_rate == 3e-3
  assert fam_1b.get_config().optimizer.learning_rate == 1e-4
  with pytest.raises(ValueError, match="bswa_m9"):
    fam_1b.get_config("bswa_m9")


@pytest.mark.slow
def test_training_core_imports_neither_tensorflow_nor_the_data_package():
  import subprocess
  code = ("import sys, famjax.training.loop, famjax.training.evaluate, famjax.training.export, "
          "famjax.training.init_from, famjax.train_data, famjax.workdir.model; "
          "bad = [m for m in ('tensorflow', 'seqio', 'famjax.data') if m in sys.modules]; "
          "assert not bad, bad")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr


def test_data_section_types_what_the_trainer_reads_and_keeps_the_rest():
  config = base.get_config().to_dict()
  config["data"].update(mixture="passkey_random_small", pack_align=32, instruction_weight=0.5)
  job = build(config)
  assert (job.data.mixture, job.data.pack_align, job.data.mask_between_examples) == \
      ("passkey_random_small", 32, False)
  assert job.data.options["instruction_weight"] == 0.5
  assert job.to_dict()["data"] == json.loads(json.dumps({**config["data"], "mask_between_examples": False}))
  config["data"]["pack_align"] = "32"
  with pytest.raises(ConfigError, match=r"config\.data\.pack_align: expected int"):
    build(config)
  config["data"]["pack_align"] = 0
  with pytest.raises(ConfigError, match=r"config\.data\.pack_align=0 must be >= 1"):
    build(config)


@pytest.mark.slow
def test_data_section_defaults_are_the_data_packages():
  from famjax.data import DataConfig  # TensorFlow: only in this test
  from famjax.training.config import DataSection
  for f in dataclasses.fields(DataSection):
    if f.name != "options":
      assert getattr(DataSection(), f.name) == getattr(DataConfig(), f.name), f.name


@pytest.mark.slow
def test_the_base_config_lists_every_field():
  """--config.X=... overrides only what configs/base.py lists: every TrainConfig and DataConfig field."""
  from famjax.data import DataConfig  # TensorFlow: only in this test
  from famjax.training.config import TrainConfig
  c = base.get_config()
  assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(c.keys())
  from_top = {"seq_len", "seed"}  # the data section takes these from the top-level fields
  assert {f.name for f in dataclasses.fields(DataConfig)} - from_top <= set(c.data.keys())


def test_a_config_json_from_before_the_typed_data_section_resumes():
  config = base.get_config().to_dict()
  saved = build(config).to_dict()
  saved["data"] = {k: v for k, v in saved["data"].items() if k not in ("mask_between_examples", "pack_align")}
  assert incompatible_fields(saved, build(config).to_dict()) == []
