"""Family adapters: everything the workbench knows about one denoiser family, in one registered class.

Inspired by diffusers' block-metadata registry and TransformerLens' architecture adapters: algorithms
ask the graph for roles and blocks; only adapters know how a family's modules are laid out and called.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.models.roles import structural_role
from workbench.models.sites import Role

ADAPTERS: dict[str, type["FamilyAdapter"]] = {}


def register_adapter(cls: type["FamilyAdapter"]) -> type["FamilyAdapter"]:
    """Class decorator: make a family known to `load` and to the graph builder."""
    if cls.family in ADAPTERS:
        raise ValueError(f"adapter family {cls.family!r} registered twice")
    ADAPTERS[cls.family] = cls
    return cls


def supported_families() -> str:
    return ", ".join(f"{name} ({'/'.join(cls.denoiser_classes)})" for name, cls in ADAPTERS.items()
                     if cls.denoiser_classes)


def adapter_for(denoiser: nn.Module, family: str = "auto") -> "FamilyAdapter":
    """The adapter for `denoiser`: detected from its class, or the one named by `family`."""
    if family != "auto":
        if family not in ADAPTERS:
            raise WorkbenchError(f"unknown family {family!r}; use one of: auto, {', '.join(ADAPTERS)}")
        return ADAPTERS[family]()
    name = type(denoiser).__name__
    for cls in ADAPTERS.values():
        if name in cls.denoiser_classes:
            return cls()
    raise WorkbenchError(f"unsupported denoiser {name}; supported: {supported_families()} "
                         "(or pass family='generic' for role-less Linear/Conv sites)")


class FamilyAdapter:
    """Base class. Subclasses set the class variables and override what their family does differently."""

    family: ClassVar[str]
    denoiser_classes: ClassVar[tuple[str, ...]] = ()
    # roles whose input is the text embedding alone (no latent, no timestep): statistics of these
    # need only the text encoder and one matmul
    text_only_roles: ClassVar[frozenset[Role]] = frozenset()
    residual_units: ClassVar[frozenset[str]] = frozenset()

    # ---- structure ---------------------------------------------------------------------------
    def role_of(self, path: str, module: nn.Module, modules: dict[str, nn.Module]) -> Role:
        return structural_role(path, module, modules)

    def block_of(self, path: str, config: Any) -> tuple[str, int | None]:
        """(block name, latent resolution) of the site at `path`."""
        return path.split(".", 1)[0], None

    def example_inputs(self, config: Any, batch: int = 1) -> tuple[tuple, dict] | None:
        """Inputs for one reference forward (run on the meta device to find execution order)."""
        return None

    def text_edges(self, sites: list) -> list[tuple[str, str]]:
        """Data-flow edges along which the text embedding enters the denoiser."""
        return []

    def skip_edges(self, executed: list[str], modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
        """Long skip connections (U-Net), as (producer site, consumer site)."""
        return []

    def timestep_of(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The timestep argument of one denoiser call."""
        value = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        return value if isinstance(value, torch.Tensor) else (torch.tensor(value) if value is not None else None)

    # ---- sampling ----------------------------------------------------------------------------
    def encode(self, pipe: Any, prompts: list[str], negative: str, cfg: bool,
               max_sequence_length: int | None) -> dict[str, torch.Tensor]:
        """Denoiser keyword arguments for `prompts`, exactly as the pipeline builds them.

        With `cfg`, the batch is [negative rows; prompt rows], the order diffusers pipelines use.
        """
        raise WorkbenchError(f"prompt encoding is not available for family {self.family!r}; "
                             "use one of the text-to-image families")

    def denoise(self, denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: dict[str, Any]) -> torch.Tensor:
        """One denoiser forward; returns the prediction with the latent's channel count."""
        raise WorkbenchError(f"denoising is not available for family {self.family!r}")

    def text_value_input(self, denoiser: nn.Module, cond: dict[str, Any]) -> torch.Tensor | None:
        """What every cross-attention key/value projection reads, when that is a function of the text
        alone (no latent, no timestep): lets value activations be computed without a denoiser forward."""
        return None

    def max_sequence_length(self, pipe: Any) -> int | None:
        """Text length used by `encode` and `generate` alike (None where the pipeline has no such knob)."""
        return None

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments every pipeline call of this family needs (offline, deterministic)."""
        return {}


def expand_timestep(timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=device)
    return t.reshape(-1).expand(batch) if t.numel() == 1 else t


def cat_cfg(negative: torch.Tensor, positive: torch.Tensor, cfg: bool) -> torch.Tensor:
    """The CFG batch layout of diffusers pipelines: unconditional rows first."""
    return torch.cat([negative, positive]) if cfg else positive
