"""Model access: loading pipelines and one adapter per denoiser family (each registers itself)."""

from workbench.models import dit, generic, mmdit, unet  # noqa: F401  (registration)
from workbench.models.adapter import ADAPTERS, FamilyAdapter, adapter_for, register_adapter
from workbench.models.loading import load
from workbench.models.model import Model
from workbench.models.sites import Role, Site

__all__ = ["ADAPTERS", "FamilyAdapter", "Model", "Role", "Site", "adapter_for", "load", "register_adapter"]
