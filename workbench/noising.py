"""The forward (noising) process of a pipeline's scheduler, and the target its denoiser is trained on.

DDPM-type schedulers (Ho et al. 2020, eq. 4): x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε with target ε (or
v = √ᾱ_t ε − √(1−ᾱ_t) x₀ for v-prediction, Salimans & Ho 2022 §4). Flow matching (SD3; Esser et
al. 2024, eq. 2): x_σ = (1−σ) x₀ + σ ε with target ε − x₀, at timestep 1000·σ.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from workbench.errors import WorkbenchError


def is_flow(scheduler: Any) -> bool:
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


FLOW_SAMPLINGS = ("uniform", "logit-normal")


def check_flow_sampling(name: str) -> str:
    if name not in FLOW_SAMPLINGS:
        raise WorkbenchError(f"unknown flow timestep sampling {name!r}; use one of {', '.join(FLOW_SAMPLINGS)}")
    return name


def sample_timesteps(scheduler: Any, batch: int, generator: torch.Generator,
                     flow_sampling: str = "uniform") -> torch.Tensor:
    """Training timesteps: integers 0..T−1 uniformly (DDPM-type), or 1000·σ for flow matching with
    σ ~ U(0, 1) (`uniform`) or σ = sigmoid(n), n ~ N(0, 1) (`logit-normal`: Esser et al. 2024 §3.1,
    logit-normal sampling with m = 0, s = 1, the setting SD3 is trained with)."""
    if is_flow(scheduler):
        if check_flow_sampling(flow_sampling) == "logit-normal":
            return torch.sigmoid(torch.randn(batch, generator=generator)) * 1000
        return torch.rand(batch, generator=generator) * 1000
    return torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=generator)


def noised(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor,
           timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, training target) for latents `clean` at per-sample `timestep`."""
    if is_flow(scheduler):
        sigma = (timestep.float() / 1000).view(-1, *[1] * (clean.ndim - 1)).to(clean)
        return (1 - sigma) * clean + sigma * noise, noise - clean
    schedule = DDPMScheduler.from_config(scheduler.config)
    noisy = schedule.add_noise(clean, noise, timestep)
    if schedule.config.prediction_type == "v_prediction":
        return noisy, schedule.get_velocity(clean, noise, timestep)
    return noisy, noise
