"""famjax.parallel: the device mesh and the one table that maps logical axis names to mesh axes.

Owns: building the ("data", "fsdp", "tensor") mesh from a MeshConfig, the logical-axis rules, and the
NamedShardings of parameter trees and batches. Must not import famjax.training or famjax.data (the
training step uses this package, not the other way round).
"""

from famjax.parallel.mesh import MESH_AXES, MeshConfig, make_mesh
from famjax.parallel.rules import (LOGICAL_AXIS_RULES, batch_sharding, logical_to_spec, replicated,
                                   tree_shardings)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "MeshConfig", "batch_sharding", "logical_to_spec",
           "make_mesh", "replicated", "tree_shardings"]
