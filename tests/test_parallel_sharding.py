"""famjax.parallel: the mesh (one slice, and multislice in-slice x across-slice sizes arranged on fake TPU
devices), the logical-axis rules (a golden table), and a sharded train step on 8 simulated CPU devices
that equals the single-device step.

The 8-device check runs in a subprocess (this file as a script with XLA_FLAGS set), because the device
count is fixed when a process first touches jax."""

import dataclasses
import itertools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from famjax import ModelConfig
from famjax.model.params import LOGICAL_AXES, param_shapes
from famjax.parallel import MESH_AXES, MeshConfig, MeshShape, device_grid, logical_to_spec, slice_count
from famjax.training import lora
from famjax.training.config import LoraConfig
from testenv import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def abstract_mesh(data, fsdp, tensor):
  return jax.sharding.AbstractMesh((data, fsdp, tensor), MESH_AXES)


def test_mesh_sizes():
  assert MeshConfig().resolve(8) == (8, 1, 1)
  assert MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == (2, 2, 2)
  assert MeshConfig(data=1, fsdp=-1, tensor=1).resolve(4) == (1, 4, 1)
  for bad, count, match in [(MeshConfig(data=3), 8, "must equal the number of devices, 8"),
                            (MeshConfig(data=-1, fsdp=3), 8, "not divisible by 3")]:
    with pytest.raises(ValueError, match=match):
      bad.resolve(count)
  with pytest.raises(ValueError, match="mesh.tensor"):
    MeshConfig(tensor=0)


# -- multislice: in-slice (ICI) sizes x across-slice (DCN) sizes -------------------------------------------

def test_multislice_mesh_sizes():
  shape = MeshConfig(data=-1, fsdp=2, dcn_data=2).shape(16)
  assert shape == MeshShape(ici=(4, 2, 1), dcn=(2, 1, 1)) and shape.total == (8, 2, 1)
  assert MeshConfig(data=1, fsdp=-1, dcn_data=2, dcn_fsdp=2).resolve(32, slices=4) == (2, 16, 1)
  assert MeshConfig().shape(8, slices=1) == MeshShape((8, 1, 1), (1, 1, 1))


@pytest.mark.parametrize("config,count,slices,match", [
    (dict(dcn_data=0), None, None, r"mesh.dcn_data must be a positive integer"),
    (dict(dcn_fsdp=-1), None, None, r"mesh.dcn_fsdp must be a positive integer"),
    (dict(dcn_data=3), 8, None, r"dcn_data\*dcn_fsdp = 3 slices do not divide the 8 devices"),
    (dict(data=4, dcn_data=2), 16, None, r"data\*fsdp\*tensor = 4 .* must equal the devices per slice "
                                         r"\(16 devices / 2 slices\), 8"),
    (dict(dcn_data=2), 8, 1, r"dcn_data\*dcn_fsdp = 2\*1 = 2 must equal the number of slices the devices "
                             r"span, 1"),
    (dict(dcn_data=2), 16, 4, r"must equal the number of slices the devices span, 4"),
    (dict(), 16, 2, r"the devices span 2 slices, but dcn_data\*dcn_fsdp = 1: set mesh.dcn_data"),
])
def test_multislice_mesh_errors_name_the_field(config, count, slices, match):
  with pytest.raises(ValueError, match=match):
    MeshConfig(**config).shape(count, slices)


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """What jax.experimental.mesh_utils reads of a TPU device."""

  id: int
  coords: tuple
  slice_index: int
  process_index: int
  core_on_chip: int = 0
  device_kind: str = "TPU v4"
  platform: str = "tpu"


