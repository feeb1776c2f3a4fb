"""SD-style U-Net (`UNet2DConditionModel`: SD 1.x, 2.x, XL). Text enters through `attn2.to_k/to_v`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.models.adapter import FamilyAdapter, cat_cfg, register_adapter
from workbench.models.sites import Role


def _side(config: Any) -> int:
    size = config.sample_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


@register_adapter
class UNetAdapter(FamilyAdapter):
    family = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    text_only_roles = frozenset({Role.CROSS_ATTN_KEY, Role.CROSS_ATTN_VALUE})
    residual_units = frozenset({"ResnetBlock2D", "Transformer2DModel"})

    def block_of(self, path: str, config: Any) -> tuple[str, int | None]:
        levels = len(config.block_out_channels)
        parts = path.split(".")
        if parts[0] == "down_blocks":
            level, block = int(parts[1]), f"down.{parts[1]}"
        elif parts[0] == "mid_block":
            level, block = levels - 1, "mid"
        elif parts[0] == "up_blocks":
            level, block = levels - 1 - int(parts[1]), f"up.{parts[1]}"
        elif parts[0] in ("conv_norm_out", "conv_out"):
            level, block = 0, "head"
        else:
            level, block = 0, "stem"
        return block, _side(config) // 2 ** level

    def example_inputs(self, config: Any, batch: int = 1) -> tuple[tuple, dict]:
        side = _side(config)
        text_dim = config.encoder_hid_dim or config.cross_attention_dim
        text_dim = text_dim[0] if isinstance(text_dim, (list, tuple)) else text_dim
        kwargs: dict[str, Any] = {"encoder_hidden_states": torch.zeros(batch, 8, text_dim)}
        if config.addition_embed_type == "text_time":
            time_ids = 6
            pooled = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(batch, pooled),
                                           "time_ids": torch.zeros(batch, time_ids)}
        if config.time_cond_proj_dim is not None:
            kwargs["timestep_cond"] = torch.zeros(batch, config.time_cond_proj_dim)
        sample = torch.zeros(batch, config.in_channels, side, side)
        return (sample, torch.zeros(batch)), kwargs

    def text_edges(self, sites: list) -> list[tuple[str, str]]:
        return [("input:text", s.path) for s in sites if s.role in self.text_only_roles]

    def skip_edges(self, executed: list[str], modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
        """Down-path outputs pushed on the U-Net's skip stack, popped by the up-path resnets."""
        def last_site(prefix: str) -> str | None:
            inside = [p for p in executed if p.startswith(prefix + ".")]
            return inside[-1] if inside else None

        def first_site(prefix: str) -> str | None:
            inside = [p for p in executed if p.startswith(prefix + ".")]
            return inside[0] if inside else None

        stack = ["conv_in"] if "conv_in" in executed else []
        index = 0
        while f"down_blocks.{index}" in modules:
            block = modules[f"down_blocks.{index}"]
            for layer in range(len(block.resnets)):
                unit = (f"down_blocks.{index}.attentions.{layer}" if getattr(block, "attentions", None)
                        else f"down_blocks.{index}.resnets.{layer}")
                stack.append(last_site(unit))
            if getattr(block, "downsamplers", None):
                stack.append(last_site(f"down_blocks.{index}.downsamplers"))
            index += 1
        edges = []
        index = 0
        while f"up_blocks.{index}" in modules and stack:
            for layer in range(len(modules[f"up_blocks.{index}"].resnets)):
                if not stack:
                    break
                producer, consumer = stack.pop(), first_site(f"up_blocks.{index}.resnets.{layer}")
                if producer and consumer:
                    edges.append((producer, consumer))
            index += 1
        return edges

    def encode(self, pipe: Any, prompts: list[str], negative: str, cfg: bool,
               max_sequence_length: int | None) -> dict[str, torch.Tensor]:
        if type(pipe).__name__.startswith("StableDiffusionXL"):
            raise WorkbenchError("prompt-level sampling helpers do not support SDXL pipelines yet; "
                                 "use generate() or pass denoiser inputs to the U-Net directly")
        positive, negative_embeds = pipe.encode_prompt(prompts, pipe.device, 1, cfg,
                                                       negative_prompt=[negative] * len(prompts))
        return {"encoder_hidden_states": cat_cfg(negative_embeds, positive, cfg)}

    def denoise(self, denoiser: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: dict[str, Any]) -> torch.Tensor:
        return denoiser(latents, timestep, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def text_value_input(self, denoiser: nn.Module, cond: dict[str, Any]) -> torch.Tensor | None:
        if denoiser.config.encoder_hid_dim is not None:  # a projection in front of attn2 (e.g. Kandinsky-style)
            return None
        return cond["encoder_hidden_states"]
