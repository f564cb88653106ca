"""Evaluation of a run: the weighted loss and next-token accuracy on held-out batches.

The model starts every sequence from its learned FAM prompt, with no RSP or RPO (spec §6: both are
training-only).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from famjax.model import transformer
from famjax.parallel import activation_constraint
from famjax.training.config import JobConfig
from famjax.training.export import restore_params
from famjax.training.loss import weighted_cross_entropy
from famjax.training.trainer import Trainer


def evaluate(job: JobConfig, workdir, make_batches, num_batches: int) -> dict:
  """Weighted CE, perplexity and accuracy of the newest checkpoint in `workdir` over up to
  `num_batches` batches of the iterator `make_batches()` returns (made once the checkpoint is read)."""
  step, params = restore_params(job, workdir)
  cfg = job.model
  constrain = activation_constraint(Trainer(job).mesh)  # the batch stays split, as in training
  batches = make_batches()

  @jax.jit
  def sums(params, batch):
    inputs = batch["inputs"]
    state = transformer.empty_state(params, cfg, inputs.shape[0])
    mask = batch["segment_ids"] > 0 if "segment_ids" in batch else None
    logits, _ = transformer.forward(params, cfg, inputs, state, max_pending=0, token_mask=mask,
                                    constrain=constrain)
    _, m = weighted_cross_entropy(logits, batch["targets"], batch["weights"])
    return jnp.stack([m["ce"] * m["weight_sum"], m["accuracy"] * m["weight_sum"], m["weight_sum"]])

  total = np.zeros(3)
  n = 0
  for batch in batches:
    if n >= num_batches:
      break
    total += np.asarray(sums(params, {k: jnp.asarray(v) for k, v in batch.items()}))
    n += 1
  if hasattr(batches, "close"):
    batches.close()
  loss = total[0] / max(total[2], 1e-8)
  return {"step": step, "batches": n, "weighted_tokens": float(total[2]), "loss": float(loss),
          "perplexity": float(math.exp(min(loss, 50))), "accuracy": float(total[1] / max(total[2], 1e-8))}


def report(result: dict) -> str:
  return (f"checkpoint {result['step']}: loss {result['loss']:.4f} "
          f"(perplexity {result['perplexity']:.2f}), "
          f"accuracy {100 * result['accuracy']:.1f}% over {result['weighted_tokens']:.0f} weighted tokens "
          f"in {result['batches']} batches")
