"""SD3-style MMDiT (`SD3Transformer2DModel`): joint attention over image and text streams.

Text enters through `context_embedder`; each block projects the (time-modulated) text stream with
`attn.add_q/k/v_proj`, so these are not functions of the text alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workbench.models.adapter import FamilyAdapter, cat_cfg, expand_timestep, register_adapter
from workbench.models.dit import token_grid_side, transformer_block_of
from workbench.models.sites import Role


@register_adapter
class MMDiTAdapter(FamilyAdapter):
    family = "mmdit"
    denoiser_classes = ("SD3Transformer2DModel",)
    text_only_roles = frozenset({Role.TEXT_EMBED})
    residual_units = frozenset({"JointTransformerBlock"})

    def block_of(self, path: str, config: Any) -> tuple[str, int | None]:
        block, side = transformer_block_of(path, config)
        in_text_stream = any(part.endswith("_context") for part in path.split("."))
        return block, None if in_text_stream else side

    def example_inputs(self, config: Any, batch: int = 1) -> tuple[tuple, dict]:
        side = token_grid_side(config) * config.patch_size
        return (torch.zeros(batch, config.in_channels, side, side),), {
            "encoder_hidden_states": torch.zeros(batch, 8, config.joint_attention_dim),
            "pooled_projections": torch.zeros(batch, config.pooled_projection_dim),
            "timestep": torch.zeros(batch)}

    def text_edges(self, sites: list) -> list[tuple[str, str]]:
        edges = [("input:text", s.path) for s in sites if s.path == "context_embedder"]
        pooled = [s.path for s in sites if s.role == Role.TEXT_EMBED and s.path != "context_embedder"]
        return edges + ([("input:text", pooled[0])] if pooled else [])

    def encode(self, pipe: Any, prompts: list[str], negative: str, cfg: bool,
               max_sequence_length: int | None) -> dict[str, torch.Tensor]:
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=pipe.device,
            do_classifier_free_guidance=cfg, negative_prompt=[negative] * len(prompts),
            max_sequence_length=max_sequence_length or self.max_sequence_length(pipe))
        return {"encoder_hidden_states": cat_cfg(neg_embeds, embeds, cfg),
                "pooled_projections": cat_cfg(neg_pooled, pooled, cfg)}

    def max_sequence_length(self, pipe: Any) -> int | None:
        """SD3's default of 256 T5 tokens, capped by the T5 tokenizer (the CLIP one when T5 is absent)."""
        return min(256, (pipe.tokenizer_3 or pipe.tokenizer).model_max_length)

    def denoise(self, denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: dict[str, Any]) -> torch.Tensor:
        return denoiser(hidden_states=latents,
                        timestep=expand_timestep(timestep, latents.shape[0], latents.device),
                        encoder_hidden_states=cond["encoder_hidden_states"],
                        pooled_projections=cond["pooled_projections"]).sample
