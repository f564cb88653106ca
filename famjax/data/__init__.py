"""famjax.data: seqio Tasks and Mixtures, packing and per-host batches for the trainer.

The only famjax package that imports TensorFlow (tf.data, seqio, TFDS); the model and the training
step must not import it, so they run where only JAX is installed. It owns: the vocabularies (bytes or
SentencePiece), the built-in synthetic `famjax_demo` mixtures, PassKey, the long-context evaluation
tasks read from prepared TFDS data, user (Flan-style) data, packing with per-token loss weights, and
the iterator the trainer consumes (see docs/data.md). Nothing is ever downloaded.

    from famjax.data import DataConfig, get_batches, get_vocabulary
    it = get_batches(DataConfig(mixture="famjax_demo", seq_len=1024, repeat_segment_len=64), 8)
    batch = next(it)  # inputs, targets, weights, segment_ids: [8, 1024]
"""

from famjax.data import tensorflow_setup  # noqa: F401  (first: imports TensorFlow quietly)
from famjax.data import passkey, synthetic
from famjax.data.config import DataConfig
from famjax.data.longcontext import TfdsNotPreparedError
from famjax.data.metrics import accuracy, exact_match, next_token_accuracy, rouge_l
from famjax.data.pipeline import BatchIterator, get_batches, get_examples, mixture_names
from famjax.data.tasks import register_builtins, register_synthetic_mixture
from famjax.data.vocab import BYTE_VOCAB_SIZE, get_vocabulary

register_builtins()

__all__ = ["BYTE_VOCAB_SIZE", "BatchIterator", "DataConfig", "TfdsNotPreparedError", "accuracy",
           "exact_match", "get_batches", "get_examples", "get_vocabulary", "mixture_names",
           "next_token_accuracy", "passkey", "register_builtins", "register_synthetic_mixture",
           "rouge_l", "synthetic"]
