"""The scratch runs behind docs/passkey_small.md's "What was found on the way" table: a tiny FAM/BSWA model
trained from scratch with the real train step (famjax.training.Trainer) on PassKey batches built here in
numpy (byte ids), optionally mixed with dense digit-copy batches, evaluated on the streaming path.

  PYTHONPATH=. python experiments/passkey_explore.py --fmt colon --pack 1 --lo 0 --hi 160 --seq 256 \
      --copy_steps 200 --copy_every 4 --steps 2000 --eval_every 250 --evlens 256,1024

Rows of that table, in order: (no flags but --steps 1000), --pack 1 --lo 0 --hi 96, then with
--pack 1 --lo 0 --hi 320 --copy_steps 200 --copy_every 4: (nothing more), --sched constant --lr 1e-3,
--sched constant --lr 3e-3, --fmt colon, and the command above. --rsp 0.8 adds RSP (--rsp_start N: from
step N). --save/--load pickle and restore parameters (the fine-tune rows: --load a model trained without
RSP, then --rsp 0.8 --copy_steps 0 --sched constant --warm 0 --lr 3e-4 or 1e-3); --deadline S stops
training after S seconds (experiments/passkey_gpu_sweep.sh runs many at once that way).
"""
import argparse
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from famjax.training.config import job_config
from famjax.training.trainer import Trainer
from famjax.model import Transformer

p = argparse.ArgumentParser()
p.add_argument("--attention", default="fam")
p.add_argument("--mem", type=int, default=0)
p.add_argument("--rsp", type=float, default=0.0)
p.add_argument("--steps", type=int, default=600)
p.add_argument("--d", type=int, default=64)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--block", type=int, default=32)
p.add_argument("--fam", type=int, default=8)
p.add_argument("--lo", type=int, default=32)
p.add_argument("--hi", type=int, default=320)
p.add_argument("--seq", type=int, default=384)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--eval_every", type=int, default=200)
p.add_argument("--heads", type=int, default=4)

