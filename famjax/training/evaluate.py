"""Evaluation of a run: the weighted loss and next-token accuracy on held-out batches.

The forward is the training step's (the same token masks, masked packing and sharding), without RSP or
RPO (spec §6: both are training-only): every sequence starts from the learned FAM prompt.

  result = summary(total_sums, batches, step)     # loss, perplexity, accuracy
  evaluate(job, workdir, make_batches, n)         # --mode=eval: the newest checkpoint of a workdir

The sums of one batch are famjax.training.step.eval_sums; during training the loop calls
Trainer.eval_sums, that function jitted on the state's parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from famjax.parallel import activation_constraint
from famjax.training.config import JobConfig
from famjax.training.export import restore_params
from famjax.training.step import eval_sums
from famjax.training.trainer import Trainer


def summary(total, batches: int, step: int) -> dict:
  """Loss, perplexity and accuracy from summed batch_sums over `batches` batches."""
  total = np.asarray(total, np.float64)
  loss = total[0] / max(total[2], 1e-8)
  return {"step": step, "batches": batches, "weighted_tokens": float(total[2]), "loss": float(loss),
          "perplexity": float(math.exp(min(loss, 50))), "accuracy": float(total[1] / max(total[2], 1e-8))}


def run_batches(sums_fn, batches, num_batches: int) -> tuple[np.ndarray, int]:
  """(summed sums, batches read): `sums_fn(batch)` over up to `num_batches` of the iterator `batches`
  (closed afterwards when it can be)."""
  total, n = np.zeros(3), 0
  try:
    for batch in batches:
      if n >= num_batches:
        break
      total += np.asarray(sums_fn(batch))
      n += 1
  finally:
    if hasattr(batches, "close"):
      batches.close()
  return total, n


def evaluate(job: JobConfig, workdir, make_batches, num_batches: int) -> dict:
  """Weighted CE, perplexity and accuracy of the newest checkpoint in `workdir` over up to
  `num_batches` batches of the iterator `make_batches()` returns (made once the checkpoint is read)."""
  step, params = restore_params(job, workdir)
  constrain = activation_constraint(Trainer(job).mesh)  # the batch stays split, as in training
  sums = jax.jit(lambda p, batch: eval_sums(p, job.model, batch, constrain=constrain,
                                            mask_between_examples=job.data.mask_between_examples))
  total, n = run_batches(lambda b: sums(params, {k: jnp.asarray(v) for k, v in b.items()}),
                         make_batches(), num_batches)
  return summary(total, n, step)


def report(result: dict) -> str:
  return (f"checkpoint {result['step']}: loss {result['loss']:.4f} "
          f"(perplexity {result['perplexity']:.2f}), "
          f"accuracy {100 * result['accuracy']:.1f}% over {result['weighted_tokens']:.0f} weighted tokens "
          f"in {result['batches']} batches")
