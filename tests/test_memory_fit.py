"""famjax.training.memory (behind benchmarks/memory_fit.py): the per-device memory estimate of a training
step against XLA's
memory_analysis() of the step compiled ahead of time on 4 simulated CPU devices, for small configs with
the paper's structure (LoRA, FAM, block attention, remat full, bf16 compute); and FSDP keeps the batch
split (the model's activation constraint), so its activations are those of data parallelism.

The compiles run in a subprocess (this file as a script with XLA_FLAGS set), because the device count is
fixed when a process first touches jax."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `configs`, and famjax when this file runs as a script

from configs import paper  # noqa: E402
from famjax.parallel import MESH_AXES  # noqa: E402
from famjax.training import memory  # noqa: E402
from famjax.training.config import job_config  # noqa: E402

GIB = 2 ** 30
# estimate / compiled - 1 allowed for these small configs. The copy counts of the attention scores were
# read at the paper's sizes, where XLA:CPU keeps more copies than at these: here the estimate of a
# layer-bound step errs high (on the safe side). At the paper's sizes it is within 5% (docs/launch.md).
TOLERANCE = {"loss": (-0.10, 0.10), "layer": (0.0, 0.35)}


# Small configs, the paper's structure: block 256, 3 memory blocks, FAM 16, LoRA rank 8, 2048 tokens.
SMALL = dict(n_layers=2, seq_len=2048, lora_rank=8, d_model=256, n_heads=4, n_kv_heads=4, head_dim=64,
             mlp_dim=1024, block_size=256, fam_len=16, mem_segments=3)
POINTS = {  # name: (model changes, global batch, mesh)
    "loss-bound, fsdp 4": (dict(vocab_size=32768), 4, (1, 4, 1)),
    "loss-bound, data 4": (dict(vocab_size=32768), 4, (4, 1, 1)),
    "layer-bound, MQA, fsdp 2 x tensor 2, 2 sequences per device": (
        dict(vocab_size=1024, n_heads=8, n_kv_heads=1, mlp_dim=2048), 4, (1, 2, 2)),
}


def small_job(batch_size, mesh, seq_len, lora_rank, n_layers, **model):
  """configs/paper.py's 1B recipe (as benchmarks/memory_fit.py's paper_job) at the sizes given."""
  c = paper.get_config("1b").to_dict()
  c.update(batch_size=batch_size, seq_len=seq_len, mesh=dict(zip(MESH_AXES, mesh)))
  c["lora"]["rank"] = lora_rank
  c["data"]["mixture"] = "synthetic"  # no data needed to lower the step
  c["model"].update(model, n_layers=n_layers)
  return job_config(c)


def job(name):
  changes, batch, mesh = POINTS[name]
  return small_job(batch, mesh, **{**SMALL, **changes})


def test_state_bytes_follow_the_sharding():
  one = memory.state_bytes(job("loss-bound, data 4"), (1, 1, 1))
  four = memory.state_bytes(job("loss-bound, fsdp 4"), (1, 4, 1))
  assert one["frozen"] / four["frozen"] == pytest.approx(4, rel=0.01)  # every frozen matrix splits over D
  assert one["trained"] > four["trained"] > one["trained"] / 4  # LoRA A splits on D; B [r, out] only on out


def test_estimate_refuses_what_it_does_not_model():
  with pytest.raises(ValueError, match="does not split over data\\*fsdp = 8"):
    memory.estimate(job("loss-bound, fsdp 4"), (1, 8, 1))
  none = small_job(4, (1, 4, 1), remat="none", **SMALL)
  with pytest.raises(ValueError, match="remat='full'"):
    memory.estimate(none, (1, 4, 1))


def test_estimate_matches_the_compiled_step():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  out = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  report = "\n".join(f"{name}: estimate {r['estimate'] / GIB:.3f} GiB ({r['peak_is']}), compiled "
                     f"{r['compiled'] / GIB:.3f} GiB, temporaries {r['temporaries'] / GIB:.3f} GiB"
                     for name, r in results.items())
  for name, r in results.items():
    low, high = TOLERANCE[r["peak_is"]]
    assert low <= r["estimate"] / r["compiled"] - 1 <= high, report
  assert results["loss-bound, fsdp 4"]["peak_is"] == "loss"
  assert results["layer-bound, MQA, fsdp 2 x tensor 2, 2 sequences per device"]["peak_is"] == "layer"
  # FSDP gathers weights, not the batch: its temporaries are data parallelism's, not 4 sequences' logits
  fsdp, data = results["loss-bound, fsdp 4"], results["loss-bound, data 4"]
  assert fsdp["temporaries"] < 1.25 * data["temporaries"], report


def _main():
  import jax
  assert jax.device_count() == 4, jax.devices()
  results = {}
  for name, (_, _, mesh) in POINTS.items():
    j = job(name)
    compiled = memory.compiled_bytes(j)
    estimate = memory.estimate(j, mesh)
    results[name] = {"compiled": compiled["total"], "temporaries": compiled["temporaries"],
                     "estimate": estimate["total"], "peak_is": estimate["activation_peak_is"]}
  print(json.dumps(results))


if __name__ == "__main__":
  _main()
