"""The recall suite (famjax.data.recall) at small scale: the models of configs/passkey_small.py trained on
multi-key PassKey and MQAR-like associative recall instead of single-key PassKey.

Same model, optimizer, packing and steps as configs/passkey_small.py (a 2-layer d=64 byte decoder, block
32, FAM 8, rows of 512, loss on the answers only); the data is `recall_small`: `multikey_small` (4 named
keys "#ab=12345" in random-letter filler, one asked for with "?ab=") and `mqar_small` (6 pairs at the
start, filler, 3 questions answered in sequence) at equal rates, examples of 128, 256 or 512 tokens.

  python -m famjax.train --config=configs/recall_small.py:fam --workdir=workdirs/recall_small/fam

Variants (all run by experiments/recall_suite.py): bswa_m0, bswa_m1, bswa_m2 (0, 1, 2 memory
segments), fam (the spec's FAM), fam_gate (with the FAM write gate, a famjax extension), full (plain
causal attention over the whole row: the reference that sees everything it was trained on; its
key/value cache grows with the text, so it is evaluated only up to FULL_MAX_LENGTH).
"""

from configs import passkey_small

VARIANTS = ("bswa_m0", "bswa_m1", "bswa_m2", "fam", "fam_gate", "full")  # the rows of the table
MIXTURE = "recall_small"  # famjax.data.recall.TRAIN_MIXTURE
TRAIN_LENGTH = passkey_small.TRAIN_LENGTH  # 512: the longest training row
FULL_MAX_LENGTH = 8192  # full attention's longest evaluation (its cache and per-token cost grow)


def get_config(variant: str = "fam"):
  if variant not in VARIANTS:
    raise ValueError(f"configs/recall_small.py: unknown variant {variant!r} ({', '.join(VARIANTS)})")
  c = passkey_small.get_config("bswa_m0" if variant == "full" else variant)
  c.data.mixture = MIXTURE
  if variant == "full":
    c.model.attention, c.model.fam_len, c.model.mem_segments = "full", 0, 0
  return c
