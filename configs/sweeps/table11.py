"""The paper's Table 11 at 1B: BSWA with 0, 1, 2, 3, 4, 6, 7, 8 memory segments against FAM.

  python -m famjax.sweep --sweep=configs/sweeps/table11.py --workdir=DIR --dry_run
"""


def get_sweep():
  points = [{"name": f"bswa_m{m}", "variant": f"bswa_m{m}"} for m in (0, 1, 2, 3, 4, 6, 7, 8)]
  points.append({"name": "fam", "variant": "fam"})
  return {"config": "configs/fam_1b.py", "points": points}
