"""The testbed's model families: small members of the SD / PixArt / SD3 families, sized for CPU training.

Images are 32×32 RGB; one shared 2× VAE maps them to 16×16×4 latents, the size at which a few-million
parameter denoiser trains at a few steps per second on two CPU cores (../shared/design.md). Text
encoders are trained jointly with the denoiser: tiny random encoders map captions that differ in one
word to nearly the same embedding, which would leave the denoiser nothing to follow.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, PixArtAlphaPipeline,
                       PixArtTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel)

from workbench.errors import WorkbenchError

IMAGE_SIZE = 32
LATENT_SIZE = 16
LATENT_CHANNELS = 4
TEXT_TOKENS = 32  # captions are short; the pipelines pad text to this length
FAMILIES = ("unet", "dit", "mmdit")
UNET_CHANNELS = (32, 64, 128)
"""The shipped U-Net's `block_out_channels`; the last two levels hold its cross-attention (value) sites."""
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
DDIM_SCHEDULE = dict(_SD_BETAS, rescale_betas_zero_snr=True, prediction_type="v_prediction")
"""The noise schedule of both DDPM-type families (U-Net and PixArt): SD's scaled_linear betas rescaled to
zero terminal SNR, trailing timesteps and v-prediction (Lin et al. 2024, "Common diffusion noise schedules
and sample steps are flawed", Alg. 1 and §3.2–3.3; Salimans & Ho 2022 for v). Why, measured on the U-Net:
with plain scaled_linear and ε-prediction, √ᾱ ≈ 0.085 of the image survives at the last training step on
16×16 latents, as much as the spatial mean of the noise, so the seed tinted every generation and memorized
captions came back at a mean replication SSIM of 0.67 (6,000 steps); DDPM's linear schedule (PixArt's own)
was worse (0.28, stripe artefacts: ε errors divided by √ᾱ ≈ 0.009 in the first DDIM steps). With zero
terminal SNR the first step sees pure noise, so the caption alone decides the image's layout and colours."""

EPSILON_SCHEDULE = dict(_SD_BETAS, prediction_type="epsilon")
"""SD 1.x's own objective (ε-prediction on scaled_linear betas, non-zero terminal SNR): the setting NeMo's
noise-consistency score assumes (Hintersdorf et al. 2024 §3). On its own it tints generations by the
seed (above); trained with offset noise (`BuildConfig.offset_noise`) the U-Net reproduces most memorized
photos and NeMo's search can confirm a removal (README, Localization)."""
OBJECTIVES = {"v-zero-snr": DDIM_SCHEDULE, "epsilon": EPSILON_SCHEDULE}


def build_vae(seed: int) -> AutoencoderKL:
    """2× AutoencoderKL, 32×32×3 → 16×16×4."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
                         sample_size=IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0)


def _clip_text(tokenizer: CLIPTokenizer, hidden: int, with_projection: bool, layers: int = 2) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=TEXT_TOKENS,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=hidden)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def check_unet_channels(family: str, channels: tuple[int, ...]) -> tuple[int, ...]:
    """Three positive multiples of 32 (the U-Net's group norm), for the U-Net family only."""
    if len(channels) != 3 or any(width <= 0 or width % 32 for width in channels):
        raise WorkbenchError(f"unet channels {','.join(map(str, channels))} are not three multiples of 32; "
                             f"use e.g. {','.join(map(str, UNET_CHANNELS))}")
    if family != "unet" and tuple(channels) != UNET_CHANNELS:
        raise WorkbenchError(f"--unet-channels applies to the unet family only, not {family}; leave it out")
    return tuple(channels)


def _sd_pipeline(tokenizer: CLIPTokenizer, vae: AutoencoderKL, schedule: dict[str, Any],
                 channels: tuple[int, ...]) -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=channels, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=32)
    scheduler = DDIMScheduler(**schedule)
    return StableDiffusionPipeline(vae=vae, text_encoder=_clip_text(tokenizer, 64, False), tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _pixart_pipeline(tokenizer: CLIPTokenizer, vae: AutoencoderKL,
                     schedule: dict[str, Any]) -> PixArtAlphaPipeline:
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    transformer = PixArtTransformer2DModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=2 * LATENT_CHANNELS, patch_size=2,
        num_layers=8, num_attention_heads=4, attention_head_dim=32, cross_attention_dim=128, caption_channels=64,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6)
    scheduler = DDIMScheduler(**schedule)
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=scheduler)


