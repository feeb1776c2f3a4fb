"""SD1.5-size models with random weights, for the bench scripts (nothing is downloaded).

The U-Net comes from configs/sd15_unet.json (859,520,964 parameters, as published). The text encoder has
the sizes of SD 1.5's CLIP ViT-L/14 text tower (hidden 768, 12 layers, 12 heads, MLP 3072, quick-GELU)
over the tiny test tokenizer's vocabulary: its output feeds the U-Net's cross-attention exactly as
SD 1.5's does (77 tokens × 768). The VAE is the tiny test one: NeMo and the overhead benches never decode.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel

import workbench
from workbench.testing import tiny_pipeline

SD15_CONFIG = Path(__file__).resolve().parent / "configs" / "sd15_unet.json"


def sd15_unet(device: torch.device, dtype: torch.dtype, sample_size: int | None = None) -> torch.nn.Module:
    """The SD1.5 U-Net, random weights initialised on `device`; `sample_size` overrides the latent side (64)."""
    config = json.loads(SD15_CONFIG.read_text())
    if sample_size is not None:
        config["sample_size"] = sample_size
    with torch.device(device):  # initialise the 860 M random weights where they will run
        unet = diffusers.UNet2DConditionModel.from_config(config)
    return unet.to(dtype=dtype).eval()


def sd15_pipeline(device: torch.device, dtype: torch.dtype, sample_size: int | None = None) -> workbench.Model:
    """A Stable Diffusion pipeline with the SD1.5 U-Net and an SD1.5-size text encoder, random weights."""
    pipe = tiny_pipeline("unet")
    tokenizer = pipe.tokenizer
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                 num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
                                 max_position_embeddings=tokenizer.model_max_length,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    with torch.device(device):
        text_encoder = CLIPTextModel(text_config)
    pipe.register_modules(text_encoder=text_encoder.eval(), unet=sd15_unet(device, dtype, sample_size))
    pipe.to(device=device, dtype=dtype)  # the text encoder's dtype, and the tiny VAE alongside
    return workbench.load(pipe)
