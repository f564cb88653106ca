"""Streaming demo: build a small FAM model, check streaming against the parallel forward, then stream a
long random sequence in constant memory and report tokens/s and memory as it goes.

  python -m famjax.demo [--attention fam] [--tokens 262144] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import numpy as np
from flax import nnx

from famjax import ModelConfig, Transformer


def rss_mib() -> float:
  """Resident memory of this process now (not the peak), in MiB."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def state_mib(state) -> float:
  return sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--attention", default="fam", choices=["full", "bswa", "fam"])
  parser.add_argument("--tokens", type=int, default=262_144, help="tokens to stream")
  parser.add_argument("--chunk", type=int, default=1024, help="tokens per stream call")
  parser.add_argument("--block_size", type=int, default=256)
  parser.add_argument("--mem_segments", type=int, default=1)
  parser.add_argument("--fam_len", type=int, default=16)
  args = parser.parse_args(argv)

  cfg = ModelConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=512,
                    attention=args.attention, block_size=args.block_size, mem_segments=args.mem_segments,
                    fam_len=args.fam_len if args.attention == "fam" else 0, dtype="float32", remat="none")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  n_params = sum(x.size for x in jax.tree.leaves(model.params_dict()))
  print(f"famjax demo: {cfg.attention} decoder, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"block {cfg.block_size}, memory blocks {cfg.mem_segments}, FAM rows {cfg.fam_len}, "
        f"{n_params / 1e6:.2f}M parameters, {jax.devices()[0].platform}")

  rng = np.random.default_rng(0)
  check = rng.integers(0, cfg.vocab_size, (1, 4 * cfg.block_size + 37))
  parallel = np.asarray(model(check))
  state, outs, i = model.init_state(1), [], 0
  for n in (cfg.block_size // 2 + 3, 1, 2 * cfg.block_size, check.shape[1]):
    n = min(n, check.shape[1] - i)
    if n <= 0:
      break
    logits, state = model.stream(check[:, i:i + n], state)
    outs.append(np.asarray(logits))
    i += n
  err = np.abs(np.concatenate(outs, 1) - parallel).max() / np.abs(parallel).max()
  print(f"streaming vs parallel forward on {check.shape[1]} tokens in uneven chunks: "
        f"max relative difference {err:.1e}")

  state = model.init_state(1)
  chunk = rng.integers(0, cfg.vocab_size, (1, args.chunk))
  logits, state = model.stream(chunk, state)  # compile
  jax.block_until_ready(logits)
  done, t0, report_at = args.chunk, time.perf_counter(), args.chunk * 16
  print(f"{'tokens':>10} {'tokens/s':>10} {'state MiB':>10} {'RSS MiB':>9}")
  while done < args.tokens:
    logits, state = model.stream(rng.integers(0, cfg.vocab_size, (1, args.chunk)), state)
    done += args.chunk
    if done >= report_at or done >= args.tokens:
      jax.block_until_ready(logits)
      rate = (done - args.chunk) / (time.perf_counter() - t0)
      print(f"{done:>10} {rate:>10.0f} {state_mib(state):>10.2f} {rss_mib():>9.0f}")
      report_at *= 4
  print(f"streamed {done} tokens; next-token distribution entropy at the end: "
        f"{float(-(jax.nn.softmax(logits[0, -1]) * jax.nn.log_softmax(logits[0, -1])).sum()):.3f} nats")


if __name__ == "__main__":
  main()
