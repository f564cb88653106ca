"""The Random Position Offset / Random State Passing ablation (spec §6; famjax.training.config's
FamTrainingConfig: fam.rpo, fam.rsp_prob) at the demo's size: each on and off, and the RSP probability
(the paper's 0.8 against 0.5 and 1.0) with RPO on. Under famjax's exact block-relative angles RPO acts
only through float32 rounding (the docstring of Transformer.__call__ says how).

  python -m famjax.sweep --sweep=configs/sweeps/rpo_rsp.py --workdir=/tmp/famjax_rpo_rsp
"""

POINTS = (  # name, rpo, rsp_prob
    ("plain", False, 0.0),
    ("rpo", True, 0.0),
    ("rsp", False, 0.8),
    ("rpo_rsp", True, 0.8),   # the paper's recipe (and the demo's)
    ("rpo_rsp050", True, 0.5),
    ("rpo_rsp100", True, 1.0),
)


def get_sweep():
  return {
      "config": "configs/demo.py",
      "overrides": {"steps": 60, "checkpoint_every": 60},
      "points": [{"name": name, "variant": "fam", "overrides": {"fam.rpo": rpo, "fam.rsp_prob": p}}
                 for name, rpo, p in POINTS],
  }
