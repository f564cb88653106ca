"""Registers famjax's seqio Tasks and Mixtures, idempotently.

Built in (byte vocabulary, registered on import):
- famjax_demo, famjax_demo_short, famjax_demo_long: Mixtures of five synthetic tasks each
  (`<mixture>_<task>`, see famjax.data.synthetic), equal rates, at three context lengths.
- passkey_train (filler 2k-18k tokens; famjax.data.passkey.TRAIN_TASKS), passkey_random_small and
  passkey_repeated_small (64-512 tokens, random or repeated filler; famjax.data.passkey.TRAIN_TOTAL_TASKS),
  and passkey_2k ... passkey_1m (evaluation, fixed length).
- multikey_small, mqar_small (recall training, 128-512 tokens) in the Mixture recall_small, and
  multikey_512 ... multikey_64k, mqar_512 ... mqar_64k (evaluation, fixed length; famjax.data.recall).
- scrolls_qasper, scrolls_quality, scrolls_narrative_qa, xlsum, pg19, isabelle (famjax.data.longcontext).
- the GPT-3 suite (famjax.data.gpt3): rank classification tasks (hellaswag, piqa, arc_easy, ...) in the
  Mixture gpt3_rank, generation tasks (triviaqa, natural_questions, ...) in the Mixture gpt3_gen.
User sources (DataConfig.sources) become Tasks `<mixture>_<task_name>` and a Mixture `<mixture>`.

A vocabulary other than bytes gets its own copies of the built-ins, named `<name>.<vocab key>`
(famjax.data.vocab.vocab_key), because a seqio Task fixes its vocabulary. Registering is idempotent:
the same definition again is a no-op, a changed one (other paths, templates, rates) replaces the
earlier registration (famjax's own only; a name some other code registered is an error).

Every task emits `inputs` (prompt ids, no EOS), `targets` (answer ids + EOS) and `task` (its name, so
the packer can count truncations per source); the GPT-3 tasks add the features their scoring reads
(options and label, or the reference answers).

`tokenization_identity(task, seed)` says what a task's tokenized training examples depend on (its
source, text format, vocabulary contents, seed where examples are generated): the fingerprint of its
example store (famjax.data.tokenize). Rates, packing and loss weights are not in it.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Hashable, Sequence

import seqio

from famjax.data import flan, gpt3, longcontext, metrics, passkey, recall, synthetic
from famjax.data.config import BYTE_VOCABULARY, DataConfig
from famjax.data.sources import PythonSource
from famjax.data.tensorflow_setup import tf
from famjax.data.vocab import get_vocabulary, vocab_key

_LOCK = threading.RLock()
_OURS: dict[tuple[str, str], tuple[Hashable, Any]] = {}  # (kind, name) -> (definition, provider)
_BUILTINS_FOR: set[str] = set()  # vocabularies whose built-ins are registered
# task name -> what its examples are (source, format; not rates or shuffling): famjax.data.tokenize's key
_EXAMPLES_OF: dict[str, Hashable] = {}


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {"inputs": seqio.Feature(vocabulary, add_eos=False, required=False),
          "targets": seqio.Feature(vocabulary, add_eos=True)}


def add_task_name(dataset: tf.data.Dataset, task: str) -> tf.data.Dataset:
  """A seqio preprocessor: the `task` feature names the example's source."""
  return dataset.map(lambda ex: {**ex, "task": tf.constant(task)},
                     num_parallel_calls=tf.data.AUTOTUNE)


def text_preprocessors(task: str) -> list:
  return [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos,
          functools.partial(add_task_name, task=task)]


# -- idempotent registration ---------------------------------------------------------------------

def _register(kind: str, name: str, definition: Hashable, build) -> None:
  registry = seqio.TaskRegistry if kind == "task" else seqio.MixtureRegistry
  with _LOCK:
    existing = registry._REGISTRY.get(name)  # pylint: disable=protected-access
    ours = _OURS.get((kind, name))
    if existing is not None:
      if ours is None or ours[1] is not existing:
        raise ValueError(f"seqio {kind} {name!r} is already registered by other code")
      if ours[0] == definition:
        return
      registry.remove(name)
    _OURS[(kind, name)] = (definition, build())


