"""The paper's PassKey experiment (spec §8) scaled down to 2 CPU cores: FAM and BSWA of the same size,
trained the same number of steps on the same data, evaluated to 16x the longest training row.

The paper fine-tunes a pretrained 1B model for 5k steps on filler of 2k-18k tokens (2 to 18 blocks of
1024), FAM 64 with 0 memory segments, BSWA with 0 to 8, and evaluates to 260k tokens. Here a 2-layer
d=64 decoder (byte vocabulary, block 32, FAM 8) trains from scratch on `passkey_random_small`: PassKey
examples of 64, 128, 256 or 512 tokens (2 to 16 blocks), random-letter filler, the key ("#" + 5 digits)
at a uniform depth, the question "?" at the end, loss on the answer only. Examples are packed in rows of
512 with masks between them and each at a block boundary, so every example is computed exactly as if it
were alone in its row (its own FAM from the prompt: famjax.model.fam.fam_restarts): one example per row,
as the paper trains PassKey, without the padding. 2500 steps, AdamW with a cosine decay (the one command
fits the hour on 2 cores). Evaluated from 512 to 32k tokens (64x).

  python -m famjax.train --config=configs/passkey_small.py:fam --workdir=workdirs/passkey_small/fam

Variants (VARIANTS run by experiments/passkey_small.py): fam (the spec's FAM, 0 memory segments, no RSP),
fam_gate (fam with the FAM write gate, ModelConfig.fam_gate: a famjax extension, not the paper's model,
its ablation row), bswa_m0, bswa_m1, bswa_m2 (0, 1, 2 memory segments). EXTRA_VARIANTS are the
length-generalisation ablations of docs/passkey_small.md (`--variants=` of the experiment, or this
file's `:NAME` directly): fam_rsp (RSP p=0.8 from the first step, the paper's), fam_rsp_late (RSP from
half-way, on a model that already retrieves), fam_repeated (trained on the repeated-phrase filler),
fam_gate_rsp (fam_gate with the paper's RSP, p=0.8 from the first step).
"""

from configs import base

VARIANTS = ("fam", "fam_gate", "bswa_m0", "bswa_m1", "bswa_m2")
EXTRA_VARIANTS = ("fam_rsp", "fam_rsp_late", "fam_repeated", "fam_gate_rsp")
TRAIN_LENGTH = 512  # the longest training row: evaluation starts here and goes to 16x


def get_config(variant: str = "fam"):
  c = base.get_config()
  c.steps = 2500
  c.batch_size = 16
  c.seq_len = TRAIN_LENGTH
  c.checkpoint_every = 500
  c.log_every = 100
  c.tensorboard = False

  m = c.model
  m.vocab_size = 0          # the byte vocabulary (259)
  m.d_model = 64
  m.n_layers = 2
  m.n_heads = 4
  m.n_kv_heads = 4
  m.mlp_dim = 128
  m.block_size = 32
  m.fam_len = 8
  m.mem_segments = 0
  m.dtype = "float32"       # float32 is the fast matmul on CPU
  m.remat = "none"
  m.init_std = None         # d_model ** -0.5 = 0.125; 0.02 keeps this model at chance

  d = c.data
  d.mixture = "passkey_random_small"
  d.pack = True             # several examples per row, each computed as if alone in its row:
  d.mask_between_examples = True  # attention within an example, the FAM restarted for each one,
  d.pack_align = 32               # every example starting at a block boundary (exact)
  d.instruction_weight = 0.0  # loss on the answers only
  d.repeat_segment_len = 0

  o = c.optimizer
  o.name = "adamw"
  o.learning_rate = 2e-3
  o.schedule = "cosine"      # to 0.1 of the peak at the last step
  o.warmup_steps = 200
  o.weight_decay = 0.01
  o.max_grad_norm = 1.0
  c.fam.rpo = False         # under exact relative angles RPO changes only rounding (spec §6)
  c.fam.rsp_prob = 0.0

  if variant in ("fam", "fam_gate", "fam_rsp", "fam_rsp_late", "fam_repeated", "fam_gate_rsp"):
    m.attention = "fam"
    m.fam_gate = variant in ("fam_gate", "fam_gate_rsp")
    if variant in ("fam_rsp", "fam_rsp_late", "fam_gate_rsp"):
      c.fam.rsp_prob = 0.8
      c.fam.rsp_start_step = c.steps // 2 if variant == "fam_rsp_late" else 0
    if variant == "fam_repeated":
      d.mixture = "passkey_repeated_small"
  elif variant in ("bswa_m0", "bswa_m1", "bswa_m2"):
    m.attention, m.fam_len, m.mem_segments = "bswa", 0, int(variant[-1])
  else:
    raise ValueError(f"configs/passkey_small.py: unknown variant {variant!r} "
                     f"({', '.join(VARIANTS + EXTRA_VARIANTS)})")
  return c
