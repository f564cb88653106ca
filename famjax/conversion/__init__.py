"""famjax.conversion: checkpoint formats outside famjax's own (Hugging Face safetensors checkpoints).

This package owns every mapping between famjax's parameter layout (famjax.model.params) and other
formats. It imports famjax.model and never TensorFlow or famjax.data, so converting a checkpoint needs
only JAX, NumPy and safetensors.

  from_hf(path, **overrides) -> Transformer    a Llama / Mistral / Qwen2 (no biases) safetensors directory
  to_hf(model, path)          -> path          a Llama-layout directory that from_hf reads back exactly
"""

from famjax.conversion.hf import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
