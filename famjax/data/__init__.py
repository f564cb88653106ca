"""famjax.data: seqio Tasks and Mixtures, tokenized once, packed by a plan, read by index for the trainer.

The only famjax package that imports TensorFlow (tf.data, seqio, TFDS); the model and the training
step must not import it, so they run where only JAX is installed. It owns: the vocabularies (bytes or
SentencePiece), the built-in synthetic `famjax_demo` mixtures, PassKey, the long-context evaluation
tasks read from prepared TFDS data, the GPT-3 suite read from prepared JSON lines, user (Flan-style)
data, packing with per-token loss weights, and the iterators the trainer consumes (see docs/data.md):
the data store (each task's examples tokenized once into ArrayRecord files, by Apache Beam or in this
process, `python -m famjax.data.prepare`; a packing plan computed from their lengths; rows made when
Grain reads them) in a global order that any number of hosts shares and a restore seeks into, and the
per-host stream. Nothing is ever downloaded.

    from famjax.data import DataConfig, get_batches, get_global_batches, open_or_build
    cfg = DataConfig(mixture="famjax_demo", seq_len=1024, repeat_segment_len=64)
    rows = open_or_build(cfg, rows=100 * 8)  # tokenized and planned once: the rows 100 steps of 8 read
    it = get_global_batches(rows, 8)         # or get_batches(cfg, 8): the stream
    batch = next(it)  # inputs, targets, weights, segment_ids: [8, 1024]
"""

from famjax.data import tensorflow_setup  # noqa: F401  (first: imports TensorFlow quietly)
from famjax.data import passkey, synthetic
from famjax.data.config import DataConfig
from famjax.data.global_batches import GlobalBatchIterator, get_global_batches
from famjax.data.gpt3 import Gpt3DataNotFoundError
from famjax.data.longcontext import TfdsNotPreparedError
from famjax.data.metrics import (accuracy, exact_match, next_token_accuracy, rank_classification, rouge_l,
                                 squad)
from famjax.data.pipeline import BatchIterator, get_batches, get_examples, mixture_names
from famjax.data.store import (StoreChangedError, StoreCorruptError, StoreMismatchError,
                               StoreNotFoundError, StoreWriteError, TrainingRows, open_or_build)
from famjax.data.tasks import register_builtins, register_synthetic_mixture
from famjax.data.vocab import BYTE_VOCAB_SIZE, get_vocabulary

register_builtins()

__all__ = ["BYTE_VOCAB_SIZE", "BatchIterator", "DataConfig", "GlobalBatchIterator",
           "Gpt3DataNotFoundError", "StoreChangedError", "StoreCorruptError", "StoreMismatchError",
           "StoreNotFoundError", "StoreWriteError", "TfdsNotPreparedError", "TrainingRows", "accuracy",
           "exact_match", "get_batches", "get_examples", "get_global_batches", "get_vocabulary",
           "mixture_names", "next_token_accuracy", "open_or_build", "passkey", "rank_classification",
           "register_builtins", "register_synthetic_mixture", "rouge_l", "squad", "synthetic",
           "tensorflow_setup"]
