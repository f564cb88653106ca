"""The 1B-shape FAM train step on one accelerator: tokens/s and MFU, the XLA attention against the fused
kernel (`model.attention_impl`), side by side in one run, with a check that both compute the same loss.

  python benchmarks/bench_gpu_step.py                      # GPU: 1B shape, 8704 tokens, xla and cudnn
  python benchmarks/bench_gpu_step.py --layers 4           # fewer layers (the per-layer figures are alike)
  python benchmarks/bench_gpu_step.py --shape small        # any machine (the default on CPU): a small shape

The 1B shape is configs/fam_1b.py's model (d 1536, 18 layers, 12 heads of 128, MLP 12288, 256k
vocabulary, block 1024, 3 memory blocks, FAM 64) with the paper's recipe (LoRA rank 64, bfloat16
compute, remat full, Adafactor), one sequence of 8704 tokens, the loss in tiles of 512 tokens x 32000
entries. MFU = model FLOPs per step (famjax.training.flops, the same count the training job logs) /
step time / the chip's peak: `--peak_tflops` (default: 989, an H100/H200's dense bfloat16 peak, on GPU;
on CPU, this machine's measured float32 matmul peak). "small": the same structure at d 256, 4 layers,
2048 tokens, block 256, FAM 16, float32 (the fused kernel is GPU-only, so on CPU only "xla" runs).
The step of each implementation is compiled in this process and timed after a warm-up (median of
`--steps`); both start from the same parameters and batch, so their first losses must agree
(bfloat16: within 2e-2 relative).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from configs import paper  # noqa: E402
from famjax.training import flops  # noqa: E402
from famjax.training.config import job_config  # noqa: E402
from famjax.training.synthetic import SyntheticBatches  # noqa: E402
from famjax.training.trainer import Trainer  # noqa: E402

SMALL = {"d_model": 256, "n_heads": 4, "n_kv_heads": 4, "head_dim": 64, "mlp_dim": 1024, "n_layers": 4,
         "vocab_size": 32768, "block_size": 256, "fam_len": 16, "dtype": "float32"}


def job(shape: str, impl: str, layers: int, seq_len: int):
  c = paper.get_config("1b").to_dict()
  c["data"]["mixture"] = "synthetic"
  c.update(batch_size=1, seq_len=seq_len, steps=100, loss_chunk=512, loss_vocab_chunk=32000,
           tensorboard=False)
  c["mesh"] = {"data": 1, "fsdp": 1, "tensor": 1}
  c["model"]["attention_impl"] = impl
  if shape == "small":
    c["model"].update(SMALL)
    c.update(seq_len=2048, loss_vocab_chunk=8192)
  if layers:
    c["model"]["n_layers"] = layers
  return job_config(c)


def run(j, steps: int) -> dict:
  trainer = Trainer(j, jax.devices()[:1])
  compile_s = trainer.compile()
  state = trainer.initial_state()
  it = SyntheticBatches(j.train.batch_size, j.train.seq_len, seed=0)
  state, metrics = trainer.step(state, trainer.global_batch(next(it)))
  first_loss = float(metrics["loss"])
  times = []
  for _ in range(steps):
    batch = trainer.global_batch(next(it))
    t0 = time.perf_counter()
    state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return {"step_s": statistics.median(times), "compile_s": compile_s, "first_loss": first_loss,
          "memory": trainer.memory_summary()}


def main(argv=None) -> None:
  on_gpu = jax.devices()[0].platform == "gpu"
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", choices=("1b", "small"), default="1b" if on_gpu else "small")
  parser.add_argument("--layers", type=int, default=0, help="0: the shape's own depth")
  parser.add_argument("--seq_len", type=int, default=8704)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--impls", default="xla,cudnn" if on_gpu else "xla")
  parser.add_argument("--peak_tflops", type=float, default=989.0 if on_gpu else 0.0,
                      help="the chip's peak (0: measure this CPU's float32 matmul peak)")
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  args = parser.parse_args(argv)
  peak = args.peak_tflops * 1e12 or max(flops.measure_cpu_peak(n, "float32", 5) for n in (1024, 2048))
  results = {}
  for impl in args.impls.split(","):
    j = job(args.shape, impl, args.layers, args.seq_len)
    r = run(j, args.steps)
    tokens = j.train.batch_size * j.train.seq_len
    model_flops = flops.train_flops_per_step(j.model, j.train.batch_size, j.train.seq_len)
    r.update(tokens_per_s=tokens / r["step_s"], mfu=flops.mfu(model_flops, r["step_s"], peak),
             model_tflop_per_step=model_flops / 1e12)
    results[impl] = r
  print(f"{args.shape} shape, {jax.devices()[0].device_kind}, jax {jax.version.__version__}, peak "
        f"{peak / 1e9:,.1f} GFLOP/s\n")
  print("| attention_impl | step (s) | tokens/s | MFU | first loss | compile (s) |\n|---|---:|---:|---:|---:|---:|")
  for impl, r in results.items():
    print(f"| {impl} | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
          f"{r['first_loss']:.5f} | {r['compile_s']:.1f} |")
  losses = [r["first_loss"] for r in results.values()]
  agree = max(losses) - min(losses) <= 2e-2 * abs(losses[0])
  print(f"\nfirst losses agree (2e-2 relative): {agree}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"shape": args.shape, "device": jax.devices()[0].device_kind, "peak_flops": peak,
                 "results": results, "losses_agree": agree}, f, indent=1)
  if not agree:
    raise SystemExit("bench_gpu_step.py: the implementations' first losses differ")


if __name__ == "__main__":
  main()
