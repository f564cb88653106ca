"""famjax: TransformerFAM (Feedback Attention Memory) in JAX/Flax. See README.md and ../shared/docs/fam.md."""

from famjax.model import FamState, ModelConfig, StreamState, Transformer

__all__ = ["FamState", "ModelConfig", "StreamState", "Transformer"]