def fake_slices(slices, chips_xyz=(2, 2, 2), chips_per_host=4):
  """`slices` TPU v4 slices of 2x2x2 chips, numbered as jax numbers devices (slice-major)."""
  devices = []
  for s in range(slices):
    for z, y, x in itertools.product(*(range(n) for n in reversed(chips_xyz))):
      devices.append(FakeTpu(len(devices), (x, y, z), s, len(devices) // chips_per_host))
  return devices


def test_multislice_device_grid_keeps_dcn_on_the_slice_axes():
  devices = fake_slices(2)
  assert slice_count(devices) == 2 and slice_count(jax.devices()) == 1  # CPU devices: one slice
  grid = device_grid(MeshConfig(data=2, fsdp=4, dcn_data=2), devices[::-1])  # any input order
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  assert grid.shape == (4, 4, 1)
  assert (slice_of[:2] == 0).all() and (slice_of[2:] == 1).all()  # data = [slice 0 x 2, slice 1 x 2]
  assert sorted(d.id for d in grid.flat) == list(range(16))
  grid = device_grid(MeshConfig(data=1, fsdp=-1, tensor=2, dcn_fsdp=2), devices)
  assert grid.shape == (1, 8, 2)
  assert (np.vectorize(lambda d: d.slice_index)(grid) == np.repeat([0, 1], 4)[None, :, None]).all()
  # inside a slice: jax's topology-aware order, the tensor pairs are neighbouring chips
  for pair in grid[0]:
    assert sum(abs(a - b) for a, b in zip(pair[0].coords, pair[1].coords)) == 1
  with pytest.raises(ValueError, match="the devices span 2 slices"):
    device_grid(MeshConfig(), devices)


CFG = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, mlp_dim=128,
                  attention="fam", block_size=8, fam_len=2)

# The golden table: every parameter's PartitionSpec on a (data 2, fsdp 2, tensor 2) mesh.
GOLDEN = {
    "embed": P("tensor", "fsdp"),
    "final_norm": P("fsdp"),
    "lm_head": P("fsdp", "tensor"),
    "fam_prompt": P(None, "fsdp"),
    "layers/attn_norm": P(None, "fsdp"),
    "layers/q": P(None, "fsdp", "tensor", None),
    "layers/k": P(None, "fsdp", None, None),  # one key/value head (MQA): not split
    "layers/v": P(None, "fsdp", None, None),
    "layers/o": P(None, "tensor", None, "fsdp"),
    "layers/mlp_norm": P(None, "fsdp"),
    "layers/gate": P(None, "fsdp", "tensor"),
    "layers/up": P(None, "fsdp", "tensor"),
    "layers/down": P(None, "tensor", "fsdp"),
}


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def test_rules_golden_table():
  mesh = abstract_mesh(2, 2, 2)
  shapes, axes = flat(param_shapes(CFG)), flat(LOGICAL_AXES)
  got = {name: logical_to_spec(axes[name], shape, mesh) for name, shape in shapes.items()}
  assert got == GOLDEN


def test_rules_replicate_what_does_not_divide_and_unused_axes():
  mesh = abstract_mesh(1, 4, 2)
  assert logical_to_spec(("vocab", "embed"), (259, 64), mesh) == P(None, "fsdp")  # 259 % 2 != 0
  assert logical_to_spec(("vocab", "embed"), (512, 6), mesh) == P("tensor", None)
  assert logical_to_spec(("batch", "length"), (8, 16), mesh) == P("fsdp", None)  # data has size 1
  assert logical_to_spec(("batch", "length"), (8, 16), abstract_mesh(2, 2, 2)) == P(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="no rule"):
    logical_to_spec(("nonsense",), (4,), mesh)


def test_lora_adapter_axes():
  cfg = LoraConfig(rank=4)
  mesh = abstract_mesh(2, 2, 2)
  shapes = lora.adapter_shapes(param_shapes(CFG)["layers"], cfg)
  axes = lora.adapter_logical_axes(cfg)
  assert logical_to_spec(axes["q"]["a"], shapes["q"]["a"], mesh) == P(None, "fsdp", None)
  # the factor without an embed axis is split over fsdp on its last axis (else whole on every FSDP device)
  assert logical_to_spec(axes["q"]["b"], shapes["q"]["b"], mesh) == P(None, None, "tensor", "fsdp")
  assert logical_to_spec(axes["o"]["a"], shapes["o"]["a"], mesh) == P(None, "tensor", "fsdp", None)
  assert logical_to_spec(axes["up"]["b"], shapes["up"]["b"], mesh) == P(None, None, ("tensor", "fsdp"))
  assert logical_to_spec(axes["down"]["a"], shapes["down"]["a"], mesh) == P(None, ("tensor", "fsdp"), None)
  assert logical_to_spec(axes["down"]["b"], shapes["down"]["b"], mesh) == P(None, None, "fsdp")


@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
  out = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=subprocess_env(devices=8),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  assert ("sharded == single device for (2, 2, 2) and (1, 4, 2), with 1 and 2 microbatches, and the tiled loss"
          in out.stdout)


# -- the 8-device check (run as a script) ------------------------------------------------------------------

def _job(mesh, microbatches=1, loss_chunk=0, loss_vocab_chunk=0):
  sys.path.insert(0, ROOT)
  from configs import demo
  from famjax.training.config import job_config
  c = demo.get_config("bswa").to_dict()
  c["model"].update(vocab_size=512, d_model=64, n_layers=1, n_heads=4, n_kv_heads=1, mlp_dim=128,
                    block_size=8, fam_len=0, mem_segments=1, dtype="float32", remat="none")
  c["data"]["mixture"] = "synthetic"
  c.update(seq_len=32, batch_size=8, steps=3, microbatches=microbatches, loss_chunk=loss_chunk,
           loss_vocab_chunk=loss_vocab_chunk)
  c["mesh"] = dict(zip(MESH_AXES, mesh))
  return job_config(c, vocab_size=256)


def _train(mesh, devices, microbatches=1, **loss):
  from famjax.training.trainer import Trainer
  from famjax.training.synthetic import SyntheticBatches
  trainer = Trainer(_job(mesh, microbatches, **loss), devices)
  state = trainer.initial_state()
  it = SyntheticBatches(8, 32, seed=0)
  losses = []
  for _ in range(3):
    state, metrics = trainer.step(state, trainer.global_batch(next(it)))
    losses.append(float(metrics["loss"]))
  return trainer, state, losses


def _main():
  assert jax.device_count() == 8, jax.devices()
  _, single, single_losses = _train((1, 1, 1), jax.devices()[:1])
  # the last: the loss in tiles of 8 tokens x 64 vocabulary entries (its hand-written gradient, each tile of
  # the output matrix gathered over fsdp and split over tensor, its gradient reduce-scattered)
  for mesh, microbatches, loss in [((2, 2, 2), 1, {}), ((1, 4, 2), 1, {}), ((2, 2, 2), 2, {}), ((1, 4, 2), 2, {}),
                                   ((1, 4, 2), 2, dict(loss_chunk=8, loss_vocab_chunk=64))]:
    trainer, state, losses = _train(mesh, jax.devices(), microbatches, **loss)
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                                                         atol=3e-5), state.trainable, single.trainable)
    gate = state.trainable["layers"]["gate"]
    assert gate.sharding.spec == P(None, "fsdp", "tensor"), gate.sharding
    assert len(gate.addressable_shards) == 8
    # AdamW's moments are split like the parameters (not left replicated on every device)
    moments = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if jax.tree_util.keystr(path).endswith("['layers']['gate']")]
    assert len(moments) == 2 and all(m.sharding.spec == gate.sharding.spec for m in moments), moments
    assert trainer.batch_shardings["inputs"].spec[0] in (("data", "fsdp"), "fsdp")
  print("sharded == single device for (2, 2, 2) and (1, 4, 2), with 1 and 2 microbatches, and the tiled loss")


if __name__ == "__main__":
  _main()
