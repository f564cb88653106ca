"""The FAM-position ablation (ModelConfig.fam_position, docs/ablations.md) at the demo's size: the RoPE
positions of a FAM state's rows at the last F positions of the block it compressed (the spec's), evenly
spread over that block, or all at its first position.

  python -m famjax.sweep --sweep=configs/sweeps/fam_position.py --workdir=/tmp/famjax_fam_position
"""


def get_sweep():
  return {
      "config": "configs/demo.py",
      "overrides": {"steps": 60, "checkpoint_every": 60},
      "points": [{"name": where, "variant": "fam", "overrides": {"model.fam_position": where}}
                 for where in ("last", "between", "zero")],
  }
