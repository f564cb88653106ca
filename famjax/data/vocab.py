"""Vocabularies: the byte-level one that needs no download, or a SentencePiece model from a path.

seqio.ByteVocabulary has 259 ids: 0 pad, 1 eos, 2 unk, then byte b as b + 3 (no extra ids). That is the
vocab_size the trainer must use for ModelConfig with the embedded default. A SentencePiece model (the
paper's 256k one, or any other) is read once per path and shared.
"""

from __future__ import annotations

import functools
import hashlib
import os

import seqio

from famjax.data.config import BYTE_VOCABULARY, DataConfig
from famjax.data.tensorflow_setup import tf

BYTE_VOCAB_SIZE = 259


def get_vocabulary(config: DataConfig | str) -> seqio.Vocabulary:
  """The seqio.Vocabulary of a DataConfig (or of a `vocabulary` value); `.vocab_size` sizes the model."""
  spec = config.vocabulary if isinstance(config, DataConfig) else config
  return _vocabulary(_canonical(spec))


def vocab_key(spec: str) -> str:
  """A short name for the vocabulary, appended to task names registered for a non-byte vocabulary."""
  spec = _canonical(spec)
  if spec == BYTE_VOCABULARY:
    return ""
  return "spm_" + hashlib.sha1(spec.encode("utf-8")).hexdigest()[:10]


def _canonical(spec: str) -> str:
  if spec == BYTE_VOCABULARY or "://" in spec:
    return spec
  return os.path.abspath(os.path.expanduser(spec))


@functools.lru_cache(maxsize=None)
def _vocabulary(spec: str) -> seqio.Vocabulary:
  if spec == BYTE_VOCABULARY:
    return seqio.ByteVocabulary()
  if not tf.io.gfile.exists(spec):
    raise FileNotFoundError(
        f"DataConfig.vocabulary: no SentencePiece model at {spec!r}; give the path of a .model file "
        f"or {BYTE_VOCABULARY!r}")
  return seqio.SentencePieceVocabulary(spec)
