"""famjax's evaluation job: PassKey, the recall suite, long-context and GPT-3 tasks for several
checkpoints in one call.

  python -m famjax.eval --model=fam=workdirs/fam --model=bswa=workdirs/bswa \
      --passkey_lengths=2k,4k,...,1m --tasks=scrolls_qasper,pg19 --out_dir=eval/fam_vs_bswa
  python -m famjax.eval --model=fam=workdirs/fam --tasks=gpt3_rank,gpt3_gen --max_new_tokens=32 \
      --tfds_data_dir=/data/eval --out_dir=eval/fam_gpt3
  python -m famjax.eval --model=fam=workdirs/fam --recall_tasks=multikey,mqar --recall_lengths=512,2k,8k \
      --out_dir=eval/fam_recall

--model is NAME=PATH (repeat it): a famjax workdir (its newest checkpoint, the run's vocabulary) or a
Hugging Face directory (famjax.from_hf with --attention --block_size --mem_segments --fam_len, the
vocabulary from --vocabulary or its tokenizer.model). Every text is read on the streaming path, so a
1M-token PassKey costs the memory of one chunk in bswa/fam. Writes OUT_DIR/results.json, results.md
and passkey.png (see docs/evaluation.md). User errors (a missing workdir or checkpoint, a dataset that
is not prepared, a bad length) are one line on stderr and exit status 2, before any model is read.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging

from famjax.evaluation import load
from famjax.evaluation.lengths import parse_lengths

_MODEL = flags.DEFINE_multi_string("model", [], "NAME=PATH of a famjax workdir or a Hugging Face "
                                   "directory; repeat for several models")
_LENGTHS = flags.DEFINE_string("passkey_lengths", "", "PassKey lengths in tokens (prompt + answer + "
                               "EOS), e.g. 2k,4k,...,1m (k = 1024, m = 1048576; '...' continues the "
                               "series)")
_EXAMPLES = flags.DEFINE_integer("passkey_examples", 10, "PassKey examples per length (key depths "
                                 "evenly from 0 to 1)")
_SEED = flags.DEFINE_integer("passkey_seed", 0, "seed of the PassKey examples (the data seed of the "
                             "passkey_* tasks)")
_FORMAT = flags.DEFINE_enum("passkey_format", "paper", ["paper", "short", "random", "repeated"],
                            "PassKey text: the paper's, the short one, or the token-level ones of the "
                            "small-scale experiment (random or repeated filler; famjax.data.passkey)")
_RECALL = flags.DEFINE_list("recall_tasks", [], "the recall suite (famjax.data.recall): multikey "
                            "(one of several named keys asked for) and/or mqar (several pairs, filler, "
                            "several questions); at --recall_lengths")
_RECALL_LENGTHS = flags.DEFINE_string("recall_lengths", "", "recall lengths in tokens (prompt + answer + "
                                      "EOS), e.g. 512,2k,8k (the syntax of --passkey_lengths)")
_RECALL_EXAMPLES = flags.DEFINE_integer("recall_examples", 10, "recall examples per task and length")
_RECALL_SEED = flags.DEFINE_integer("recall_seed", 0, "seed of the recall examples (the data seed of "
                                    "the multikey_* and mqar_* tasks)")
_TASKS = flags.DEFINE_list("tasks", [], "seqio tasks to evaluate: scrolls_qasper, scrolls_quality, "
                           "scrolls_narrative_qa, xlsum, pg19, isabelle; the GPT-3 suite's groups "
                           "gpt3_rank and gpt3_gen or any of their tasks (hellaswag, triviaqa, ...); "
                           "or any famjax task or mixture")
_SPLIT = flags.DEFINE_string("split", "validation", "the tasks' split")
_TASK_EXAMPLES = flags.DEFINE_integer("task_examples", 0, "examples per task, the first ones (0: all)")
_TEXT_TOKENS = flags.DEFINE_integer("text_tokens", 0, "pg19, isabelle: score the first N tokens of each "
                                   "text (0: all of it)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "longest generated answer of a task (greedy, "
                                "stops at EOS)")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", "", "prepared TFDS data, and the GPT-3 tasks' JSON "
                                "lines under its gpt3/ (default $TFDS_DATA_DIR, else "
                                "~/tensorflow_datasets); nothing is downloaded")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "tokens per streaming call (0: four blocks)")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "where results.json, results.md, passkey.png go")
_VOCAB = flags.DEFINE_string("vocabulary", "", "'byte' or a SentencePiece .model: for Hugging Face "
                             "directories (a workdir uses its run's)")
_BOS = flags.DEFINE_integer("bos_id", 0, "id put before every text (0: famjax's training batches; "
                            "1 for an untuned Llama checkpoint; -1: none)")
_ATTENTION = flags.DEFINE_enum("attention", None, ["full", "bswa", "fam", "swa"],
                               "Hugging Face directories: the attention to load them with (a "
                               "workdir is evaluated as it trained)")
_BLOCK = flags.DEFINE_integer("block_size", None, "Hugging Face directories: block size")
_MEM = flags.DEFINE_integer("mem_segments", None, "Hugging Face directories: memory segments")
_FAM_LEN = flags.DEFINE_integer("fam_len", None, "Hugging Face directories: FAM rows per layer")
_WINDOW = flags.DEFINE_integer("window", None, "Hugging Face directories with --attention=swa: each token "
                               "sees the previous `window` tokens")


def _fail(message: str) -> None:
  print(f"famjax.eval: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(2)


def overrides() -> dict:
  """The ModelConfig overrides given on the command line (for Hugging Face directories)."""
  return {"attention": _ATTENTION.value, "block_size": _BLOCK.value, "mem_segments": _MEM.value,
          "fam_len": _FAM_LEN.value, "window": _WINDOW.value}


def _sources() -> list:
  sources = []
  for value in _MODEL.value:
    name, path = load.parse_model_flag(value)
    sources.append(load.describe(path, name, _VOCAB.value, overrides()))
  return sources


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log routine file checks as warnings
    logging.set_verbosity(logging.ERROR)
  if not _OUT_DIR.value:
    _fail("--out_dir is required")
  try:
    lengths = tuple(parse_lengths(_LENGTHS.value)) if _LENGTHS.value.strip() else ()
    recall_lengths = (tuple(parse_lengths(_RECALL_LENGTHS.value)) if _RECALL_LENGTHS.value.strip()
                      else ())
    sources = _sources()
    out_dir = Path(_OUT_DIR.value).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Imported after the cheap checks: famjax.data brings TensorFlow (seconds to import).
    from famjax.evaluation import runner  # pylint: disable=import-outside-toplevel
    settings = runner.Settings(
        passkey_lengths=lengths, passkey_examples=_EXAMPLES.value, passkey_seed=_SEED.value,
        passkey_format=_FORMAT.value,
        tasks=tuple(_TASKS.value), split=_SPLIT.value, task_examples=_TASK_EXAMPLES.value,
        max_new_tokens=_MAX_NEW.value, tfds_data_dir=_TFDS_DIR.value, chunk_size=_CHUNK.value,
        bos_id=None if _BOS.value < 0 else _BOS.value, text_tokens=_TEXT_TOKENS.value,
        recall_tasks=tuple(_RECALL.value), recall_lengths=recall_lengths,
        recall_examples=_RECALL_EXAMPLES.value, recall_seed=_RECALL_SEED.value)
    plan = runner.prepare(sources, settings)
  except (OSError, ValueError) as e:  # LoadError, TfdsNotPreparedError, Gpt3DataNotFoundError, ...
    _fail(str(e))
  try:
    runner.run(plan, out_dir)
  except load.LoadError as e:
    _fail(str(e))
  print(f"\nwrote {out_dir / 'results.json'}, {out_dir / 'results.md'}"
        + (f", {out_dir / 'passkey.png'}" if lengths else ""))
  print((out_dir / "results.md").read_text())


def run() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)


if __name__ == "__main__":
  run()
