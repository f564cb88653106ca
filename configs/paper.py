"""The paper's fine-tuning recipe (spec §7), shared by configs/fam_1b.py, fam_8b.py and fam_24b.py.

Variants (`--config=configs/fam_1b.py:<variant>`):
  fam         FAM, block 1024, FAM length 64, 3 memory segments (the default)
  bswa_m<k>   block sliding window attention with k memory segments (k = 0..8), no FAM
  full        plain causal attention
and after any of them, switches:
  ,unchunked  the step as the paper defines it, without the memory-saving settings of FITS (the whole
              [tokens, vocabulary] logits at once, every block's attention scores at once, the MLP of all
              tokens at once, one microbatch). It does not fit a v5e chip.
  ,pallas     the attention by the Pallas kernel (model.attention_impl="pallas", TPU only), which keeps no
              scores in HBM, so without attention_chunk; the rest as FITS.
e.g. `--config=configs/fam_1b.py:fam,pallas`.

As shipped, each size carries the settings that fit a v5e slice of the paper's chip count (16 GiB per chip;
32, 64 and 128 chips), as the TPU compiler measures them: `python benchmarks/memory_fit.py --platform=tpu`
(docs/launch.md, "Will it fit?"). On fewer chips (more sequences per chip) raise `microbatches`; the same
command with `--job=WORKDIR/config.json --topology=...` finds the count that fits.

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
# The memory-saving settings that fit 16 GiB per chip at the paper's chip count (v5e, docs/launch.md "Will it
# fit?"): the loss in tiles of 512 tokens x 32000 vocabulary entries, one query block's attention scores at
# a time, the MLP 1088 tokens (an eighth of the 8704) at a time; the 8B's two sequences per chip as two
# microbatches of one. The 1B fits without mlp_chunk (12.2 GiB, TPU compiler) and its step is faster without
# (predicted: nothing recomputed for it, and no reduce-scatter of the MLP weights' gradient per group).
FITS = {
    "1b": dict(microbatches=1, loss_chunk=512, loss_vocab_chunk=32000, attention_chunk=1, mlp_chunk=0),
    "8b": dict(microbatches=2, loss_chunk=512, loss_vocab_chunk=32000, attention_chunk=1, mlp_chunk=1088),
    "24b": dict(microbatches=1, loss_chunk=512, loss_vocab_chunk=32000, attention_chunk=1, mlp_chunk=1088),
}
UNCHUNKED = dict(microbatches=1, loss_chunk=0, loss_vocab_chunk=0, attention_chunk=0, mlp_chunk=0)
SWITCHES = ("unchunked", "pallas")


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
  variant, *switches = (variant or "fam").split(",")
  for switch in switches:
    if switch not in SWITCHES:
      raise ValueError(f"unknown switch {switch!r} after the variant; the switches are: "
                       f"{', '.join(f'{variant},{name}' for name in SWITCHES)}")
  apply_settings(c, UNCHUNKED if "unchunked" in switches else FITS[size])
  if "pallas" in switches:
    c.model.attention_impl = "pallas"
    c.model.attention_chunk = 0
  apply_variant(c, variant)
  return c


def apply_settings(c, settings: dict) -> None:
  """The memory-saving settings (FITS or UNCHUNKED) on a config: microbatches, loss_chunk and
  loss_vocab_chunk at the top level, attention_chunk and mlp_chunk of the model."""
  for name, value in settings.items():
    (c.model if name in ("attention_chunk", "mlp_chunk") else c)[name] = value


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
