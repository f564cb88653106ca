"""The demo model with each attention pattern (fam, bswa, full), short runs that fit a laptop CPU.

  python -m famjax.sweep --sweep=configs/sweeps/demo_attention.py --workdir=/tmp/famjax_sweep
"""


def get_sweep():
  return {
      "config": "configs/demo.py",
      "overrides": {"steps": 60, "checkpoint_every": 60},
      "points": [{"name": v, "variant": v} for v in ("fam", "bswa", "full")],
  }
