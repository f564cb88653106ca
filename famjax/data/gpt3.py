"""The GPT-3 evaluation suite (Brown et al. 2020) in the two forms the paper's Table 2 reports, read from
JSON-lines files the user prepares (nothing is downloaded).

Rank classification (mixture `gpt3_rank`): each example has several options; the prediction is the
option whose tokens have the highest log-likelihood after its context (famjax.evaluation.rank), scored
by `metrics.rank_classification` (accuracy, and accuracy with log-likelihoods per byte of the option).
One line of `<task>/<split>.jsonl` is one example, in one of two forms:

  {"context": "Question: ...\\nAnswer:", "options": [" Paris", " Rome"], "label": 0}
  {"contexts": ["The trophy did not fit: the trophy", "... the suitcase"], "continuation": " was too big.",
   "label": 0}

The first scores each option after the shared context; the second (Winograd, Winogrande: GPT-3's
"partial evaluation") scores the shared continuation after each option's context. Options and
continuations are appended to their context verbatim, so a separating space belongs at their start.

Generation (mixture `gpt3_gen`): greedy generation after the context, cut at the first newline (LAMBADA:
the first word), scored by `metrics.squad` (exact match and token F1, best over the references):

  {"context": "Q: Who wrote Hamlet?\\nA:", "answers": ["William Shakespeare", "Shakespeare"]}

"answers" may be empty (SQuAD v2's unanswerable questions: the reference is the empty answer).
Few-shot exemplars, if wanted, are part of the context.

The files are `<data dir>/gpt3/<task>/<split>.jsonl`, the data directory being the long-context tasks'
(DataConfig.tfds_data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets). A task whose file is
missing raises Gpt3DataNotFoundError at once with what to write there; a malformed line is an error
naming the file and line (an evaluation set is never silently shortened).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import numpy as np
import seqio

from famjax.data import longcontext, metrics
from famjax.data.tensorflow_setup import tf

RANK, GEN = "rank", "gen"
SPLITS = ("train", "validation", "test")
GROUPS = {"gpt3_rank": RANK, "gpt3_gen": GEN}


@dataclasses.dataclass(frozen=True)
class Gpt3Spec:
  name: str
  kind: str  # RANK or GEN
  source: str  # where the data comes from and how its fields map to ours (shown when it is missing)
  answer_span: str = "line"  # GEN: the prediction is the first "line" or the first "word"


_SG = "super_glue/{} (Hugging Face `super_glue`, config {}), validation split"
SPECS: dict[str, Gpt3Spec] = {s.name: s for s in (
    # rank classification
    Gpt3Spec("hellaswag", RANK, "Rowan/hellaswag, validation: context = ctx, options = ' ' + each "
             "ending, label = int(label)"),
    Gpt3Spec("storycloze", RANK, "story_cloze 2016 (manual download), test: context = the four "
             "sentences, options = ' ' + each ending, label = answer_right_ending - 1"),
    Gpt3Spec("winograd", RANK, "winograd_wsc wsc273, test: contexts = the text up to the pronoun with "
             "each option substituted, continuation = the rest of the text"),
    Gpt3Spec("winogrande", RANK, "winogrande winogrande_xl, validation: contexts = the sentence up to "
             "'_' with option1 / option2, continuation = the rest after '_', label = int(answer) - 1"),
    Gpt3Spec("race_m", RANK, "ehovy/race middle, test: context = article + '\\nQuestion: ' + question "
             "+ '\\nAnswer:', options = ' ' + each option, label = 'ABCD'.index(answer)"),
    Gpt3Spec("race_h", RANK, "ehovy/race high, test: as race_m"),
    Gpt3Spec("piqa", RANK, "ybisk/piqa, validation: context = 'Question: ' + goal + '\\nAnswer:', "
             "options = [' ' + sol1, ' ' + sol2], label"),
    Gpt3Spec("arc_easy", RANK, "allenai/ai2_arc ARC-Easy, test: context = 'Question: ' + question + "
             "'\\nAnswer:', options = ' ' + each choices.text, label = choices.label.index(answerKey)"),
    Gpt3Spec("arc_challenge", RANK, "allenai/ai2_arc ARC-Challenge, test: as arc_easy"),
    Gpt3Spec("openbookqa", RANK, "allenai/openbookqa main, test: context = question_stem, options = "
             "' ' + each choices.text, label = choices.label.index(answerKey)"),
    Gpt3Spec("boolq", RANK, _SG.format("boolq", "boolq") + ": context = passage + '\\nquestion: ' + "
             "question + '?\\nanswer:', options = [' no', ' yes'], label"),
    Gpt3Spec("copa", RANK, _SG.format("copa", "copa") + ": context = premise without its final '.' + "
             "(' because' or ' therefore'), options = ' ' + choice1 / choice2 lowercased first, label"),
    Gpt3Spec("rte", RANK, _SG.format("rte", "rte") + ": context = premise + '\\nquestion: ' + "
             "hypothesis + ' True or False?\\nanswer:', options = [' True', ' False'], label"),
    Gpt3Spec("wic", RANK, _SG.format("wic", "wic") + ": context = sentence1 + '\\n' + sentence2 + "
             "\"\\nquestion: Is the word '\" + word + \"' used in the same way in the two sentences "
             "above?\\nanswer:\", options = [' no', ' yes'], label"),
    Gpt3Spec("wsc", RANK, _SG.format("wsc", "wsc.fixed") + ": context = text + '\\nquestion: In the "
             "passage above, does the pronoun \"' + span2_text + '\" refer to \"' + span1_text + "
             "'\"?\\nanswer:', options = [' no', ' yes'], label"),
    Gpt3Spec("cb", RANK, _SG.format("cb", "cb") + ": context = premise + '\\nquestion: ' + hypothesis "
             "+ ' true, false, or neither?\\nanswer:', options = [' true', ' false', ' neither'], label"),
    Gpt3Spec("anli_r1", RANK, "facebook/anli, test_r1: context = premise + '\\nquestion: ' + "
             "hypothesis + ' True, False, or Neither?\\nanswer:', options = [' True', ' Neither', "
             "' False'], label"),
    Gpt3Spec("anli_r2", RANK, "facebook/anli, test_r2: as anli_r1"),
    Gpt3Spec("anli_r3", RANK, "facebook/anli, test_r3: as anli_r1"),
    # generation
    Gpt3Spec("triviaqa", GEN, "mandarjoshi/trivia_qa rc.nocontext, validation: context = 'Q: ' + "
             "question + '\\nA:', answers = answer.aliases"),
    Gpt3Spec("natural_questions", GEN, "google-research-datasets/nq_open, validation: context = "
             "'Q: ' + question + '?\\nA:', answers = answer"),
    Gpt3Spec("web_questions", GEN, "stanfordnlp/web_questions, test: context = 'Q: ' + question + "
             "'\\nA:', answers = answers"),
    Gpt3Spec("squad_v2", GEN, "rajpurkar/squad_v2, validation: context = title + '\\n\\n' + context + "
             "'\\n\\nQ: ' + question + '\\n\\nA:', answers = answers.text ([] when unanswerable)"),
    Gpt3Spec("lambada", GEN, "EleutherAI/lambada_openai en, test: context = text up to its last "
             "space, answers = [the last word]", answer_span="word"),
)}


def group_tasks(group: str) -> tuple[str, ...]:
  return tuple(name for name, spec in SPECS.items() if spec.kind == GROUPS[group])


class Gpt3DataNotFoundError(FileNotFoundError):
  """The JSON-lines file of a GPT-3 task is not on disk (famjax never downloads it)."""


def data_path(task: str, split: str, directory: Optional[str] = None) -> str:
  return os.path.join(directory or longcontext.data_dir(), "gpt3", task, f"{split}.jsonl")


def prepare_message(spec: Gpt3Spec, path: str) -> str:
  if spec.kind == RANK:
    line = ('{"context": str, "options": [str, ...], "label": int} (or {"contexts": [str, ...], '
            '"continuation": str, "label": int})')
  else:
    line = '{"context": str, "answers": [str, ...]}'
  return (f"{spec.name}: no data at {path}. famjax never downloads evaluation data. On a machine with "
          f"network access, write the split as JSON lines, one example per line: {line}. Source: "
          f"{spec.source}. Then put the file there (the data directory is DataConfig.tfds_data_dir, "
          f"--tfds_data_dir, $TFDS_DATA_DIR or ~/tensorflow_datasets; see docs/evaluation.md, GPT-3 "
          f"tasks).")


# -- reading -----------------------------------------------------------------------------------------

def parse_rank(record: dict) -> tuple[list[str], list[str], int]:
  """(contexts, continuations, label) of a rank example: one (context, continuation) pair per option."""
  label = record.get("label")
  if "options" in record:
    continuations = record["options"]
    contexts = [record.get("context")] * len(continuations) if isinstance(continuations, list) else None
  else:
    contexts = record.get("contexts")
    contexts_ok = isinstance(contexts, list)
    continuations = [record.get("continuation")] * len(contexts) if contexts_ok else None
  if not isinstance(contexts, list) or len(contexts) < 2:
    raise ValueError('needs "context" and "options", or "contexts" and "continuation", with >= 2 options')
  if not all(isinstance(t, str) for t in contexts + continuations):
    raise ValueError("contexts, options and continuations must be strings")
  if not all(continuations):
    raise ValueError("an option (or the continuation) is empty")
  if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(contexts):
    raise ValueError(f'"label" must be an int in [0, {len(contexts)}), got {label!r}')
  return contexts, continuations, label


def parse_gen(record: dict) -> tuple[str, list[str]]:
  """(context, answers) of a generation example."""
  context, answers = record.get("context"), record.get("answers")
  if not isinstance(context, str) or not isinstance(answers, list) or not all(
      isinstance(a, str) for a in answers):
    raise ValueError('needs "context" (a string) and "answers" (a list of strings)')
  return context, answers


def read_examples(spec: Gpt3Spec, path: str) -> list[dict[str, Any]]:
  """The examples of a JSON-lines file as seqio features (text). inputs/targets are the context and its
  correct completion (so the task also trains like any other), plus for RANK option_contexts,
  option_continuations and label, for GEN answers."""
  examples = []
  with tf.io.gfile.GFile(path, "rb") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line.decode("utf-8"))
        if not isinstance(record, dict):
          raise ValueError("not a JSON object")
        if spec.kind == RANK:
          contexts, continuations, label = parse_rank(record)
          examples.append({"inputs": contexts[label], "targets": continuations[label],
                           "option_contexts": contexts, "option_continuations": continuations,
                           "label": label})
        else:
          context, answers = parse_gen(record)
          examples.append({"inputs": context, "targets": answers[0] if answers else "",
                           "answers": answers})
      except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{spec.name}: {path}:{number}: {e}") from None
  if not examples:
    raise ValueError(f"{spec.name}: {path} has no example")
  return examples


def _signature(kind: str) -> dict[str, tf.TensorSpec]:
  text, texts = tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.string)
  if kind == RANK:
    return {"inputs": text, "targets": text, "option_contexts": texts, "option_continuations": texts,
            "label": tf.TensorSpec([], tf.int32)}
  return {"inputs": text, "targets": text, "answers": texts}


class Gpt3Source(seqio.DataSource):
  """One GPT-3 task's JSON-lines files, read whole (evaluation sets are small) when the dataset is
  built, so a missing file or a bad line fails there; host i of n gets examples i, i + n, ..."""

  def __init__(self, spec: Gpt3Spec):
    super().__init__(splits=SPLITS, num_input_examples=None, caching_permitted=False)
    self.spec = spec

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [data_path(self.spec.name, split)]

  def preflight(self, split: str, shard_index: int = 0, num_shards: int = 1) -> None:
    del shard_index, num_shards
    path = data_path(self.spec.name, split)
    if not tf.io.gfile.exists(path):
      raise Gpt3DataNotFoundError(prepare_message(self.spec, path))

  def get_dataset(self, split: str = "validation", shuffle: bool = True, seed=None, shard_info=None,
                  **kwargs) -> tf.data.Dataset:
    del shuffle, seed, kwargs  # evaluation sets are read in file order
    self.preflight(split)
    examples = read_examples(self.spec, data_path(self.spec.name, split))
    index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
    mine = examples[index::count]
    return tf.data.Dataset.from_generator(lambda: iter(mine), output_signature=_signature(self.spec.kind))


# -- seqio postprocessors -------------------------------------------------------------------------------

def _texts(values) -> list[str]:
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)]


def postprocess_rank(output, example=None, is_target: bool = False):
  """Targets become (label, the options' lengths in UTF-8 bytes), what metrics.rank_classification
  takes; predictions (log-likelihoods) pass through."""
  if not is_target:
    return output
  lengths = [len(c.encode("utf-8")) for c in _texts(example["option_continuations"])]
  return int(example["label"]), lengths


def answer_span(text: str, span: str) -> str:
  """The answer in a generated text: up to its first newline ("line") or its first word ("word")."""
  stripped = text.strip()
  if span == "word":
    return stripped.split()[0] if stripped.split() else ""
  return stripped.split("\n")[0].strip()


def postprocess_gen(output: str, example=None, is_target: bool = False, span: str = "line"):
  """Targets become the example's list of answers; a generated text is cut to its answer_span."""
  if is_target:
    return _texts(example["answers"])
  return answer_span(output, span)


def metric_fns(spec: Gpt3Spec) -> list:
  return [metrics.rank_classification] if spec.kind == RANK else [metrics.squad]