p.add_argument("--evlens", default="384,768,6144")
p.add_argument("--warm", type=int, default=50)
p.add_argument("--sched", default="cosine")
p.add_argument("--copy_steps", type=int, default=0)
p.add_argument("--copy_every", type=int, default=0)
p.add_argument("--period", type=int, default=16)
p.add_argument("--pack", type=int, default=0)
p.add_argument("--fmt", default="short")
p.add_argument("--verbose", type=int, default=1)
p.add_argument("--save", default="", help="pickle the final parameters here")
p.add_argument("--load", default="", help="start from parameters pickled by --save (a FAM prompt is added)")
p.add_argument("--rsp_start", type=int, default=0)
p.add_argument("--deadline", type=float, default=0, help="stop training after this many seconds")
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
def make(rng, filler_chars, depth=None):
  key = int(rng.integers(10000, 100000))
  depth = rng.random() if depth is None else depth
  text = (FILLER * (filler_chars // len(FILLER) + 1))[:filler_chars]
  cut = int(round(depth * filler_chars)); b = text.rfind(". ", 0, cut); cut = 0 if b < 0 or cut == 0 else b + 2
  if a.fmt == "colon":
    return text[:cut] + f"The pass key:{key}. " + text[cut:] + "\nThe pass key:", f"{key}", key
  return text[:cut] + f"The pass key is {key}. " + text[cut:] + "\nThe pass key is", f" {key}", key

c = base.get_config()
c.steps, c.batch_size, c.seq_len = a.steps, a.batch, a.seq
m = c.model
m.vocab_size = 259; m.d_model = a.d; m.n_layers = a.layers; m.n_heads = a.heads; m.n_kv_heads = a.heads
m.mlp_dim = 4 * a.d; m.attention = a.attention; m.block_size = a.block; m.mem_segments = a.mem
m.fam_len = a.fam if a.attention == "fam" else 0; m.dtype = "float32"; m.remat = "none"
c.data.mixture = "synthetic"
o = c.optimizer; o.name = "adamw"; o.learning_rate = a.lr; o.schedule = a.sched; o.warmup_steps = a.warm; o.weight_decay = 0.01
c.fam.rsp_prob = a.rsp; c.fam.rsp_start_step = a.rsp_start; c.fam.rpo = False; c.seed = a.seed
job = job_config(c)
tr = Trainer(job)
if a.load:
  from famjax.conversion.hf import initial_fam_prompt
  loaded = pickle.load(open(a.load, "rb"))
  if not job.model.has_fam:
    loaded.pop("fam_prompt", None)
  elif "fam_prompt" not in loaded:
    loaded["fam_prompt"] = initial_fam_prompt(loaded["embed"], job.model.fam_len, job.model.embed_scale)
  state = tr.initial_state(jax.tree.map(jnp.asarray, loaded))
else:
  state = tr.initial_state()
def enc(s): return [b + 3 for b in s.encode()]
rng = np.random.default_rng(a.seed)
def batch():
  B, T = a.batch, a.seq
  x = np.zeros((B, T + 1), np.int32); w = np.zeros((B, T), np.float32); seg = np.zeros((B, T), np.int32)
  for i in range(B):
    pos = 0; k = 1
    while True:
      pr, an, _ = make(rng, int(rng.integers(a.lo, a.hi + 1)))
      pr, an = [0] + enc(pr), enc(an) + [1]
      ids = pr + an
      if pos > 0 and pos + len(ids) > T + 1: break
      ids = ids[:T + 1 - pos]
      x[i, pos:pos + len(ids)] = ids; w[i, pos + len(pr) - 1:pos + len(ids) - 1] = 1
      seg[i, pos:pos + len(ids)] = k if a.attention != "fam" else 1
      pos += len(ids); k += 1
      if not a.pack or pos >= T: break
    seg[i, T - 1:] = seg[i, T - 1]
  return {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": w, "segment_ids": seg}

def evaluate(params, total, n=16):
  fc = total - 48
  exs = [make(np.random.default_rng([9, total, i]), fc, depth=i / (n - 1)) for i in range(n)]
  toks = np.array([[0] + enc(e[0]) for e in exs], np.int32)
  model = Transformer(job.model, params=params)
  st = model.init_state(n); chunk = 4 * job.model.block_size
  for s0 in range(0, toks.shape[1], chunk):
    lg, st = model.stream(jnp.asarray(toks[:, s0:s0 + chunk]), st)
  out = []
  for _ in range(6):
    t = np.asarray(jnp.argmax(lg[:, -1], -1)).astype(np.int32); out.append(t)
    lg, st = model.stream(jnp.asarray(t[:, None]), st)
  out = np.stack(out, 1)
  preds = [bytes([max(0, v - 3) for v in row]).decode("latin1").strip()[:5] for row in out]
  if total == evl[0] and a.verbose: print("   ", list(zip(preds[:6], [e[2] for e in exs[:6]])), flush=True)
  ok = [p == str(e[2]) for p, e in zip(preds, exs)]
  return round(100 * np.mean(ok)), "".join("x" if o else "." for o in ok)

def copy_batch():
  B, T = a.batch, a.seq
  x = np.zeros((B, T + 1), np.int32)
  for i in range(B):
    per = int(rng.integers(a.period // 2, a.period + 1))
    d = rng.integers(3 + 48, 3 + 58, per)
    x[i] = np.tile(d, (T + 1) // per + 1)[:T + 1]
  w = np.zeros((B, T), np.float32); w[:, a.period:] = 1
  return {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": w, "segment_ids": np.ones((B, T), np.int32)}

t0 = time.time(); losses = []; accs_tr = []
evl = [int(x) for x in a.evlens.split(",")]
for s in range(a.steps):
  use_copy = s < a.copy_steps or (a.copy_every and s % a.copy_every == 0)
  state, met = tr.step(state, tr.global_batch(copy_batch() if use_copy else batch()))
  losses.append(float(met["ce"])); accs_tr.append(float(met["accuracy"]))
  late = a.deadline and time.time() - t0 > a.deadline
  if (s + 1) % a.eval_every == 0 or s + 1 == a.steps or late:
    params = state.params(job.lora)
    accs = {L: evaluate(params, L) for L in evl}
    print(f"step {s+1} ce {np.mean(losses[-50:]):.3f} tracc {np.mean(accs_tr[-50:]):.3f} {accs} t {time.time()-t0:.0f}s", flush=True)
    if late:
      break
if a.save:
  pickle.dump(jax.tree.map(np.asarray, state.params(job.lora)), open(a.save, "wb"))
