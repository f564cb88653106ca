"""famjax's train step as the TPU compiler sees it, from this CPU machine (issue 26): a small config's step
compiled by libtpu for a v5e:2x2 topology (famjax.training.aot, the library under
`benchmarks/memory_fit.py --platform=tpu`), with the xla attention and with the Pallas kernel (its Mosaic
lowering), and a step too large for a v5e chip refused when it compiles, naming what it needs and the
command that finds settings that fit. A change that breaks the TPU lowering fails here.

The compiles run in a subprocess (this file as a script) with what libtpu needs in its environment
(famjax.parallel.topology.compile_env(): libtpu's path, kept off the import path in .venv/libtpu, and
its settings); ordinary test processes never touch libtpu, which `test_cpu_processes_do_not_load_libtpu`
checks. Also here: the paper configs ship the settings that fit
(configs/paper.py FITS) and keep the paper's step one switch away."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import fam_1b, fam_8b, fam_24b, paper  # noqa: E402
from famjax.parallel import MESH_AXES  # noqa: E402
from famjax.parallel.topology import compile_env  # noqa: E402
from famjax.training.config import job_config  # noqa: E402
from testenv import subprocess_env  # noqa: E402

TOPOLOGY = "v5e:2x2"
GIB = 2 ** 30


def test_paper_configs_ship_the_settings_that_fit_and_keep_the_papers_step_one_switch_away():
  for module, size in ((fam_1b, "1b"), (fam_8b, "8b"), (fam_24b, "24b")):
    job = job_config(module.get_config())
    assert (job.train.microbatches, job.train.loss_chunk, job.train.loss_vocab_chunk, job.model.attention_chunk,
            job.model.mlp_chunk) == tuple(paper.FITS[size][k] for k in (
                "microbatches", "loss_chunk", "loss_vocab_chunk", "attention_chunk", "mlp_chunk"))
    unchunked = job_config(module.get_config("fam,unchunked"))
    assert (unchunked.train.microbatches, unchunked.train.loss_chunk, unchunked.train.loss_vocab_chunk,
            unchunked.model.attention_chunk, unchunked.model.mlp_chunk) == (1, 0, 0, 0, 0)
    assert unchunked.model == job.model.replace(attention_chunk=0, mlp_chunk=0)  # nothing else changes
  pallas = job_config(fam_1b.get_config("fam,pallas"))
  assert (pallas.model.attention_impl, pallas.model.attention_chunk) == ("pallas", 0)
  bswa = job_config(fam_1b.get_config("bswa_m2,unchunked"))
  assert (bswa.model.attention, bswa.model.mem_segments, bswa.train.loss_chunk) == ("bswa", 2, 0)
  with pytest.raises(ValueError, match="unknown switch 'chunked'"):
    fam_1b.get_config("fam,chunked")


def test_cpu_processes_do_not_load_libtpu():
  """A process that imports the TPU-compile code and uses jax neither loads libtpu nor prints its warnings:
  in the suite's environment (JAX_PLATFORMS=cpu), and as a user's CPU process without JAX_PLATFORMS, where
  an importable libtpu would make jax probe for a TPU (libtpu is kept in LIBTPU_DIR, off the import path)."""
  code = ("import sys, jax, famjax.training.aot, famjax.parallel.topology; jax.devices(); "
          "print(jax.default_backend(), 'libtpu' in sys.modules)")
  suite = subprocess_env()
  user = {k: v for k, v in suite.items() if k != "JAX_PLATFORMS"}
  for env in (suite, user):
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "False"] and "TPU" not in out.stderr, out.stdout + out.stderr
  assert compile_env()["TPU_LIBRARY_PATH"].endswith("libtpu.so")  # and the compiling processes find it


@pytest.mark.slow
def test_the_train_step_compiles_for_a_v5e_topology():
  env = subprocess_env(devices=1, **compile_env())
  out = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
  assert "could not determine TPU" not in out.stderr and "WARNING" not in out.stderr, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  xla, pallas, too_big = got["xla"], got["pallas"], got["too big"]
  # the TPU compiler's view of the step: 4 v5e chips, its memory per chip, the FSDP collectives per step
  assert (xla["platform"], xla["device_kind"], xla["devices"], xla["topology"]) == ("tpu", "TPU v5 lite", 4,
                                                                                    TOPOLOGY)
  assert 0 < xla["total"] < 2 * GIB and xla["fits"] and xla["error"] is None
  assert xla["collectives"]["all-gather"]["count"] > 0 and xla["unknown_loops"] == []
  assert xla["executed_flops"] > xla["model_flops"] > 0  # remat full recomputes the forward
  assert xla["roofline"]["step_s_overlapped"] <= xla["roofline"]["step_s_serialised"]
  # FSDP gathers the frozen LoRA base in bfloat16: no float32 array of a frozen weight's size is gathered
  assert got["float32 gathers of frozen weights"] == 0 and got["bfloat16 gathers of frozen weights"] > 0
  # the Pallas kernels lowered by Mosaic (custom calls in the TPU program), the rest as with xla
  assert pallas["error"] is None and got["mosaic kernels"] >= 3 and 0 < pallas["total"] < 2 * GIB
  # too big for a chip: refused when it compiles, with the size and the command that searches settings
  assert "does not fit" in too_big and "GiB per device" in too_big and "\n" not in too_big
  assert f"python benchmarks/memory_fit.py --platform=tpu --topology={TOPOLOGY} --job=" in too_big


def tiny_job(**changes):
  """configs/paper.py's 1B recipe (LoRA, FAM, RSP, RPO, remat full, the memory-saving settings) at a size
  the TPU compiler takes in seconds, FSDP over the 4 chips."""
  c = paper.get_config("1b").to_dict()
  c.update(batch_size=4, seq_len=512, mesh=dict(zip(MESH_AXES, (1, -1, 1))), loss_chunk=128,
           loss_vocab_chunk=256)
  c["lora"]["rank"] = 4
  c["model"].update(vocab_size=512, d_model=128, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=64, mlp_dim=256,
                    block_size=128, fam_len=16, mlp_chunk=128)
  for key, value in changes.items():
    (c["model"] if key in c["model"] else c)[key] = value
  return job_config(c)


def _frozen_gathers(text: str, job) -> dict:
  """Elements of all-gathers whose result is one layer of a frozen weight, by element type."""
  from famjax.model.params import param_shapes
  from famjax.training import hlo
  import math
  sizes = {math.prod(s[1:]) for name, s in param_shapes(job.model)["layers"].items() if len(s) > 2}
  comps = hlo.computations(text)
  counts, _ = hlo.multiplicities(comps)
  out = {"f32": 0, "bf16": 0}
  for name, times in counts.items():
    for inst in comps[name].instructions:
      if hlo.COLLECTIVES.get(inst.opcode) == "all-gather":
        dtype, dims, _ = hlo.arrays(inst.shape)[-1]
        if math.prod(dims) in sizes and dtype in out:
          out[dtype] += times
  return out


def _main():
  import jax
  from famjax.parallel import topology
  from famjax.training import aot
  from famjax.training.memory import StepDoesNotFit
  from famjax.training.trainer import Trainer
  assert jax.default_backend() == "cpu"
  devices = topology.devices(TOPOLOGY)
  step = aot.compile_step(tiny_job(), devices)
  results = {"xla": aot.report(step)}
  gathers = _frozen_gathers(step.compiled.as_text(), step.job)
  results["float32 gathers of frozen weights"] = gathers["f32"]
  results["bfloat16 gathers of frozen weights"] = gathers["bf16"]
  step = aot.compile_step(tiny_job(attention_impl="pallas"), devices)
  results["pallas"] = aot.report(step, with_hlo=False)
  results["mosaic kernels"] = step.compiled.as_text().count('custom_call_target="tpu_custom_call"')
  try:  # the unchunked loss of 256 sequences of 8192 tokens per chip: 8 GiB of logits per sequence
    Trainer(tiny_job(batch_size=1024, seq_len=8192, vocab_size=65536, loss_chunk=0, loss_vocab_chunk=0),
            devices).compile()
    results["too big"] = "compiled"
  except StepDoesNotFit as e:
    results["too big"] = str(e)
  print(json.dumps(results, default=str))


if __name__ == "__main__":
  _main()