def _add_task(name: str, definition: Hashable, **task_kwargs) -> None:
  _register("task", name, definition, lambda: seqio.TaskRegistry.add(name, **task_kwargs))


def _add_mixture(name: str, tasks: Sequence[tuple[str, float]]) -> None:
  definition = tuple((t, rate, _OURS[("task", t)][0]) for t, rate in tasks)
  _register("mixture", name, definition, lambda: seqio.MixtureRegistry.add(name, list(tasks)))


def _python_task(name, vocab_spec, definition, make_examples, splits, *, shuffled=True,
                 num_examples=None, preflight=None, shuffle_buffer=None, metric_fns=(),
                 postprocess_fn=None, endless=(), examples=None, unit_names=None, unit_examples=None,
                 range_examples=None):
  """examples: what the examples are (default: `definition`), for tokenization_identity."""
  source = PythonSource(make_examples, splits, num_input_examples=num_examples, shuffled=shuffled,
                        preflight=preflight, endless=endless, unit_names=unit_names,
                        unit_examples=unit_examples, range_examples=range_examples)
  _add_task(name, (vocab_spec,) + definition, source=source,
            output_features=output_features(get_vocabulary(vocab_spec)),
            preprocessors=text_preprocessors(name), postprocess_fn=postprocess_fn,
            metric_fns=list(metric_fns), shuffle_buffer_size=shuffle_buffer)
  _EXAMPLES_OF[name] = (vocab_spec,) + (definition if examples is None else examples)


# -- built-ins -------------------------------------------------------------------------------------

def _suffix(vocab_spec: str) -> str:
  key = vocab_key(vocab_spec)
  return f".{key}" if key else ""


def register_synthetic_mixture(name: str, context: synthetic.ContextRange,
                               vocabulary: str = BYTE_VOCABULARY) -> str:
  """Registers `name` as the five synthetic tasks at `context` characters; returns the mixture name.

  The demo mixtures are made this way; call it for another difficulty (e.g. a longer range)."""
  suffix = _suffix(vocabulary)
  tasks = []
  for task in synthetic.TASKS:
    task_name = f"{name}_{task}{suffix}"
    _python_task(task_name, vocabulary, ("synthetic", task, context),
                 synthetic.make_examples(task, context), ("train", "validation"),
                 num_examples={"validation": synthetic.VALIDATION_EXAMPLES},
                 metric_fns=[metrics.exact_match], endless=("train",),
                 range_examples=synthetic.make_range(task, context))
    tasks.append((task_name, 1.0))
  _add_mixture(name + suffix, tasks)
  return name + suffix


def register_builtins(vocabulary: str = BYTE_VOCABULARY) -> None:
  """All built-in tasks and mixtures for a vocabulary (cheap: nothing is read until used)."""
  suffix = _suffix(vocabulary)
  with _LOCK:
    if vocabulary in _BUILTINS_FOR and all(
        _is_ours("mixture", m + suffix) for m in synthetic.DEMO_MIXTURES) and all(
        _is_ours("task", t + suffix) for t in (*passkey.EVAL_LENGTHS, *recall.EVAL_TASKS, *longcontext.SPECS,
                                               *gpt3.SPECS)
    ) and all(_is_ours("mixture", g + suffix) for g in (*gpt3.GROUPS, recall.TRAIN_MIXTURE)):
      return
    _register_builtins(vocabulary, suffix)
    _BUILTINS_FOR.add(vocabulary)


def _is_ours(kind: str, name: str) -> bool:
  registry = seqio.TaskRegistry if kind == "task" else seqio.MixtureRegistry
  ours = _OURS.get((kind, name))
  return ours is not None and registry._REGISTRY.get(name) is ours[1]  # pylint: disable=protected-access


