"""The demo: a small FAM model learning the built-in `famjax_demo` mixture on a laptop CPU.

  python -m famjax.train --config=configs/demo.py --workdir=/tmp/famjax_demo

A few minutes on 2 CPU cores: the loss falls visibly, checkpoints are saved, and the job ends by saying
where its outputs are and how to evaluate or resume them. Variants: `:fam` (default), `:bswa`, `:full`
(the same model with the other attention patterns), `:lora` (LoRA rank 8 instead of full fine-tuning).
"""

from configs import base


def get_config(variant: str = "fam"):
  c = base.get_config()
  c.steps = 100
  c.batch_size = 8
  c.seq_len = 512
  c.checkpoint_every = 50
  c.log_every = 10

  m = c.model
  m.vocab_size = 0          # the byte vocabulary (259)
  m.d_model = 256
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 4
  m.mlp_dim = 1024
  m.block_size = 64
  m.mem_segments = 1
  m.fam_len = 8
  m.dtype = "float32"       # on CPU float32 matmuls are the fast ones; bf16 is for accelerators
  m.remat = "none"          # small enough to keep every activation

  c.data.mixture = "famjax_demo"
  c.data.instruction_weight = 0.1  # more signal per row for a tiny model
  c.data.repeat_segment_len = 32

  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 10
  c.optimizer.weight_decay = 0.01

  c.fam.rsp_prob = 0.8
  c.fam.rpo = True
  _variant(c, variant)
  return c


def _variant(c, variant: str) -> None:
  if variant in ("", "fam"):
    return
  if variant in ("bswa", "full"):
    c.model.attention, c.model.fam_len = variant, 0
    c.fam.rsp_prob = 0.0  # nothing to pass without FAM
  elif variant == "lora":
    c.lora.rank, c.lora.alpha = 8, 16.0
    c.optimizer.learning_rate = 1e-2
  else:
    raise ValueError(f"configs/demo.py: unknown variant {variant!r} (fam, bswa, full, lora)")
