"""Input-pipeline throughput of famjax.data, against what a training step consumes.

  python benchmarks/bench_data.py [--seconds 20] [--out bench_results/data.md]

1. The demo mixtures at the lengths a 2-CPU demo trains on (byte vocabulary).
2. Paper-style packing: 8.5k-token rows (8704) with the 256-token repeated segment, from a mixture of
   40 Flan-like JSONL tasks generated into a temporary directory (prompts of 50-2000 characters,
   answers of 2-400, a few bad records in each).
3. Resuming: the time get_batches(..., state=...) takes to replay 100 batches of the demo pipeline.
4. For comparison, the tokens/s a jitted training step (forward + backward) of a small FAM model
   consumes on the same CPUs, with the model core's own step (famjax.model), if it imports.

Tokens/s counts whole rows (batch x seq_len: what the trainer receives); "fill" is the non-padding
share of them. The pipeline runs with prefetch=0 so the number is the producer's own rate on the
calling thread. Prints markdown tables (and writes them to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from famjax import data


def measure(config: data.DataConfig, batch_size: int, seconds: float) -> dict:
  """Batches per second after a warm-up batch, for about `seconds`."""
  with data.get_batches(config, batch_size=batch_size) as it:
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    examples_before = it.stats()["packing"]["examples"]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
      next(it)
      n += 1
    elapsed = time.perf_counter() - t0
    stats = it.stats()
  packing = stats["packing"]
  return {"first_batch_s": first, "rows_per_s": n * batch_size / elapsed,
          "tokens_per_s": n * batch_size * config.seq_len / elapsed, "fill": packing["fill"],
          "examples_per_s": (packing["examples"] - examples_before) / elapsed,
          "sources": stats["sources"]}


def write_flan_like(directory: str, n_tasks: int = 40, n_records: int = 500, seed: int = 0
                    ) -> tuple[tuple[str, str, float], ...]:
  rng = np.random.default_rng(seed)
  words = "the a of to and in is it you that he was for on are with as his they be at one have".split()
  sources = []
  for t in range(n_tasks):
    path = os.path.join(directory, f"task{t:02d}.jsonl")
    with open(path, "w") as f:
      for i in range(n_records):
        n_in, n_out = int(rng.integers(10, 400)), int(rng.integers(1, 80))
        prompt = f"Task {t}. " + " ".join(rng.choice(words, n_in))
        answer = " ".join(rng.choice(words, n_out))
        f.write(json.dumps({"inputs": prompt, "targets": answer}) + "\n")
        if i % 100 == 0:
          f.write('{"inputs": "a record without its answer"}\n')
    sources.append((f"t{t:02d}", path, float(rng.uniform(0.5, 2.0))))
  return tuple(sources)


def restore_time(config: data.DataConfig, batch_size: int, batches: int) -> float:
  with data.get_batches(config, batch_size=batch_size) as it:
    for _ in range(batches):
      next(it)
    state = it.state()
  t0 = time.perf_counter()
  with data.get_batches(config, batch_size=batch_size, state=state) as it:
    next(it)
  return time.perf_counter() - t0


def train_step_tokens_per_s(seq_len: int, batch: int) -> str:
  """Tokens/s of a jitted loss-and-gradient step of a small FAM model (what a demo trains)."""
  try:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from famjax import ModelConfig  # pylint: disable=import-outside-toplevel
    from famjax.model import init_params  # pylint: disable=import-outside-toplevel
    from famjax.model import transformer as tf_lib  # pylint: disable=import-outside-toplevel

    cfg = ModelConfig(vocab_size=data.BYTE_VOCAB_SIZE, d_model=128, n_layers=2, n_heads=4,
                      n_kv_heads=4, mlp_dim=512, attention="fam", block_size=128, mem_segments=1,
                      fam_len=16, dtype="float32", param_dtype="float32", remat="none")
    params = init_params(cfg, jax.random.key(0))

    def loss(p, tokens):
      state = tf_lib.empty_state(p, cfg, tokens.shape[0])
      logits, _ = tf_lib.forward(p, cfg, tokens[:, :-1], state, max_pending=0)
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    step = jax.jit(jax.value_and_grad(loss))
    tokens = jnp.ones((batch, seq_len + 1), jnp.int32)
    jax.block_until_ready(step(params, tokens))
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(step(params, tokens))
      times.append(time.perf_counter() - t0)
    return f"{batch * seq_len / float(np.median(times)):,.0f}"
  except Exception as e:  # pylint: disable=broad-except  (the model core is developed separately)
    return f"n/a ({type(e).__name__}: {str(e)[:80]})"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--out", default="")
  args = parser.parse_args()

  rows = []
  demo = [("famjax_demo_short", 512, 32, 16), ("famjax_demo", 2048, 64, 8),
          ("famjax_demo_long", 8704, 256, 4)]
  for mixture, seq_len, repeat, batch in demo:
    cfg = data.DataConfig(mixture=mixture, seq_len=seq_len, repeat_segment_len=repeat, prefetch=0)
    rows.append((mixture, seq_len, batch, measure(cfg, batch, args.seconds)))
  with tempfile.TemporaryDirectory() as tmp:
    sources = write_flan_like(tmp)
    cfg = data.DataConfig(mixture="bench_flan40", sources=sources, seq_len=8704, prefetch=0)
    result = measure(cfg, 8, args.seconds)
    bad = sum(s.get("skipped_missing_field", 0) for s in result["sources"].values())
    rows.append((f"40 JSONL tasks ({bad} bad records skipped)", 8704, 8, result))

  lines = [f"Input pipeline on {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
           f"byte vocabulary, prefetch=0, {args.seconds:.0f} s per row.", "",
           "| pipeline | seq_len | rows/batch | first batch (s) | rows/s | tokens/s | fill | "
           "examples/s |", "|---|---|---|---|---|---|---|---|"]
  for name, seq_len, batch, r in rows:
    lines.append(f"| {name} | {seq_len} | {batch} | {r['first_batch_s']:.2f} | {r['rows_per_s']:.1f} "
                 f"| {r['tokens_per_s']:,.0f} | {r['fill']:.2f} | {r['examples_per_s']:,.0f} |")
  demo_cfg = data.DataConfig(mixture="famjax_demo", seq_len=2048, repeat_segment_len=64, prefetch=0)
  replay = restore_time(demo_cfg, 8, 100)
  lines += ["", f"Resume (replay) of 100 batches of famjax_demo at 2048 x 8: {replay:.2f} s.", "",
            "| training step (small FAM: d_model 128, 2 layers, block 128, FAM 16, float32) | "
            "tokens/s |", "|---|---|"]
  for seq_len, batch in ((512, 16), (2048, 8)):
    lines.append(f"| {seq_len} x {batch} | {train_step_tokens_per_s(seq_len, batch)} |")
  text = "\n".join(lines)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