def _register_builtins(vocabulary: str, suffix: str) -> None:
  vocab = get_vocabulary(vocabulary)
  for name, context in synthetic.DEMO_MIXTURES.items():
    register_synthetic_mixture(name, context, vocabulary)
  for name, (filler_tokens, fmt) in passkey.TRAIN_TASKS.items():
    examples = passkey.make_train_examples(filler_tokens, vocab, fmt)
    _python_task(name + suffix, vocabulary, ("passkey_train", filler_tokens, fmt.name), examples,
                 ("train",), metric_fns=[metrics.exact_match], postprocess_fn=passkey.postprocess,
                 endless=("train",), range_examples=examples.range)
  for name, (totals, fmt) in passkey.TRAIN_TOTAL_TASKS.items():
    examples = passkey.make_train_total_examples(totals, vocab, fmt)
    _python_task(name + suffix, vocabulary, ("passkey_train_total", totals, fmt.name), examples,
                 ("train",), metric_fns=[metrics.exact_match], postprocess_fn=passkey.postprocess,
                 endless=("train",), range_examples=examples.range)
  for name, total in passkey.EVAL_LENGTHS.items():
    _python_task(name + suffix, vocabulary, ("passkey_eval", total, passkey.EVAL_EXAMPLES),
                 passkey.make_eval_examples(total, vocab), ("validation",),
                 num_examples={"validation": passkey.EVAL_EXAMPLES},
                 metric_fns=[metrics.exact_match], postprocess_fn=passkey.postprocess)
  _register_recall(vocabulary, suffix)
  for spec in longcontext.SPECS.values():
    task = spec.name + suffix
    _add_task(task, (vocabulary, "longcontext", spec), source=longcontext.LocalTfdsSource(spec),
              output_features=output_features(vocab),
              preprocessors=[functools.partial(longcontext.to_prompt_and_answer, spec=spec, task=task),
                             *text_preprocessors(task)],
              metric_fns=[spec.metric], shuffle_buffer_size=1000)
  for spec in gpt3.SPECS.values():
    task = spec.name + suffix
    postprocess = (gpt3.postprocess_rank if spec.kind == gpt3.RANK
                   else functools.partial(gpt3.postprocess_gen, span=spec.answer_span))
    _add_task(task, (vocabulary, "gpt3", spec), source=gpt3.Gpt3Source(spec),
              output_features=output_features(vocab), preprocessors=text_preprocessors(task),
              postprocess_fn=postprocess, metric_fns=gpt3.metric_fns(spec), shuffle_buffer_size=1000)
  for group in gpt3.GROUPS:
    _add_mixture(group + suffix, [(name + suffix, 1.0) for name in gpt3.group_tasks(group)])


def _register_recall(vocabulary: str, suffix: str) -> None:
  """famjax.data.recall's tasks: byte-exact formats, registered for every vocabulary all the same."""
  for name, (totals, fmt) in recall.TRAIN_TASKS.items():
    examples = recall.make_train_examples(totals, fmt)
    _python_task(name + suffix, vocabulary, ("recall_train", totals, fmt), examples, ("train",),
                 metric_fns=[metrics.exact_match], postprocess_fn=recall.postprocess,
                 endless=("train",), range_examples=examples.range)
  _add_mixture(recall.TRAIN_MIXTURE + suffix, [(name + suffix, 1.0) for name in recall.TRAIN_TASKS])
  for name, (total, fmt) in recall.EVAL_TASKS.items():
    _python_task(name + suffix, vocabulary, ("recall_eval", total, fmt, recall.EVAL_EXAMPLES),
                 recall.make_eval_examples(total, fmt), ("validation",),
                 num_examples={"validation": recall.EVAL_EXAMPLES},
                 metric_fns=[metrics.exact_match], postprocess_fn=recall.postprocess)


def builtin_names() -> tuple[str, ...]:
  """Names a DataConfig.mixture may take without `sources` (for the byte vocabulary)."""
  names = list(synthetic.DEMO_MIXTURES)
  names += [f"{m}_{t}" for m in synthetic.DEMO_MIXTURES for t in synthetic.TASKS]
  names += [*passkey.TRAIN_TASKS, *passkey.TRAIN_TOTAL_TASKS, *passkey.EVAL_LENGTHS,
            *recall.TRAIN_TASKS, recall.TRAIN_MIXTURE, *recall.EVAL_TASKS,
            *longcontext.SPECS, *gpt3.SPECS, *gpt3.GROUPS]
  return tuple(sorted(names))


