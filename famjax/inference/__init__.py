"""famjax.inference: sampling and streaming generation over famjax.Transformer.

Owns: turning logits into tokens (greedy, temperature, top-k, top-p) and the prompt-then-decode loop on
the streaming path (constant memory in bswa/fam, whatever the prompt length). Imports famjax.model only;
tokenizers and checkpoints are the command line's business (famjax/generate.py).
"""

from famjax.inference.generate import GenerationResult, generate
from famjax.inference.sampling import SamplingConfig, sample

__all__ = ["GenerationResult", "SamplingConfig", "generate", "sample"]
