"""famjax.model: the TransformerFAM decoder (config, parameters, pure forward math, NNX module).

Owns the math of ../shared/docs/fam.md. Must not import TensorFlow or anything from famjax.data, so the
model and the training step run on machines that have only JAX.
"""

from famjax.model.config import AttentionKind, ModelConfig
from famjax.model.params import LOGICAL_AXES, init_params, param_shapes
from famjax.model.transformer import FamState, StreamState, Transformer

__all__ = ["AttentionKind", "FamState", "LOGICAL_AXES", "ModelConfig", "StreamState", "Transformer",
           "init_params", "param_shapes"]
