"""Training the testbed from scratch: the shared VAE, then one denoiser (+ its text encoders) per family.

Objectives follow each family's scheduler (`workbench.noising`): v-prediction on a zero-terminal-SNR
schedule (Salimans & Ho 2022 §4; Lin et al. 2024) for the U-Net and PixArt, see `models.DDIM_SCHEDULE`;
rectified flow (Esser et al. 2024, SD3 paper, eq. 2 with uniform or logit-normal t) for the MMDiT, whose velocity
target is ε − x₀. Text is encoded with the pipeline's own `encode_prompt`, so training sees
exactly the embeddings inference will; 10 % of captions are dropped to "" for classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from workbench.errors import WorkbenchError
from workbench.models.loading import load
from workbench.noising import noised, sample_timesteps
from workbench.testbed.training import LoopConfig, train


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float in [−1, 1], the range diffusers VAEs use."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise WorkbenchError(f"expected (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}")
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # copy: may be read-only


@dataclass(frozen=True)
class VAEConfig:
    loop: LoopConfig
    batch_size: int = 32
    kl_weight: float = 1e-6


def train_vae(vae: AutoencoderKL, images: np.ndarray, config: VAEConfig, state_dir: Path,
              show_progress: bool = True) -> list[float]:
    """Reconstruction (MSE) plus a small KL term; afterwards `scaling_factor` = 1 / std of the latents."""
    pixels = images_to_tensor(images).to(vae.device)

    def loss_of_step(generator: torch.Generator) -> torch.Tensor:  # draws on the CPU: the same batches on any device
        batch = pixels[torch.randint(len(pixels), (config.batch_size,), generator=generator).to(pixels.device)]
        posterior = vae.encode(batch).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(batch.device)
        latents = posterior.mean + posterior.std * noise
        reconstruction = vae.decode(latents).sample
        return F.mse_loss(reconstruction, batch) + config.kl_weight * posterior.kl().mean()

    losses = train({"vae": vae}, loss_of_step, config.loop, state_dir, "training VAE", show_progress)
    vae.register_to_config(scaling_factor=float(1 / encode_latents(vae, images, scaled=False).std()))
    return losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, scaled: bool = True) -> torch.Tensor:
    """Posterior means of the images, times the VAE's scaling factor (minus its shift), as pipelines expect."""
    pixels = images_to_tensor(images).to(vae.device)
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    if not scaled:
        return latents
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


@dataclass(frozen=True)
class DenoiserConfig:
    loop: LoopConfig
    batch_size: int = 32
    caption_dropout: float = 0.1
    flow_sampling: str = "uniform"  # training timesteps of flow-matching denoisers (`noising.sample_timesteps`)
    offset_noise: float = 0.0  # std of a per-(image, channel) constant added to the noise (`offset`)

    def __post_init__(self) -> None:
        if not 0 <= self.caption_dropout < 1 or self.batch_size < 1:
            raise WorkbenchError("caption_dropout must be in [0, 1) and batch_size at least 1")
        check_offset_noise(self.offset_noise)


def check_offset_noise(std: float) -> float:
    """`std` of `offset`, in [0, 1]."""
    if not 0 <= std <= 1:
        raise WorkbenchError(f"offset noise {std} is out of range; give a std in [0, 1] (0.1 is usual)")
    return std


def offset(noise: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Offset noise (Guttenberg 2023, "Diffusion with offset noise"): ε + std·n with one n ~ N(0, 1) per
    image and channel, spatially constant, so the model learns that an image's mean colour is noise at the
    last steps instead of reading it as signal. Draws nothing at std 0 (earlier runs stay bit-identical)."""
    if std == 0:
        return noise
    shift = torch.randn(noise.shape[:2] + (1,) * (noise.ndim - 2), generator=generator).to(noise)
    return noise + std * shift


def denoiser_loss(model: Any, latents: torch.Tensor, captions: list[str], config: DenoiserConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """The training loss of one batch drawn from `generator` (MSE to the scheduler's target); the draws
    are made on the CPU and moved to the latents' device, so every device trains on the same batches."""
    pipe = model.pipeline
    index = torch.randint(len(latents), (config.batch_size,), generator=generator)
    dropped = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
    prompts = ["" if drop else captions[i] for i, drop in zip(index.tolist(), dropped.tolist())]
    clean = latents[index.to(latents.device)]
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    timestep = sample_timesteps(pipe.scheduler, config.batch_size, generator, config.flow_sampling).to(clean.device)
    noise = offset(noise, config.offset_noise, generator)
    noisy, target = noised(pipe.scheduler, clean, noise, timestep)
    cond = model.adapter.encode(pipe, prompts, "", False, model.adapter.max_sequence_length(pipe))
    return F.mse_loss(model.adapter.denoise(model.denoiser, noisy, timestep, cond), target)


def train_denoiser(pipe: Any, latents: torch.Tensor, captions: list[str], config: DenoiserConfig,
                   state_dir: Path, show_progress: bool = True) -> list[float]:
    """Train the pipeline's denoiser and text encoders in place on (latent, caption) pairs."""
    if len(latents) != len(captions) or not captions:
        raise WorkbenchError(f"{len(latents)} latents for {len(captions)} captions; give one caption per image")
    model = load(pipe)
    modules = {"denoiser": model.denoiser, **{name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2")
                                              if getattr(pipe, name, None) is not None}}
    return train(modules, lambda generator: denoiser_loss(model, latents, captions, config, generator),
                 config.loop, state_dir, f"training {model.family}", show_progress)
