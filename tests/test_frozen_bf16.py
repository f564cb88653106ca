"""LoRA's frozen base in the compute dtype (famjax.training.lora.split, issue 26 item 4): the base weights,
which nothing updates, are kept and checkpointed in bfloat16 when the model computes in bfloat16 (the paper
configs; what FSDP gathers is then bfloat16 too, tests/test_tpu_compile.py), the adapters and the FAM prompt
in float32. The step computes exactly what it computed from a float32 base (the forward reads the base in
bfloat16 either way); a checkpoint written with a float32 base (famjax before this change) restores, cast;
merged parameters come out in float32."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import paper  # noqa: E402
from famjax.parallel import MESH_AXES  # noqa: E402
from famjax.training import memory  # noqa: E402
from famjax.training.config import job_config  # noqa: E402
from famjax.training.trainer import Trainer  # noqa: E402
from famjax.workdir.checkpoint import Checkpointer, load_raw  # noqa: E402
from famjax.workdir.model import merged_params  # noqa: E402


def tiny_job(mesh=(1, 1, 1), dtype="bfloat16", rank=4):
  """configs/paper.py's recipe (LoRA, FAM, RSP, RPO, Adafactor) at a size that compiles in seconds."""
  c = paper.get_config("1b", "fam,unchunked").to_dict()
  c.update(batch_size=2, seq_len=64, steps=10, mesh=dict(zip(MESH_AXES, mesh)))
  c["lora"]["rank"] = rank
  c["data"]["mixture"] = "synthetic"
  c["model"].update(vocab_size=128, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=32, mlp_dim=128,
                    block_size=16, fam_len=4, mem_segments=1, dtype=dtype)
  return job_config(c)


def batch(job, seed=0):
  rng = np.random.RandomState(seed)
  B, T = job.train.batch_size, job.train.seq_len
  return {"inputs": rng.randint(0, 128, (B, T)), "targets": rng.randint(0, 128, (B, T)),
          "weights": np.ones((B, T), np.float32)}


def dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree)}


def copy(state):
  return jax.tree.map(jnp.copy, state)


def with_float32_base(state):
  """The state as famjax kept it before: the frozen base in float32."""
  return state.replace(frozen=jax.tree.map(lambda w: w.astype(jnp.float32), state.frozen))


def test_the_frozen_base_is_kept_in_the_compute_dtype():
  trainer = Trainer(tiny_job())
  state = trainer.initial_state()
  assert dtypes(state.frozen) == {"bfloat16"}
  assert dtypes(state.trainable) == {"float32"} and dtypes(state.opt_state) <= {"float32", "int32"}
  assert dtypes(Trainer(tiny_job(dtype="float32")).initial_state().frozen) == {"float32"}
  assert Trainer(tiny_job(rank=0)).initial_state().frozen == {}  # full fine-tuning: nothing frozen
  # what a device holds of it: half the bytes of a float32 base
  bf16, f32 = (memory.state_bytes(tiny_job(dtype=d), (1, 1, 1))["frozen"] for d in ("bfloat16", "float32"))
  assert bf16 * 2 == f32


@pytest.mark.slow
def test_a_float32_base_restores_cast_and_the_step_computes_what_it_computed_from_it(tmp_path):
  """A checkpoint written with a float32 base (famjax before this change) restores, the base cast to
  bfloat16; the forward read the base in bfloat16 anyway, so a step from the restored state gives the loss,
  the metrics and the updated adapters of the step from the float32 base, bit for bit. Read as a model
  (famjax.eval, generate, export), either checkpoint gives float32 parameters."""
  trainer = Trainer(tiny_job())
  state = trainer.initial_state()
  old = with_float32_base(copy(state))
  ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
  ckpt.save(1, old, {}, trainer.job.to_dict())
  ckpt.wait()
  step, restored, _, _ = ckpt.restore_latest(trainer.abstract_state)
  ckpt.close()
  assert step == 1 and dtypes(restored.frozen) == {"bfloat16"}
  for x, y in zip(jax.tree.leaves(restored.frozen), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the float32 values, rounded once
  raw, config = load_raw(tmp_path / "checkpoints" / "1")
  params = merged_params(raw, config)
  new_params = jax.device_get(trainer.params(state))
  assert dtypes(params) == dtypes(new_params) == {"float32"}
  for x, y in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-2 * float(np.abs(y).max()))
  b = trainer.global_batch(batch(trainer.job))
  before, before_metrics = trainer.programs.step(old, b)  # the step as it ran on a float32 base
  after, metrics = trainer.step(restored, b)
  for name in metrics:
    assert float(metrics[name]) == float(before_metrics[name]), name
  for x, y in zip(jax.tree.leaves(after.trainable), jax.tree.leaves(before.trainable)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
