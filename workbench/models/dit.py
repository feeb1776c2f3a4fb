"""PixArt-style DiT with cross-attention (`PixArtTransformer2DModel`).

Text enters through `caption_projection`, then every block's `attn2.to_k/to_v` (with bias).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workbench.models.adapter import FamilyAdapter, cat_cfg, expand_timestep, register_adapter
from workbench.models.sites import Role

PIXART_VAE_SCALE = 8  # PixArt's micro-conditions are in pixels of its 8x VAE


def token_grid_side(config: Any) -> int:
    size = config.sample_size
    return int(size[0] if isinstance(size, (list, tuple)) else size) // config.patch_size


def transformer_block_of(path: str, config: Any) -> tuple[str, int | None]:
    """Blocks of a plain transformer stack: `transformer_blocks.i`, a stem before and a head after."""
    parts = path.split(".")
    if parts[0] == "transformer_blocks":
        block = f"block.{parts[1]}"
    elif parts[0] in ("norm_out", "proj_out"):
        block = "head"
    else:
        block = "stem"
    return block, token_grid_side(config)


@register_adapter
class PixArtAdapter(FamilyAdapter):
    family = "dit"
    denoiser_classes = ("PixArtTransformer2DModel",)
    text_only_roles = frozenset({Role.TEXT_EMBED, Role.CROSS_ATTN_KEY, Role.CROSS_ATTN_VALUE})
    residual_units = frozenset({"BasicTransformerBlock"})

    def block_of(self, path: str, config: Any) -> tuple[str, int | None]:
        return transformer_block_of(path, config)

    def example_inputs(self, config: Any, batch: int = 1) -> tuple[tuple, dict]:
        side = token_grid_side(config) * config.patch_size
        conditions = {"resolution": torch.zeros(batch, 2), "aspect_ratio": torch.zeros(batch, 1)}
        return (torch.zeros(batch, config.in_channels, side, side),), {
            "encoder_hidden_states": torch.zeros(batch, 8, config.caption_channels),
            "timestep": torch.zeros(batch), "added_cond_kwargs": conditions}

    def text_edges(self, sites: list) -> list[tuple[str, str]]:
        projection = [s.path for s in sites if s.role == Role.TEXT_EMBED]
        if not projection:
            return []
        edges = [("input:text", projection[0])]
        edges += [(projection[-1], s.path) for s in sites
                  if s.role in (Role.CROSS_ATTN_KEY, Role.CROSS_ATTN_VALUE)]
        return edges

    def encode(self, pipe: Any, prompts: list[str], negative: str, cfg: bool,
               max_sequence_length: int | None) -> dict[str, torch.Tensor]:
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            prompts, cfg, negative_prompt=negative, device=pipe.device, clean_caption=False,
            max_sequence_length=max_sequence_length or self.max_sequence_length(pipe))
        return {"encoder_hidden_states": cat_cfg(neg_embeds, embeds, cfg),
                "encoder_attention_mask": cat_cfg(neg_mask, mask, cfg)}

    def denoise(self, denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: dict[str, Any]) -> torch.Tensor:
        batch = latents.shape[0]
        conditions: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if denoiser.use_additional_conditions:
            height, width = (side * PIXART_VAE_SCALE for side in latents.shape[-2:])
            conditions = {"resolution": latents.new_tensor([[height, width]]).repeat(batch, 1),
                          "aspect_ratio": latents.new_tensor([[height / width]]).repeat(batch, 1)}
        out = denoiser(latents, encoder_hidden_states=cond["encoder_hidden_states"],
                       encoder_attention_mask=cond["encoder_attention_mask"],
                       timestep=expand_timestep(timestep, batch, latents.device),
                       added_cond_kwargs=conditions).sample
        if denoiser.config.out_channels // 2 == latents.shape[1]:
            out = out.chunk(2, dim=1)[0]  # learned sigma: keep the noise half, as the pipeline does
        return out

    def text_value_input(self, denoiser: nn.Module, cond: dict[str, Any]) -> torch.Tensor | None:
        return denoiser.caption_projection(cond["encoder_hidden_states"])  # what every attn2 reads

    def max_sequence_length(self, pipe: Any) -> int | None:
        """PixArt's default of 120 tokens, capped by what the tokenizer holds."""
        return min(120, pipe.tokenizer.model_max_length)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"use_resolution_binning": False, "clean_caption": False}
