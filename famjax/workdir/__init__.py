"""famjax.workdir: a run's directory, read and written by every command (train, eval, generate, export,
init_from).

  layout      WORKDIR's files (config.json, checkpoints/<step>, metrics.jsonl, tensorboard/), the steps
              there, and refusing to mix two runs in one workdir
  checkpoint  Checkpointer: Orbax save / restore of the sharded TrainState, skipping damaged steps;
              load_raw: one checkpoint as saved
  model       restore_params / load_model: one checkpoint's parameters, LoRA merged, as a Transformer

Imports famjax.model and Orbax, nothing from famjax.training, famjax.data or famjax.evaluation, so all of
them can use it.
"""

from famjax.workdir.layout import WorkdirError

__all__ = ["WorkdirError"]
