"""The FAM-initialisation ablation (ModelConfig.fam_init, docs/ablations.md) at the demo's size: one
learned prompt through the layers (the spec's) against a learned initial state per layer (a prefix; the
paper reports it worse).

  python -m famjax.sweep --sweep=configs/sweeps/fam_init.py --workdir=/tmp/famjax_fam_init
"""


def get_sweep():
  return {
      "config": "configs/demo.py",
      "overrides": {"steps": 60, "checkpoint_every": 60},
      "points": [{"name": init, "variant": "fam", "overrides": {"model.fam_init": init}}
                 for init in ("prompt", "prefix")],
  }
