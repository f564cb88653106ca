"""Long-context evaluation tasks of the paper (spec §8) read from prepared TFDS data, never downloaded.

| task                  | TFDS dataset          | prompt -> answer            | metric              |
|-----------------------|-----------------------|-----------------------------|---------------------|
| scrolls_qasper        | scrolls/qasper        | input -> output             | ROUGE-L             |
| scrolls_quality       | scrolls/quality       | input -> output             | accuracy            |
| scrolls_narrative_qa  | scrolls/narrative_qa  | input -> output             | ROUGE-L             |
| xlsum                 | xlsum/english         | text -> summary             | ROUGE-L             |
| pg19                  | pg19                  | (none) -> book_text         | next-token accuracy |
| isabelle              | isabelle              | (none) -> text              | next-token accuracy |

Isabelle (the paper's Table 11, after Memorizing Transformers, Wu et al. 2022) is the corpus of
Isabelle/HOL proof theories (the Archive of Formal Proofs and the Isabelle standard library), one
theory file per example; it is scored like PG-19: the whole text streamed, next-token accuracy over all
of its tokens. Neither it nor XLSum is in the TFDS catalog: the user exports them as TFDS datasets
(`catalog=False`, the message then says how instead of naming a `tfds build` command).

The source checks that the dataset is prepared in the data directory before seqio touches it, and
otherwise raises at once (no download, no GCS: an offline machine would otherwise retry for minutes)
with the commands that prepare it. The data directory is DataConfig.tfds_data_dir, else
$TFDS_DATA_DIR, else ~/tensorflow_datasets.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence

import seqio

from famjax.data import metrics
from famjax.data.stats import current_stats, current_tfds_data_dir
from famjax.data.tensorflow_setup import tf, tfds


@dataclasses.dataclass(frozen=True)
class LongContextSpec:
  """One evaluation task: where its TFDS data is, how an example becomes (prompt, answer), its metric."""

  name: str
  tfds_name: str
  splits: tuple[str, ...]
  input_field: Optional[str]  # None: no prompt, the whole text is scored (language modelling)
  target_field: str
  metric: Callable
  prompt_prefix: str = ""
  prompt_suffix: str = "\nAnswer:"
  prepare: str = ""  # extra preparation advice shown when the data is missing
  catalog: bool = True  # in the TFDS catalog, so `tfds build` prepares it


_SCROLLS = ("The scrolls builder downloads the SCROLLS release (scrolls-tau.s3.amazonaws.com) while "
            "it builds.")
SPECS: dict[str, LongContextSpec] = {s.name: s for s in (
    LongContextSpec("scrolls_qasper", "scrolls/qasper:1.0.0", ("train", "validation"), "input", "output",
                    metrics.rouge_l, prepare=_SCROLLS),
    LongContextSpec("scrolls_quality", "scrolls/quality:1.0.0", ("train", "validation"), "input", "output",
                    metrics.accuracy, prepare=_SCROLLS),
    LongContextSpec("scrolls_narrative_qa", "scrolls/narrative_qa:1.0.0", ("train", "validation"), "input",
                    "output", metrics.rouge_l, prepare=_SCROLLS),
    LongContextSpec("xlsum", "xlsum/english:*.*.*", ("train", "validation", "test"), "text", "summary",
                    metrics.rouge_l, prompt_prefix="Summarize the article.\n",
                    prompt_suffix="\nSummary:",
                    prepare="XLSum is not in the TFDS catalog: export csebuetnlp/xlsum (english) as a "
                    "TFDS dataset named xlsum, config english, with text features 'text' and "
                    "'summary' (for example with tfds.dataset_builders.store_as_tfds_dataset or a "
                    "small GeneratorBasedBuilder), into the same data directory.", catalog=False),
    LongContextSpec("pg19", "pg19:0.1.1", ("train", "validation", "test"), None, "book_text",
                    metrics.next_token_accuracy, prompt_suffix="",
                    prepare="The pg19 builder reads gs://deepmind-gutenberg while it builds."),
    LongContextSpec("isabelle", "isabelle:*.*.*", ("train", "validation", "test"), None, "text",
                    metrics.next_token_accuracy, prompt_suffix="",
                    prepare="Isabelle is not in the TFDS catalog: export the corpus of Wu et al. 2022 "
                    "(Memorizing Transformers: the Isabelle/HOL theories of the Archive of Formal Proofs "
                    "and the standard library, one .thy file per example) as a TFDS dataset named "
                    "isabelle with one text feature 'text' and splits train / validation / test (for "
                    "example with tfds.dataset_builders.store_as_tfds_dataset), into the same data "
                    "directory.", catalog=False),
)}


def data_dir() -> str:
  """The TFDS data directory in effect: the pipeline's, else $TFDS_DATA_DIR, else TFDS's default."""
  return (current_tfds_data_dir() or os.environ.get("TFDS_DATA_DIR")
          or os.path.expanduser("~/tensorflow_datasets"))


class TfdsNotPreparedError(FileNotFoundError):
  """The TFDS dataset of an evaluation task is not on disk (famjax never downloads it)."""


class LocalTfdsSource(seqio.TfdsDataSource):
  """seqio's TFDS source, read-only, that checks the data is on disk before anything else runs."""

  def __init__(self, spec: LongContextSpec):
    super().__init__(tfds_name=spec.tfds_name, splits=spec.splits, read_only=True,
                     caching_permitted=False)
    self._spec = spec

  def preflight(self, split: str, shard_index: int = 0, num_shards: int = 1) -> None:
    """Points the loader at the data directory in effect; raises TfdsNotPreparedError if absent."""
    del split, shard_index, num_shards
    directory = data_dir()
    try:
      prepared = tfds.builder(self._spec.tfds_name, data_dir=directory, try_gcs=False).is_prepared()
    except tfds.core.registered.DatasetNotFoundError:  # not in the catalog and not on disk (xlsum)
      prepared = False
    if not prepared:
      raise TfdsNotPreparedError(prepare_message(self._spec, directory))
    self.tfds_dataset.override_data_dir(directory)

  def list_shards(self, split: str) -> Sequence[str]:
    self.preflight(split)
    return super().list_shards(split)

  def num_input_examples(self, split: str) -> Optional[int]:
    self.preflight(split)
    return super().num_input_examples(split)

  def get_dataset(self, split: Optional[str] = None, shuffle: bool = True, seed=None,
                  shard_info=None, **kwargs) -> tf.data.Dataset:
    self.preflight(split or "train")
    return super().get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                               **kwargs)


