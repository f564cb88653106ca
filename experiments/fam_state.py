"""What the FAM state does over long texts: two measurements on trained FAM workdirs.

  python experiments/fam_state.py --model=fam=workdirs/passkey_small/fam --format=repeated --out=fam_state.md

1. The size of the FAM state (spec §3: `F_new = AF + MLP(RMSNorm(AF))`, `AF = F_prev + Attn(...)`, nothing
   rescales it) after 1, 8, 32, 128 blocks of PassKey text (key at the start): its RMS over the model
   width, per layer. On repeated filler every block adds about the same update.
2. PassKey exact match with the key always close to the question (2 blocks before it, well within what
   the model retrieves at the training length) at growing total lengths. If it falls as the text grows,
   what fails is the long history the FAM has absorbed before the key, not the key's distance.

Both read the text on the streaming path (famjax.evaluation.stream), one block per call for 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from famjax.data import passkey as passkey_data  # noqa: E402
from famjax.evaluation import load as load_lib, passkey, stream  # noqa: E402

BLOCKS = (1, 8, 32, 128)
LENGTHS = (256, 1024, 4096)
NEAR_CHARS = 64  # filler between the key and the question: 2 blocks of 32 bytes (+ < 1 sentence in
#                  the sentence formats)


def state_rms(model, vocabulary, fmt, n_examples: int) -> dict[int, list[float]]:
  """{blocks read: [RMS of the FAM per layer]} (mean over examples and FAM rows)."""
  block = model.config.block_size
  filler = int(max(BLOCKS) * block * passkey_data.chars_per_token(vocabulary))
  texts = [passkey_data.make_example(np.random.default_rng([5, i]), filler, depth=0.0, fmt=fmt).prompt
           for i in range(n_examples)]
  ids = [stream.with_bos(vocabulary.encode(t))[:max(BLOCKS) * block] for t in texts]
  tokens = np.stack(ids)
  state, out = model.init_state(n_examples), {}
  for b in range(max(BLOCKS)):
    _, state = model.stream(tokens[:, b * block:(b + 1) * block], state)
    if b + 1 in BLOCKS:
      fam = np.asarray(state.fam, np.float64)  # [L, B, F, D]
      out[b + 1] = [float(x) for x in np.sqrt((fam ** 2).mean(-1)).mean((1, 2))]
  return out


def near_key_exact_match(model, vocabulary, fmt, total_tokens: int, n_examples: int) -> float:
  """Exact match (%) with the key sentence NEAR_CHARS (+ < 1 sentence) before the question."""
  filler = passkey_data.filler_chars_for_total(total_tokens, vocabulary, fmt)
  depth = max(0.0, 1.0 - NEAR_CHARS / filler)
  examples = [passkey_data.make_example(np.random.default_rng([6, total_tokens, i]), filler, depth=depth,
                                        fmt=fmt) for i in range(n_examples)]
  rows = [{"prompt_ids": np.asarray(vocabulary.encode(ex.prompt), np.int32)} for ex in examples]
  outputs = passkey.answer(model, vocabulary, rows, 4 * model.config.block_size,
                           passkey_data.KEY_DIGITS + passkey.EXTRA_TOKENS)
  return passkey.score([ex.answer for ex in examples], outputs)[2]

def report(name: str, rms: dict[int, list[float]], near: dict[int, float]) -> str:
  layers = len(next(iter(rms.values())))
  lines = [f"### {name}", "", "FAM RMS after n blocks (per layer):", "",
           "| blocks | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
           "|---:|" + "---:|" * layers]
  lines += [f"| {b} | " + " | ".join(f"{x:.2f}" for x in v) + " |" for b, v in rms.items()]
  lines += ["", f"PassKey exact match with the key {NEAR_CHARS} bytes before the question:", "",
            "| tokens | exact match (%) |", "|---:|---:|"]
  lines += [f"| {t} | {em:.1f} |" for t, em in near.items()]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", action="append", required=True, help="NAME=WORKDIR (a FAM model); repeat")
  parser.add_argument("--format", default="random", help="the PassKey text format (famjax.data.passkey)")
  parser.add_argument("--examples", type=int, default=16)
  parser.add_argument("--out", default="", help="also write the markdown here")
  args = parser.parse_args(argv)
  fmt = passkey_data.get_format(args.format)
  parts = []
  for flag in args.model:
    name, path = load_lib.parse_model_flag(flag)
    source = load_lib.describe(path, name)
    model, _ = load_lib.load(source)
    if not model.config.has_fam:
      parser.error(f"--model {flag}: not a FAM model (attention {model.config.attention!r})")
    vocabulary = load_lib.load_vocabulary(source)
    rms = state_rms(model, vocabulary, fmt, args.examples)
    near = {t: near_key_exact_match(model, vocabulary, fmt, t, args.examples) for t in LENGTHS}
    parts.append(report(name, rms, near))
    print(parts[-1], flush=True)
  if args.out:
    Path(args.out).write_text("\n".join(parts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
