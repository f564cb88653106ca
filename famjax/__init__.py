"""famjax: TransformerFAM (Feedback Attention Memory) in JAX/Flax. See README.md and ../shared/docs/fam.md."""

from famjax.conversion import from_hf, to_hf
from famjax.model import FamState, ModelConfig, StreamState, Transformer

__all__ = ["FamState", "ModelConfig", "StreamState", "Transformer", "from_hf", "to_hf"]
