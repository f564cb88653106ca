"""Every field of a famjax training config, with its default and meaning. Other configs start here.

A config is an ml_collections.ConfigDict; famjax.train validates it into one typed object per concern
(famjax/training/config.py, famjax.ModelConfig, famjax.data.DataConfig) before anything compiles, and
refuses an unknown key, a wrong type or an invalid value with one line naming the field.
Override any field on the command line: --config.steps=2000 --config.model.attention=bswa.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()

  # -- the run (famjax.training.config.TrainConfig) -------------------------------------------------
  c.steps = 100               # optimizer steps in total; raise it and rerun to train further
  c.batch_size = 8            # global batch: sequences per step over all hosts and devices
  c.seq_len = 512             # tokens per (packed) sequence
  c.checkpoint_every = 50     # save every N steps, and always at the end; 0: only at the end
  c.keep_checkpoints = 3      # checkpoints kept (the newest ones)
  c.log_every = 10            # a console line and a metrics.jsonl record every N steps
  c.seed = 0                  # seeds the initialisation, RSP/RPO draws and the data pipeline
  c.init_from = config_dict.placeholder(str)  # None, a Hugging Face dir, or a famjax workdir/checkpoint
  c.z_loss = 0.0              # coefficient of log(Z)^2 added to the token loss (0: off)
  c.tensorboard = True        # write TensorBoard events to WORKDIR/tensorboard
  c.microbatches = 1          # gradient accumulation: the batch in this many pieces inside the step
  c.loss_chunk = 0            # tokens of logits at a time in the loss (0: all; e.g. 512 for a 256k vocab)
  c.loss_vocab_chunk = 0      # and vocabulary entries at a time (0: all; e.g. 32000 for a 256k vocab)
  # Evaluation during training (logged as eval_* in metrics.jsonl, TensorBoard and the progress line).
  c.eval_every = 0            # evaluate every N steps; 0: never
  c.eval_steps = 20           # batches of the validation split per evaluation; 0: PassKey only
  c.eval_mixture = ""         # a seqio task or mixture with a validation split; "": data.mixture
  c.eval_passkey_lengths = "" # PassKey exact match at these lengths, e.g. "1k,4k" (streaming); "": none
  c.eval_passkey_examples = 8 # PassKey examples per length (key depths evenly spread)
  c.eval_passkey_format = "paper"  # paper | short | random | repeated (famjax.data.passkey)
  c.profile_steps = ""        # "START,STOP": a JAX profiler trace of those steps in WORKDIR/tensorboard

  # -- the model (famjax.ModelConfig; spec ../shared/docs/fam.md §1-§5) -------------------------------
  m = c.model = config_dict.ConfigDict()
  m.vocab_size = 0            # token ids; 0: the data vocabulary's size
  m.d_model = 256             # width of the residual stream
  m.n_layers = 4
  m.n_heads = 4               # query heads
  m.n_kv_heads = 4            # key/value heads: = n_heads MHA, 1 MQA, else GQA
  m.head_dim = config_dict.placeholder(int)  # None: d_model // n_heads
  m.mlp_dim = 1024            # SwiGLU hidden width
  m.attention = "fam"         # "full" | "bswa" | "fam" (spec §2)
  m.block_size = 64           # tokens per block (bswa, fam)
  m.mem_segments = 1          # whole previous blocks each block attends to
  m.fam_len = 8               # FAM rows per layer (fam); must not exceed block_size
  m.rope_theta = 10_000.0
  m.rms_eps = 1e-6
  m.tie_embeddings = False    # logits through the transposed embedding
  m.embed_scale = False       # multiply embeddings by sqrt(d_model) (Gemma-style)
  m.dtype = "bfloat16"        # compute dtype; master weights stay in param_dtype
  m.param_dtype = "float32"
  m.remat = "full"            # activation checkpointing of the layer scan: none|full|dots|...
  #                             (offload_dots_no_batch, offload_qkv_proj: to host memory; GPU/TPU only)
  m.attention_chunk = 0       # query blocks whose attention scores exist at once (0: all; k: k at a
  #                             time, recomputed in the backward pass: same math, less memory)
  m.mlp_chunk = 0             # tokens whose MLP activations exist at once (0: all; k: k at a time)
  m.attention_impl = "xla"    # attention kernel: "xla" (the reference) | "cudnn" (GPU, bfloat16 only)
  m.init_std = config_dict.placeholder(float)  # None: d_model ** -0.5 (fan-in; 0.0255 at 1536)
  m.fam_gate = False          # famjax extension, not the paper's: a learned write gate on FAM updates
  # Ablations (docs/ablations.md; the defaults are the spec's model):
  m.window = 0                # attention="swa" only: each token sees the previous `window` tokens
  m.mem_stop_gradient = False # bswa/fam: no gradient through the memory blocks' keys/values
  m.fam_position = "last"     # RoPE positions of FAM rows: "last" (spec) | "between" | "zero"
  m.fam_init = "prompt"       # initial FAM: "prompt" (spec) | "prefix" (a learned state per layer)
  m.fam_history = 1           # FAM states the block tokens read: F_{tau-1} .. F_{tau-k}

  # -- the data (famjax.data.DataConfig; see famjax/data/config.py and docs/data.md) -----------------
  # seq_len and seed come from the top level. mixture="synthetic" uses famjax.training.synthetic
  # (no TensorFlow; for tests and benchmarks).
  d = c.data = config_dict.ConfigDict()
  d.mixture = "famjax_demo"   # a seqio mixture/task name (famjax.data.mixture_names()), or "synthetic"
  d.vocabulary = "byte"       # "byte" or the path of a SentencePiece .model
  d.pack = True               # pack several examples per sequence
  d.mask_between_examples = False  # the paper does not mask; with FAM each example restarts the FAM
  d.pack_align = 1            # packed examples start at multiples of this (fam + masks: block_size)
  d.repeat_segment_len = 0    # tokens of the "[repeat random segment]:" augmentation (paper: 256)
  d.repeat_segment_weight = 0.1
  d.repeat_segment_marker = "[repeat random segment]:"
  d.instruction_weight = 0.0  # loss weight of instructions and exemplars (paper: 0)
  d.sources = ()              # user data: ((task_name, path, rate), ...)
  d.inputs_key = "inputs"
  d.targets_key = "targets"
  d.few_shot = 0
  d.prompt_template = "{inputs}\n"
  d.exemplar_separator = "\n\n"
  d.too_long = "truncate"     # or "skip"
  d.shuffle_buffer = 1000
  d.tfds_data_dir = ""
  d.prefetch = 2              # batches prepared ahead in a background thread
  d.store = ""                # the data store's root, examples + plans ("": the default), or "stream" (docs/data.md)
  d.store_rows = 0            # 0: the plan's rows, each once; n: its first n rows, read in epochs

  # -- the optimizer (famjax.training.config.OptimizerConfig) ----------------------------------------
  o = c.optimizer = config_dict.ConfigDict()
  o.name = "adafactor"        # "adafactor" (the paper's) | "adamw"
  o.learning_rate = 1e-4      # peak learning rate
  o.schedule = "constant"     # "constant" | "cosine" (after warmup)
  o.warmup_steps = 0          # linear warmup from 0
  o.final_learning_rate_ratio = 0.1  # cosine: final / peak
  o.b1 = 0.9                  # Adafactor momentum (0: none) / Adam beta1
  o.b2 = 0.999                # AdamW beta2
  o.decay_rate = 0.99         # Adafactor second-moment decay (constant, bias-corrected)
  o.param_scale = False       # Adafactor: scale updates by parameter RMS (relative steps)
  o.update_clip = 1.0         # Adafactor: clip each update to this RMS (0: off)
  o.eps = 1e-8                # AdamW epsilon
  o.weight_decay = 0.0        # decoupled weight decay
  o.max_grad_norm = 1.0       # clip the global gradient norm (0: off)

  # -- LoRA (famjax.training.config.LoraConfig) -----------------------------------------------------
  lo = c.lora = config_dict.ConfigDict()
  lo.rank = 0                 # 0: full fine-tuning; > 0: train adapters + the FAM prompt, base frozen
  lo.alpha = 16.0             # the adapters' scale is alpha / rank
  lo.targets = "q,k,v,o,gate,up,down"  # adapted projections (comma-separated)

  # -- FAM training techniques (spec §6; famjax.training.config.FamTrainingConfig) ------------------
  f = c.fam = config_dict.ConfigDict()
  f.rsp_prob = 0.8            # Random State Passing probability (used only when attention == "fam")
  f.rsp_start_step = 0        # RSP only from this step on (0: from the start, as the paper fine-tunes)
  f.rpo = True                # Random Position Offset

  # -- the device mesh (famjax.parallel.MeshConfig; docs/launch.md) ---------------------------------
  # data * fsdp * tensor = the devices of one slice (one of them may be -1: the rest of the slice);
  # dcn_data * dcn_fsdp = the slices of a multislice job (1 on CPU, GPU and a single TPU slice).
  # The mesh may change when a run resumes (another slice, more hosts): checkpoints are resharded.
  me = c.mesh = config_dict.ConfigDict()
  me.data = -1                # data parallelism: parameters replicated, the batch split
  me.fsdp = 1                 # FSDP: the batch and the parameters/optimizer state split
  me.tensor = 1               # tensor parallelism: heads, MLP hidden and vocabulary split
  me.dcn_data = 1             # slices doing data parallelism over the data-center network
  me.dcn_fsdp = 1             # slices doing FSDP over the data-center network (slow; only if needed)
  return c