def prepare_message(spec: LongContextSpec, directory: str) -> str:
  unversioned = spec.tfds_name.split(":")[0]
  name, _, config = unversioned.partition("/")
  build = f"tfds build {name}" + (f" --config {config}" if config else "") + f" --data_dir {directory}"
  how = (f"Prepare it on a machine with network access:\n  {build}\n(or copy a prepared "
         f"{directory}/{unversioned}/<version> directory there)" if spec.catalog else
         f"Prepare it as below, or copy a prepared {directory}/{unversioned}/<version> directory there")
  return (
      f"{spec.name}: the TFDS dataset {spec.tfds_name!r} is not prepared in {directory}. famjax reads "
      f"TFDS data with download=False and never from GCS. {how}, then point DataConfig.tfds_data_dir "
      f"or $TFDS_DATA_DIR at that data directory." + (f"\n{spec.prepare}" if spec.prepare else ""))


def to_prompt_and_answer(dataset: tf.data.Dataset, spec: LongContextSpec, task: str
                         ) -> tf.data.Dataset:
  """A seqio preprocessor: the spec's fields become inputs/targets; empty answers are dropped and
  counted (Scrolls test splits, for one, have no answers)."""
  skipped = current_stats().tf_counter(task, "skipped_empty_field")

  def rekey(ex):
    if spec.input_field is None:
      inputs = tf.constant("")
    else:
      inputs = tf.strings.join([spec.prompt_prefix, ex[spec.input_field], spec.prompt_suffix])
    return {"inputs": inputs, "targets": ex[spec.target_field]}

  def keep(ex):
    ok = tf.strings.length(tf.strings.strip(ex["targets"])) > 0
    with tf.control_dependencies([skipped.assign_add(tf.cast(tf.logical_not(ok), tf.int64))]):
      return tf.identity(ok)

  return dataset.map(rekey, num_parallel_calls=tf.data.AUTOTUNE).filter(keep)
