"""Structural roles: what a Linear/Conv/Norm does, read from the diffusers module that owns it.

Family adapters use this table; it looks at module classes and attribute names inside a known owner
class (e.g. `Attention.to_v`), never at whole-path templates, so it serves U-Nets, DiTs and MMDiTs.
"""

from __future__ import annotations

from torch import nn

from workbench.models.sites import Role

_ATTENTION_PROJECTIONS = {"to_q": 0, "to_k": 1, "to_v": 2, "to_out.0": 3}
_CROSS = (Role.CROSS_ATTN_QUERY, Role.CROSS_ATTN_KEY, Role.CROSS_ATTN_VALUE, Role.CROSS_ATTN_OUT)
_SELF = (Role.SELF_ATTN_QUERY, Role.SELF_ATTN_KEY, Role.SELF_ATTN_VALUE, Role.SELF_ATTN_OUT)
_CONTEXT = {"add_q_proj": Role.CONTEXT_QUERY, "add_k_proj": Role.CONTEXT_KEY,
            "add_v_proj": Role.CONTEXT_VALUE, "to_add_out": Role.CONTEXT_OUT}
_TEXT_EMBED_ATTRS = {"context_embedder", "caption_projection", "encoder_hid_proj"}
_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
_ACTIVATION_WRAPPERS = {"GELU", "GEGLU", "ApproximateGELU", "SwiGLU", "LinearActivation"}


def site_kind(module: nn.Module) -> str | None:
    """"linear", "conv" or "norm" for modules that carry neurons; None for everything else."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) or type(module).__name__ == "RMSNorm":
        return "norm"
    return None


def channel_dim(module: nn.Module) -> int:
    """The output dimension that indexes neurons."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm)) else -1


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a site module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], module.normalized_shape[-1]
    size = module.weight.shape[-1] if getattr(module, "weight", None) is not None else int(module.dim[-1])
    return size, size


def structural_role(path: str, module: nn.Module, modules: dict[str, nn.Module]) -> Role:
    """The role of the site at `path`, given all modules of the denoiser by path."""
    kind = site_kind(module)
    owner_path, attr = _owner(path, modules)
    owner = type(modules[owner_path]).__name__ if owner_path is not None else ""
    if owner == "Attention":
        if attr in _CONTEXT:
            return _CONTEXT[attr]
        if attr in _ATTENTION_PROJECTIONS:
            table = _CROSS if modules[owner_path].is_cross_attention else _SELF
            return table[_ATTENTION_PROJECTIONS[attr]]
    if owner == "FeedForward" and attr in ("net.0.proj", "net.2"):
        context = owner_path.rsplit(".", 1)[-1] == "ff_context"
        if attr == "net.2":
            return Role.CONTEXT_FFN_OUT if context else Role.FFN_OUT
        return Role.CONTEXT_FFN_IN if context else Role.FFN_IN
    if kind == "norm":
        return Role.NORM
    if kind == "conv":
        return Role.PROJ_IN if attr == "proj_in" else Role.PROJ_OUT if attr == "proj_out" else Role.CONV
    if owner == "TimestepEmbedding":
        return Role.TIME_EMBED
    if owner == "PixArtAlphaTextProjection" or attr in _TEXT_EMBED_ATTRS:
        return Role.TEXT_EMBED
    if owner.startswith(("AdaLayerNorm", "SD35AdaLayerNorm")) or attr == "time_emb_proj":
        return Role.MODULATION
    if attr in ("proj_in", "proj_out"):
        return Role.PROJ_IN if attr == "proj_in" else Role.PROJ_OUT
    return Role.LINEAR


def _owner(path: str, modules: dict[str, nn.Module]) -> tuple[str | None, str]:
    """The nearest ancestor that is not a container, and the path from it to the site."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner_path = ".".join(parts[:cut])
        owner = modules.get(owner_path)
        if (owner is not None and not isinstance(owner, _CONTAINERS) and site_kind(owner) is None
                and type(owner).__name__ not in _ACTIVATION_WRAPPERS):
            return owner_path, ".".join(parts[cut:])
    return None, path
