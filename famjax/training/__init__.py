"""famjax.training: the training job's pieces, each a module with one idea.

  config      validated configs (TrainConfig, OptimizerConfig, LoraConfig, FamTrainingConfig, JobConfig)
  loss        weighted cross-entropy (+ z-loss)         optimizer  Adafactor / AdamW, schedules, clipping
  lora        adapters: init, merge, trainable split   state      TrainState (what a checkpoint holds)
  step        the pure train step (RSP, RPO)           flops      model FLOPs, peak table, MFU
  metrics     console, metrics.jsonl                   tensorboard  event files without TensorFlow
  trainer     a job's programs on its mesh: shardings, initial state, jitted step
  loop        run(): restore or start, train, log, checkpoint, stop on SIGTERM or NaN
  init_from   start from HF or famjax weights          export / evaluate  merged weights, held-out loss
  synthetic   a data stream for tests and benchmarks    memory     per-device memory estimate of a step

Checkpoints and the workdir's layout are famjax.workdir's (shared with evaluation). Must not import
TensorFlow, famjax.data or famjax.evaluation: famjax/train.py and famjax/train_data.py wire the data
pipeline in, so the training step runs where only JAX is installed.
"""
