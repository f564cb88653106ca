"""famjax.parallel: the device mesh and the one table that maps logical axis names to mesh axes.

Owns: building the ("data", "fsdp", "tensor") mesh from a MeshConfig (one slice, or several joined by the
data-center network), the logical-axis rules, and the NamedShardings of parameter trees, batches and
activations. Must not import famjax.training, famjax.data or famjax.model (the model and the training
step use this package, not the other way round).
"""

from famjax.parallel.mesh import MESH_AXES, MeshConfig, MeshShape, device_grid, make_mesh, slice_count
from famjax.parallel.rules import (LOGICAL_AXIS_RULES, activation_constraint, batch_sharding, logical_to_spec,
                                   mirror_shardings, replicated, tree_shardings)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "MeshConfig", "MeshShape", "activation_constraint",
           "batch_sharding", "device_grid", "logical_to_spec", "make_mesh", "mirror_shardings", "replicated",
           "slice_count", "tree_shardings"]