def mixture_names() -> tuple[str, ...]:
  """The built-in mixtures and tasks, by name (any of them can be DataConfig.mixture)."""
  return builtin_names()


# -- what a config reads ---------------------------------------------------------------------------

def register_sources(config: DataConfig) -> str:
  """Registers the config's user sources as Tasks and their Mixture; returns the mixture name."""
  suffix = _suffix(config.vocabulary)
  fmt = flan.FlanFormat.from_config(config)
  tasks = []
  for task_name, path, rate in config.sources:
    name = f"{config.mixture}_{task_name}{suffix}"
    _python_task(name, config.vocabulary, ("flan", path, fmt, config.shuffle_buffer),
                 flan.make_examples(name, path, fmt), flan.splits(path), shuffled=False,
                 preflight=flan.preflight(name, path, fmt), shuffle_buffer=config.shuffle_buffer,
                 examples=("flan", path, fmt), unit_names=flan.unit_names(path),
                 unit_examples=flan.unit_examples(name, path, fmt))
    tasks.append((name, rate))
  _add_mixture(config.mixture + suffix, tasks)
  return config.mixture + suffix


def ensure_registered(config: DataConfig) -> str:
  """Registers what `config` reads and returns the seqio Mixture or Task name to read."""
  register_builtins(config.vocabulary)
  builtins = builtin_names()
  if config.sources:
    if config.mixture in builtins:
      raise ValueError(f"DataConfig.mixture: {config.mixture!r} is a built-in name; give the user "
                       "sources a mixture name of their own")
    return register_sources(config)
  if config.mixture in builtins:
    return config.mixture + _suffix(config.vocabulary)
  if config.mixture in seqio.MixtureRegistry.names() or config.mixture in seqio.TaskRegistry.names():
    return config.mixture  # registered by other code, read as it is
  raise ValueError(f"DataConfig.mixture: unknown mixture or task {config.mixture!r} (and no sources); "
                   f"built-in ones: {', '.join(builtins)}")


def tasks_of(name: str) -> list[seqio.Task]:
  provider = seqio.get_mixture_or_task(name)
  return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def endless(name: str, split: str = "train") -> bool:
  """Whether reading `split` of the mixture or task never ends (one of its tasks generates examples
  without end: the synthetic and PassKey training tasks)."""
  return any(split in getattr(task.source, "endless", ()) for task in tasks_of(name))


def famjax_task(task: seqio.Task) -> bool:
  """Whether famjax registered the task (so it emits the `task` feature)."""
  return _is_ours("task", task.name)


def rates_of(name: str) -> list[tuple[str, float]]:
  """(task name, mixing rate) of a mixture's tasks (a task alone: rate 1), in the mixture's order."""
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    return [(task.name, float(provider.get_rate(task))) for task in provider.tasks]
  return [(provider.name, 1.0)]


def tokenization_identity(task: seqio.Task, seed: int) -> dict[str, Any]:
  """What a task's tokenized training examples depend on (see the module docstring), JSON-able.

  famjax's tasks: their source and text format (as registered) and, for generated ones, the seed. A
  task registered by other code: its name, source class and shards, and the seed (its preprocessors
  may draw from it); change its name, or rebuild (famjax.data.prepare --rebuild), when its code changes.
  """
  examples = _EXAMPLES_OF.get(task.name) if famjax_task(task) else None
  if examples is not None:
    what = repr(examples)
    seed_used = None if examples[1] == "flan" else seed  # files: the seed draws nothing
  else:
    what = f"{type(task.source).__module__}.{type(task.source).__qualname__}: " \
           f"{list(task.source.list_shards('train'))}"
    seed_used = seed
  return {"task": task.name, "examples": what, "seed": seed_used}
