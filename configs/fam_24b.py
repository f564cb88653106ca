"""The paper's 24B model and fine-tuning recipe (spec §7). Variants: :fam (default), :bswa_m0 ... :bswa_m8,
:full, each with `,unchunked` (the paper's step, which does not fit a v5e chip) or `,pallas` (the TPU
attention kernel). As shipped it fits a
v5e slice of the paper's chip count (configs/paper.py, FITS). See configs/paper.py for what the data needs.

  python -m famjax.train --config=configs/fam_24b.py:fam --workdir=DIR
"""

from configs import paper


def get_config(variant: str = "fam"):
  return paper.get_config("24b", variant)
