"""The paper's fine-tuning recipe (spec §7), shared by configs/fam_1b.py, fam_8b.py and fam_24b.py.

Variants (`--config=configs/fam_1b.py:<variant>`):
  fam         FAM, block 1024, FAM length 64, 3 memory segments (the default)
  bswa_m<k>   block sliding window attention with k memory segments (k = 0..8), no FAM
  full        plain causal attention

The data is yours: the paper's Flan mixture is not built in. Register a seqio mixture named `flan`, or
give the data files with `config.data.sources` (see docs/training.md), and the 256k SentencePiece model
with `--config.data.vocabulary=/path/to/spm.model`.
"""

from configs import base

# size: (layers, d_model, FF multiplier, heads, key/value heads, constant learning rate)
SHAPES = {
    "1b": (18, 1536, 8, 12, 12, 1e-4),
    "8b": (32, 4096, 4, 32, 32, 3e-3),
    "24b": (56, 4096, 8, 32, 1, 3e-3),
}
VARIANTS = ("fam", "full") + tuple(f"bswa_m{k}" for k in range(9))


def get_config(size: str, variant: str = "fam"):
  layers, d_model, ff, heads, kv_heads, lr = SHAPES[size]
  c = base.get_config()
  c.steps = 50_000
  c.batch_size = 128
  c.seq_len = 8704                # Flan packed to 8.5k tokens
  c.checkpoint_every = 1000
  c.log_every = 100

  m = c.model
  m.vocab_size = 256_000          # 256k SentencePiece
  m.d_model = d_model
  m.n_layers = layers
  m.n_heads = heads
  m.n_kv_heads = kv_heads
  m.head_dim = 128
  m.mlp_dim = ff * d_model
  m.tie_embeddings = True
  m.block_size = 1024
  m.fam_len = 64
  m.mem_segments = 3
  m.dtype = "bfloat16"
  m.param_dtype = "float32"
  m.remat = "full"

  c.data.mixture = "flan"
  c.data.vocabulary = "spm_256k.model"  # set to your SentencePiece model
  c.data.pack = True
  c.data.mask_between_examples = False
  c.data.repeat_segment_len = 256
  c.data.repeat_segment_weight = 0.1
  c.data.instruction_weight = 0.0

  c.optimizer.name = "adafactor"
  c.optimizer.learning_rate = lr
  c.optimizer.schedule = "constant"
  c.optimizer.b1 = 0.9
  c.optimizer.decay_rate = 0.99

  c.lora.rank = 64
  c.lora.alpha = 64.0
  c.lora.targets = "q,k,v,o,gate,up,down"

  c.fam.rsp_prob = 0.8
  c.fam.rpo = True

  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  apply_variant(c, variant)
  return c


def apply_variant(c, variant: str) -> None:
  variant = variant or "fam"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
  if variant == "fam":
    return
  c.fam.rsp_prob = 0.0  # RSP passes FAM states; without FAM there is nothing to pass
  c.model.fam_len = 0
  if variant == "full":
    c.model.attention = "full"
  else:
    c.model.attention = "bswa"
    c.model.mem_segments = int(variant[len("bswa_m"):])
