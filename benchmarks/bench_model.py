"""Model benchmarks, measured side by side in one run (ratios matter: this machine is noisy).

  python benchmarks/bench_model.py [--lengths 2048,4096,8192,16384,32768] [--full_max 16384]
                                   [--stream_tokens 1048576] [--out bench_results/model.md]

1. Training step (forward + backward, jitted) time against sequence length for full, bswa and fam on the
   small model of the model-core issue (d_model 256, 4 layers, block 512, 1 memory segment, FAM 32).
2. Streaming: per-chunk time, process memory and state size from 16k to `stream_tokens` streamed tokens.
3. Compile time of the training step at 4 and at 24 layers (the scan over layers keeps it flat).
Prints markdown tables (and writes them to --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from famjax import ModelConfig, Transformer
from famjax.model import transformer as tf_lib

SMALL = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_dim=1024,
             block_size=512, mem_segments=1, fam_len=32, dtype="float32", param_dtype="float32",
             remat="full")


def config(attention: str, **kw) -> ModelConfig:
  return ModelConfig(**{**SMALL, "attention": attention,
                        "fam_len": SMALL["fam_len"] if attention == "fam" else 0, **kw})


def train_step_fn(cfg: ModelConfig):
  """A jitted loss-and-gradient step over the parameter dict (what a training step computes)."""

  def loss(params, tokens):
    state = tf_lib.empty_state(params, cfg, tokens.shape[0])
    logits, _ = tf_lib.forward(params, cfg, tokens[:, :-1], state, max_pending=0)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  return jax.jit(jax.value_and_grad(loss))


def bench_train(lengths, full_max, repeats) -> list[str]:
  """Per length: compile the three modes, then time them round-robin (so machine noise hits all three
  alike) and keep each mode's fastest step."""
  rows = ["| tokens | full s/step | bswa s/step | fam s/step | fam/bswa | full/fam |",
          "|---:|---:|---:|---:|---:|---:|"]
  models = {a: Transformer(config(a)) for a in ("full", "bswa", "fam")}
  for T in lengths:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, SMALL["vocab_size"], (1, T + 1)))
    modes = [a for a in ("bswa", "fam", "full") if a != "full" or T <= full_max]
    steps = {a: (train_step_fn(models[a].config), models[a].params_dict()) for a in modes}
    for a in modes:
      jax.block_until_ready(steps[a][0](steps[a][1], tokens))  # compile + warm up
    t = {a: float("inf") for a in modes}
    for _ in range(repeats):
      for a in modes:
        t0 = time.perf_counter()
        jax.block_until_ready(steps[a][0](steps[a][1], tokens))
        t[a] = min(t[a], time.perf_counter() - t0)
    t.setdefault("full", float("nan"))
    rows.append(f"| {T} | {t['full']:.3f} | {t['bswa']:.3f} | {t['fam']:.3f} | {t['fam'] / t['bswa']:.3f} | "
                f"{t['full'] / t['fam']:.2f} |")
    print(rows[-1], flush=True)
  return rows


def rss_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def bench_stream(total: int, chunk: int) -> list[str]:
  cfg = config("fam", remat="none")
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  state = model.init_state(1)
  logits, state = model.stream(rng.integers(0, cfg.vocab_size, (1, chunk)), state)  # compile
  jax.block_until_ready(logits)
  rows = ["| streamed tokens | ms / chunk of %d | process RSS MiB | state MiB |" % chunk, "|---:|---:|---:|---:|"]
  marks = [m for m in (16_384 * 4**i for i in range(8)) if m < total] + [total]
  done, window = chunk, []
  while done < total:
    t0 = time.perf_counter()
    logits, state = model.stream(rng.integers(0, cfg.vocab_size, (1, chunk)), state)
    jax.block_until_ready(logits)
    window.append(time.perf_counter() - t0)
    done += chunk
    if done >= marks[0]:
      marks.pop(0)
      state_mib = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
      rows.append(f"| {done} | {1e3 * np.median(window[-16:]):.1f} | {rss_mib():.0f} | {state_mib:.2f} |")
      print(rows[-1], flush=True)
  return rows


def bench_compile(seq_len: int) -> list[str]:
  rows = ["| layers | train-step compile s |", "|---:|---:|"]
  for layers in (2, 4, 24):  # the first compile also warms up the compiler; it is not reported
    cfg = config("fam", n_layers=layers)
    shapes = jax.eval_shape(lambda: Transformer(cfg).params_dict())
    tokens = jax.ShapeDtypeStruct((1, seq_len + 1), jnp.int32)
    t0 = time.perf_counter()
    train_step_fn(cfg).lower(shapes, tokens).compile()
    if layers != 2:
      rows.append(f"| {layers} | {time.perf_counter() - t0:.2f} |")
      print(rows[-1], flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="2048,4096,8192,16384,32768")
  parser.add_argument("--full_max", type=int, default=16384, help="longest length timed for full attention")
  parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode (the fastest is kept)")
  parser.add_argument("--stream_tokens", type=int, default=1 << 20)
  parser.add_argument("--stream_chunk", type=int, default=2048)
  parser.add_argument("--skip", default="", help="comma list of sections to skip: train,stream,compile")
  parser.add_argument("--out", default="bench_results/model.md")
  args = parser.parse_args()
  skip = set(filter(None, args.skip.split(",")))
  header = (f"famjax model benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"jax {jax.__version__} on {jax.devices()[0].platform}; model {SMALL}")
  print(header, flush=True)
  out = [header, ""]
  if "train" not in skip:
    out += ["### Training step (forward + backward), batch 1", ""]
    out += bench_train([int(x) for x in args.lengths.split(",")], args.full_max, args.repeats) + [""]
  if "stream" not in skip:
    out += ["### Streaming (fam)", ""] + bench_stream(args.stream_tokens, args.stream_chunk) + [""]
  if "compile" not in skip:
    out += ["### Compile time of the training step (fam, 2048 tokens)", ""] + bench_compile(2048) + [""]
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    f.write("\n".join(out) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
