"""Sites: the addressable modules of a denoiser, each with a role given by its family adapter."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Role(str, Enum):
    """What a site does. Algorithms select sites by role, never by module-path templates."""

    CROSS_ATTN_QUERY = "cross_attn_query"
    CROSS_ATTN_KEY = "cross_attn_key"
    CROSS_ATTN_VALUE = "cross_attn_value"
    CROSS_ATTN_OUT = "cross_attn_out"
    SELF_ATTN_QUERY = "self_attn_query"
    SELF_ATTN_KEY = "self_attn_key"
    SELF_ATTN_VALUE = "self_attn_value"
    SELF_ATTN_OUT = "self_attn_out"
    CONTEXT_QUERY = "context_query"  # MMDiT text-stream projections (add_q/k/v_proj, to_add_out)
    CONTEXT_KEY = "context_key"
    CONTEXT_VALUE = "context_value"
    CONTEXT_OUT = "context_out"
    FFN_IN = "ffn_in"
    FFN_OUT = "ffn_out"
    CONTEXT_FFN_IN = "context_ffn_in"  # MMDiT text-stream feed-forward
    CONTEXT_FFN_OUT = "context_ffn_out"
    CONV = "conv"
    NORM = "norm"
    PROJ_IN = "proj_in"
    PROJ_OUT = "proj_out"
    TIME_EMBED = "time_embed"
    TEXT_EMBED = "text_embed"  # caption projection / context embedder: the text enters here
    MODULATION = "modulation"  # projections of the time embedding into a block (AdaLN, resnet time_emb_proj)
    LINEAR = "linear"  # a Linear with no more specific role (also the generic fallback)


TEXT_KEY_VALUE_ROLES = frozenset({Role.CROSS_ATTN_KEY, Role.CROSS_ATTN_VALUE, Role.CONTEXT_KEY, Role.CONTEXT_VALUE})


@dataclass(frozen=True)
class Site:
    """One module of the denoiser whose outputs are neurons.

    `out_features` neurons live along `channel_dim` of the module output (-1 for Linear and
    LayerNorm, 1 for Conv and GroupNorm). `order` is the index in execution order of one reference
    forward (None if the module did not run in it). `resolution` is the side of the latent feature
    map (U-Net) or token grid (DiT) at the model's default sample size; None for text and time paths.
    """

    path: str
    role: Role
    kind: str  # "linear" | "conv" | "norm"
    block: str  # "stem", "down.0", "mid", "up.1", "block.7", "head", ...
    depth: int  # position of `block` in execution order
    resolution: int | None
    in_features: int
    out_features: int
    bias: bool
    weight_shape: tuple[int, ...] | None
    channel_dim: int
    order: int | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["role"] = self.role.value
        data["weight_shape"] = list(self.weight_shape) if self.weight_shape is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Site":
        data = dict(data)
        data["role"] = Role(data["role"])
        if data.get("weight_shape") is not None:
            data["weight_shape"] = tuple(data["weight_shape"])
        return cls(**data)
