"""`python -m famjax.generate` as a user runs it: the prompt from --prompt, --prompt_file or stdin, the
text on stdout and the token rates on stderr; the same seed gives the same text, which is what
famjax.inference.generate gives in-process; a missing model directory is one line, exit status 2.
One run is a real subprocess; the others run famjax.generate's main in this process (tests/cli.py)."""

import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import famjax
from cli import run_main
from famjax.inference import SamplingConfig, generate
from test_train_cli import ROOT, env

# famjax.generate end to end: the full suite only (make test).
pytestmark = pytest.mark.slow

PROMPT = "The pass key is 12345. What is the pass key?"
SAMPLING = ["--temperature=1.0", "--top_k=50", "--max_new_tokens=12"]


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
  cfg = famjax.ModelConfig(vocab_size=259, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                           attention="fam", block_size=8, mem_segments=1, fam_len=2, dtype="float32",
                           remat="none")
  model = famjax.Transformer(cfg, rngs=nnx.Rngs(2))
  return model, famjax.to_hf(model, tmp_path_factory.mktemp("gen") / "hf")


def run(*flags, stdin=""):
  return run_main("famjax.generate", list(flags), stdin)


def run_subprocess(*flags):
  return subprocess.run([sys.executable, "-m", "famjax.generate", *flags], cwd=ROOT, env=env(),
                        capture_output=True, text=True, timeout=300)


def test_the_same_seed_gives_the_same_text_as_in_process(model_and_dir, tmp_path):
  model, hf_dir = model_and_dir
  prompt_file = tmp_path / "prompt.txt"
  prompt_file.write_text(PROMPT)
  a = run_subprocess(f"--hf_dir={hf_dir}", f"--prompt={PROMPT}", *SAMPLING, "--seed=3", "--ignore_eos")
  b = run(f"--hf_dir={hf_dir}", f"--prompt_file={prompt_file}", *SAMPLING, "--seed=3", "--ignore_eos")
  c = run(f"--hf_dir={hf_dir}", *SAMPLING, "--seed=4", "--ignore_eos", stdin=PROMPT)
  for proc in (a, b, c):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^prompt: 44 tokens, [\d,]+ tok/s; generated: 12 tokens, [\d,]+ tok/s$",
                     proc.stderr, re.M), proc.stderr
  assert a.stdout == b.stdout and a.stdout != c.stdout
  # in-process: [BOS 0] + the prompt's bytes (+3 in the byte vocabulary), the same sampling and seed
  ids = np.asarray([[0] + [byte + 3 for byte in PROMPT.encode()]], np.int32)
  tokens = generate(model, ids, max_new_tokens=12, seed=3,
                    sampling=SamplingConfig(temperature=1.0, top_k=50)).tokens[0]
  text = bytes(int(t) - 3 for t in tokens if t >= 3).decode("utf-8", "ignore")
  assert a.stdout == text + "\n"


def test_a_missing_model_directory_is_one_line_exit_2(tmp_path):
  proc = run(f"--workdir={tmp_path / 'nowhere'}", "--prompt=hi")
  assert proc.returncode == 2
  assert proc.stderr.strip() == f"famjax.generate: error: {tmp_path / 'nowhere'}: no such directory"


def test_a_hugging_face_directory_runs_with_token_level_sliding_window(model_and_dir):
  """--attention=swa --window=N (a famjax ablation, docs/ablations.md): the text is the in-process model's
  loaded with the same overrides."""
  _, hf_dir = model_and_dir
  flags = dict(attention="swa", window=5, fam_len=0, mem_segments=0)
  proc = run(f"--hf_dir={hf_dir}", f"--prompt={PROMPT}", "--max_new_tokens=8", "--ignore_eos",
             *(f"--{k}={v}" for k, v in flags.items()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  model = famjax.from_hf(hf_dir, **flags)
  assert model.config.attention == "swa" and model.config.window == 5
  ids = np.asarray([[0] + [byte + 3 for byte in PROMPT.encode()]], np.int32)
  tokens = generate(model, ids, max_new_tokens=8, seed=0, sampling=SamplingConfig()).tokens[0]
  assert proc.stdout == bytes(int(t) - 3 for t in tokens if t >= 3).decode("utf-8", "ignore") + "\n"
