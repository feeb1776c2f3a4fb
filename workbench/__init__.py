"""workbench: find where a text-to-image diffusion model stores what it should not, remove it, prove it.

    import workbench
    model = workbench.load("path/to/pipeline")        # any local diffusers text-to-image folder
    model.graph.select(roles=["cross_attn_value"])     # sites by role, in execution order
"""

from workbench.errors import WorkbenchError
from workbench.graph import NeuronGraph
from workbench.models import Model, Role, Site, load
from workbench.neurons import NeuronSet, WeightMask

__version__ = "0.1.0"
__all__ = ["Model", "NeuronGraph", "NeuronSet", "Role", "Site", "WeightMask", "WorkbenchError", "load"]
