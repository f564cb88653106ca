"""The paper's FAM-length ablation at 1B (configs/fam_1b.py: block 1024, 3 memory segments; the paper's
FAM length is 64): FAM length 4 .. 1024. Each point is a full 50k-step fine-tuning run on your data
(see configs/paper.py); look at the commands first:

  python -m famjax.sweep --sweep=configs/sweeps/fam_length_1b.py --workdir=DIR --dry_run
"""

LENGTHS = (4, 16, 64, 256, 1024)


def get_sweep():
  return {
      "config": "configs/fam_1b.py",
      "points": [{"name": f"fam{f}", "variant": "fam", "overrides": {"model.fam_len": f}} for f in LENGTHS],
  }
