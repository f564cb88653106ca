"""Attending to more than the one previous FAM (ModelConfig.fam_history, docs/ablations.md) at the
demo's size: the block tokens read the last 1 (the spec's), 2 or 4 FAM states.

  python -m famjax.sweep --sweep=configs/sweeps/fam_history.py --workdir=/tmp/famjax_fam_history
"""


def get_sweep():
  return {
      "config": "configs/demo.py",
      "overrides": {"steps": 60, "checkpoint_every": 60},
      "points": [{"name": f"history{k}", "variant": "fam", "overrides": {"model.fam_history": k}}
                 for k in (1, 2, 4)],
  }
