"""Fallback for denoisers no adapter knows: Linear/Conv/Norm sites without roles, in registration order."""

from __future__ import annotations

from torch import nn

from workbench.models.adapter import FamilyAdapter, register_adapter
from workbench.models.roles import site_kind
from workbench.models.sites import Role


@register_adapter
class GenericAdapter(FamilyAdapter):
    """Chosen only on request (`family="generic"`): lists sites so they can be recorded and ablated."""

    family = "generic"

    def role_of(self, path: str, module: nn.Module, modules: dict[str, nn.Module]) -> Role:
        return {"linear": Role.LINEAR, "conv": Role.CONV, "norm": Role.NORM}[site_kind(module)]