def _zero_t5(tokenizer: CLIPTokenizer, hidden: int) -> T5EncoderModel:
    """SD3's third text encoder as a one-layer T5 whose final norm is zero: it outputs exactly the zeros
    that `StableDiffusion3Pipeline` puts in T5's place when it has none, so the MMDiT is trained on
    CLIP alone, yet its folder loads with a bare `DiffusionPipeline.from_pretrained(folder)` (diffusers
    0.42 refuses an SD3 folder without T5 unless the caller names the absent parts). Never trained."""
    encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=hidden, num_layers=1,
                                      num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    with torch.no_grad():
        encoder.encoder.final_layer_norm.weight.zero_()
    return encoder.requires_grad_(False)


def _sd3_pipeline(tokenizer: CLIPTokenizer, vae: AutoencoderKL) -> StableDiffusion3Pipeline:
    """Two three-layer 64-d CLIPs and eight joint blocks. SD3's pipeline feeds the joint attention each
    CLIP's penultimate hidden state, so the two-layer 32-d CLIPs and six blocks shipped before gave it one
    causal layer of 32-d tokens, and that MMDiT followed 73 % of ordinary captions (testbed bar 80 %);
    this one follows 83 % (README, Testbed)."""
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=8, num_attention_heads=4, attention_head_dim=32, joint_attention_dim=128,
        caption_projection_dim=128, pooled_projection_dim=128, pos_embed_max_size=LATENT_SIZE // 2)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                                    vae=vae, text_encoder=_clip_text(tokenizer, 64, True, layers=3),
                                    tokenizer=tokenizer, text_encoder_2=_clip_text(tokenizer, 64, True, layers=3),
                                    tokenizer_2=tokenizer, text_encoder_3=_zero_t5(tokenizer, 128),
                                    tokenizer_3=tokenizer)




def check_objective(family: str, objective: str) -> str:
    """`objective` names a DDPM-type schedule (`OBJECTIVES`); the flow-matching family has only its own."""
    if objective not in OBJECTIVES:
        raise WorkbenchError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    if family == "mmdit" and objective != "v-zero-snr":
        raise WorkbenchError("the mmdit trains by rectified flow only; leave --objective at v-zero-snr")
    return objective


def build_pipeline(family: str, tokenizer: CLIPTokenizer, vae: AutoencoderKL, seed: int,
                   objective: str = "v-zero-snr", unet_channels: tuple[int, ...] = UNET_CHANNELS) -> Any:
    """A fresh (randomly initialised) testbed pipeline of `family` around a trained VAE; `objective` picks
    the noise schedule and prediction target of the DDPM-type families (U-Net, DiT), `unet_channels` the
    U-Net's widths."""
    if family not in FAMILIES:
        raise WorkbenchError(f"unknown testbed family {family!r}; use one of {', '.join(FAMILIES)}")
    schedule = OBJECTIVES[check_objective(family, objective)]
    channels = check_unet_channels(family, unet_channels)
    torch.manual_seed(seed)
    if family == "mmdit":
        pipe = _sd3_pipeline(tokenizer, vae)
    elif family == "dit":
        pipe = _pixart_pipeline(tokenizer, vae, schedule)
    else:
        pipe = _sd_pipeline(tokenizer, vae, schedule, channels)
    pipe.set_progress_bar_config(disable=True)
    return pipe
