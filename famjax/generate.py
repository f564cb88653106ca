"""Text generation from a famjax workdir or a Hugging Face directory, on the streaming path.

  python -m famjax.generate --workdir=workdirs/demo --prompt="What is the pass key?" --max_new_tokens=64
  python -m famjax.generate --hf_dir=path/to/llama --attention=fam --block_size=1024 --fam_len=64 \
      --mem_segments=3 --prompt_file=long_document.txt --temperature=0.7 --top_p=0.9 --seed=1
  cat prompt.txt | python -m famjax.generate --workdir=...

The prompt (--prompt, --prompt_file, else stdin) is streamed through the model in chunks, so any length
costs the memory of one chunk in bswa/fam (famjax.inference.generate). The generated text goes to
stdout; "prompt: N tokens, X tok/s; generated: M tokens, Y tok/s" to stderr. Generation stops at EOS
(unless --ignore_eos), at a --stop_id token, or at a --stop string: a string of one token ends
generation there; a longer one cuts the text at its first occurrence. The same --seed gives the same
text. Models are found and loaded as by famjax.eval (famjax/evaluation/load.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging

from famjax.evaluation import load
from famjax.inference import SamplingConfig

_WORKDIR = flags.DEFINE_string("workdir", None, "a famjax run: its newest checkpoint and vocabulary")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "a Hugging Face directory (config.json + safetensors)")
_VOCAB = flags.DEFINE_string("vocabulary", "", "'byte' or a SentencePiece .model (default: the run's, "
                             "or the HF directory's tokenizer.model)")
_ATTENTION = flags.DEFINE_enum("attention", None, ["full", "bswa", "fam", "swa"], "--hf_dir: attention")
_BLOCK = flags.DEFINE_integer("block_size", None, "--hf_dir: block size")
_MEM = flags.DEFINE_integer("mem_segments", None, "--hf_dir: memory segments")
_FAM_LEN = flags.DEFINE_integer("fam_len", None, "--hf_dir: FAM rows per layer")
_WINDOW = flags.DEFINE_integer("window", None, "--hf_dir with --attention=swa: tokens each token sees")
_PROMPT = flags.DEFINE_string("prompt", None, "the prompt text")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "a file holding the prompt (UTF-8)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "tokens to generate at most")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "keep the most likely tokens up to this probability")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed: the same seed gives the same text")
_STOP = flags.DEFINE_multi_string("stop", [], "stop string (repeatable; \\n and other escapes read)")
_STOP_ID = flags.DEFINE_multi_integer("stop_id", [], "stop token id (repeatable)")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "do not stop at EOS")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "prompt tokens per streaming call (0: four blocks)")
_BOS = flags.DEFINE_integer("bos_id", 0, "id put before the prompt (0: famjax's training batches; 1 "
                            "for an untuned Llama checkpoint; -1: none)")


def _fail(message: str) -> None:
  print(f"famjax.generate: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(2)


def unescape(text: str) -> str:
  r"""'\\n' -> newline (Python string escapes), other characters kept as they are."""
  return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def read_prompt() -> str:
  if _PROMPT.value is not None and _PROMPT_FILE.value is not None:
    raise ValueError("give --prompt or --prompt_file, not both")
  if _PROMPT.value is not None:
    return _PROMPT.value
  if _PROMPT_FILE.value is not None:
    path = Path(_PROMPT_FILE.value)
    if not path.is_file():
      raise ValueError(f"--prompt_file {path.absolute()}: no such file")
    return path.read_text(encoding="utf-8")
  return sys.stdin.read()


def _source() -> load.ModelSource:
  if (_WORKDIR.value is None) == (_HF_DIR.value is None):
    raise ValueError("give one of --workdir or --hf_dir")
  overrides = {"attention": _ATTENTION.value, "block_size": _BLOCK.value,
               "mem_segments": _MEM.value, "fam_len": _FAM_LEN.value, "window": _WINDOW.value}
  if _WORKDIR.value is not None and any(v is not None for v in overrides.values()):
    raise ValueError("--attention, --block_size, --mem_segments, --fam_len, --window apply to --hf_dir; a "
                     "workdir's model is the one it trained")
  return load.describe(_WORKDIR.value or _HF_DIR.value, vocabulary=_VOCAB.value, hf_overrides=overrides)


def cut_at_strings(text: str, stops) -> str:
  """`text` up to the earliest occurrence of any of `stops`."""
  cuts = [text.find(s) for s in stops if s and s in text]
  return text[:min(cuts)] if cuts else text


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax and TFDS log routine file checks as warnings
    logging.set_verbosity(logging.ERROR)
  try:
    source = _source()
    sampling = SamplingConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
    if _MAX_NEW.value < 1:
      raise ValueError(f"--max_new_tokens must be >= 1, got {_MAX_NEW.value}")
    prompt = read_prompt()
    # Imported after the cheap checks: famjax.data brings TensorFlow (seconds to import).
    from famjax.evaluation import stream  # pylint: disable=import-outside-toplevel
    from famjax.inference import generate  # pylint: disable=import-outside-toplevel
    vocab = load.load_vocabulary(source)
    model, _ = load.load(source)
    load.check_vocabulary(model, vocab, source)
  except (OSError, ValueError) as e:  # LoadError, a bad flag or file
    _fail(str(e))

  stops = [unescape(s) for s in _STOP.value]
  stop_ids = set(_STOP_ID.value) | ({vocab.eos_id} if not _IGNORE_EOS.value else set())
  stop_ids |= {ids[0] for ids in map(vocab.encode, stops) if len(ids) == 1}  # one-token strings
  prompt_ids = vocab.encode(prompt)
  tokens = stream.with_bos(prompt_ids, None if _BOS.value < 0 else _BOS.value)
  if not len(tokens):
    _fail("the prompt is empty (and --bos_id=-1 puts nothing before it)")
  result = generate(model, tokens[None], max_new_tokens=_MAX_NEW.value, sampling=sampling,
                    stop_tokens=sorted(stop_ids), seed=_SEED.value, prefill_chunk=_CHUNK.value or None)
  text = cut_at_strings(vocab.decode(stream.cut_at_stop(result.tokens[0], stop_ids)), stops)
  sys.stdout.write(text + "\n")
  sys.stdout.flush()
  print(f"prompt: {len(prompt_ids)} tokens, {result.prompt_tokens_per_second:,.0f} tok/s; "
        f"generated: {result.tokens.shape[1]} tokens, {result.generation_tokens_per_second:,.0f} tok/s",
        file=sys.stderr)


def run() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  app.run(main)


if __name__ == "__main__":
  run()
