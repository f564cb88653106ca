"""The paper's FAM-length ablation (FAM length 4 .. 1024 at 1B; 64 was best), at the demo's size: the
demo's block of 64 tokens allows FAM lengths 4 .. 64 (a FAM state takes the positions of the last F
tokens of its block, so F <= block_size). The 1B sweep is configs/sweeps/fam_length_1b.py.

  python -m famjax.sweep --sweep=configs/sweeps/fam_length.py --workdir=/tmp/famjax_fam_length
"""

LENGTHS = (4, 8, 16, 32, 64)


def get_sweep():
  return {
      "config": "configs/demo.py",
      "overrides": {"steps": 60, "checkpoint_every": 60},
      "points": [{"name": f"fam{f}", "variant": "fam", "overrides": {"model.fam_len": f}} for f in LENGTHS],
  }
