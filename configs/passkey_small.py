"""The paper's PassKey experiment (spec §8) scaled down to 2 CPU cores: FAM and BSWA of the same size,
started from the same pretrained weights, trained the same number of steps on the same data, evaluated far
beyond the training length.

The paper fine-tunes a pretrained 1B model for 5k steps on filler of 2k-18k tokens (2 to 18 blocks of
1024), FAM 64 with 0 memory segments, BSWA with 0 to 8, and evaluates to 260k tokens. Here, in bytes: a
2-layer d=64 decoder is first pretrained for 200 steps on dense digit copying (variant `pretrain`, full
attention: the shared starting point); every variant starts from it (init_from) and trains 3000 steps on
the `passkey_small` mixture: PassKey in the short format (famjax.data.passkey.SHORT), filler 0-160 tokens
(0 to 5 blocks of 32), and short digit-copy examples, 3 to 1, packed in rows of 256 tokens. Block 32,
FAM 8. Evaluation goes to 16x the training row.

  python -m famjax.train --config=configs/passkey_small.py:pretrain --workdir=workdirs/passkey_small/pretrain
  python -m famjax.train --config=configs/passkey_small.py:fam --workdir=workdirs/passkey_small/fam \
      --config.init_from=workdirs/passkey_small/pretrain

Variants: fam (RSP p=0.8 from the first step, as the paper), fam_rsp_late (RSP from step 1500), fam_norsp
(RSP off), bswa_m0, bswa_m1, bswa_m2 (0, 1, 2 memory segments).
experiments/passkey_small.py runs the pretraining, all variants and the evaluation.
"""

from configs import base

VARIANTS = ("fam", "fam_rsp_late", "fam_norsp", "bswa_m0", "bswa_m1", "bswa_m2")
PRETRAIN = "pretrain"


def get_config(variant: str = "fam"):
  c = base.get_config()
  c.steps = 3000
  c.batch_size = 16
  c.seq_len = 256           # the longest PassKey example (160 filler tokens + 40) fits in a row
  c.checkpoint_every = 500
  c.log_every = 50
  c.tensorboard = False

  m = c.model
  m.vocab_size = 0          # the byte vocabulary (259)
  m.d_model = 64
  m.n_layers = 2
  m.n_heads = 4
  m.n_kv_heads = 4
  m.mlp_dim = 256
  m.block_size = 32
  m.fam_len = 8
  m.mem_segments = 0
  m.dtype = "float32"       # float32 is the fast matmul on CPU
  m.remat = "none"

  d = c.data
  d.mixture = "passkey_small"
  d.pack = True             # packed without masking, as the paper trains (earlier keys are distractors)
  d.instruction_weight = 0.0  # loss on the answers (the key; the copied digits) only
  d.repeat_segment_len = 0

  o = c.optimizer
  o.name = "adamw"
  o.learning_rate = 3e-3
  o.schedule = "cosine"
  o.warmup_steps = 50
  o.weight_decay = 0.01
  c.fam.rpo = False         # under exact relative angles RPO changes only rounding (spec §6)

  if variant == PRETRAIN:
    c.steps = 200
    d.mixture = "passkey_copy_small"
    m.attention, m.fam_len = "full", 0
    c.fam.rsp_prob = 0.0
  elif variant in ("fam", "fam_rsp_late", "fam_norsp"):
    m.attention = "fam"
    c.fam.rsp_prob = 0.0 if variant == "fam_norsp" else 0.8
    c.fam.rsp_start_step = 1500 if variant == "fam_rsp_late" else 0
  elif variant in ("bswa_m0", "bswa_m1", "bswa_m2"):
    m.attention, m.fam_len, m.mem_segments = "bswa", 0, int(variant[-1])
    c.fam.rsp_prob = 0.0
  else:
    raise ValueError(f"configs/passkey_small.py: unknown variant {variant!r} ({', '.join(VARIANTS)})")
  return c
