"""SalUn weight saliency: which weights the forgetting loss leans on.

Fan, Liu, Zhang, Wong, Wei, Liu, "SalUn: Empowering Machine Unlearning via Gradient-based Weight
Saliency in Both Image Classification and Generation", ICLR 2024, §4 eq. 6 (saliency map
m_S = 1[|∇_θ ℓ_f(θ; D_f)| ≥ γ]) with the Stable Diffusion forgetting loss of the reference code
(generate_mask.py; shared/research/edits.md §3.1): over the forget set (images x₀ with captions c_f),
t ~ U{0..T−1}, ε ~ N(0, I),

    ε̃ = (1 + w) ε_θ(x_t, c_f) − w ε_θ(x_t, ∅)     (w = 7.5: the CFG-combined prediction)
    G = Σ_batches ∇_θ [ −MSE(target, ε̃) ],          S = |G|

and the mask keeps the top `fraction` (default 50 %) of S over all weights (`per_layer=True`: within
each site; `roles`: only those sites, like SalUn's `xattn` mode). Our scope: the weights of the graph's
sites (every Linear / Conv weight: the U-Net's parameters but for biases and norms, under 1 % of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from localization.sharding import Shard
from workbench.errors import WorkbenchError
from workbench.graph import parse_role
from workbench.models.model import Model
from workbench.neurons import WeightMask
from workbench.noising import noised, sample_timesteps
from workbench.sampling import encode


@dataclass(frozen=True)
class SalUnConfig:
    fraction: float = 0.5  # share of weights kept as salient (the reference's threshold 0.5)
    guidance_scale: float = 7.5  # w of the CFG-combined prediction (c_guidance)
    batch_size: int = 8
    repeats: int = 1  # passes over the forget set (the reference makes one)
    per_layer: bool = False
    roles: tuple[str, ...] | None = None  # None = every site with a weight
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1 or self.batch_size < 1 or self.repeats < 1:
            raise WorkbenchError("fraction must be in (0, 1], batch_size and repeats >= 1")
        for role in self.roles or ():
            parse_role(role)


@torch.no_grad()
def encode_images(model: Model, images: torch.Tensor) -> torch.Tensor:
    """VAE latents (posterior means, scaled and shifted as the pipeline expects) of (N, 3, H, W) images in [0, 1]."""
    vae = model.pipeline.vae
    pixels = (images.to(model.device, vae.dtype) * 2 - 1)
    latents = vae.encode(pixels).latent_dist.mean
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def forget_gradients(model: Model, images: torch.Tensor, captions: Sequence[str],
                     config: SalUnConfig = SalUnConfig(), shard: Shard = Shard()) -> dict[str, torch.Tensor]:
    """G: per site weight, the gradient of −MSE(target, ε̃) summed over every forget batch.

    Every batch's noise and timesteps are drawn up front from one generator seeded `seed`, so a
    sharded run (`shard`: each process takes every count-th batch; the sums are then added) sees the
    same batches as one process; its G differs only by the order of floating-point additions.
    """
    if images.ndim != 4 or len(images) != len(captions) or not len(captions):
        raise WorkbenchError(f"give one caption per forget image ({len(images)} images, {len(captions)} captions)")
    sites = [s for s in model.graph.select(roles=list(config.roles) if config.roles else None) if s.weight_shape]
    if not sites:
        raise WorkbenchError("no site with a weight matches the roles; check SalUnConfig.roles")
    weights = {s.path: model.module(s.path).weight for s in sites}
    latents = encode_images(model, images)
    generator = torch.Generator().manual_seed(config.seed)
    batches = []
    for _ in range(config.repeats):
        for start in range(0, len(captions), config.batch_size):
            shape = latents[start:start + config.batch_size].shape
            noise = torch.randn(shape, generator=generator)
            batches.append((start, noise, sample_timesteps(model.pipeline.scheduler, shape[0], generator)))
    gradients = {path: torch.zeros_like(w, dtype=torch.float32) for path, w in weights.items()}
    flags = {p: p.requires_grad for p in model.denoiser.parameters()}
    for parameter in model.denoiser.parameters():
        parameter.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    try:
        for position in shard.positions(len(batches)):
            start, noise, timestep = batches[position]
            clean = latents[start:start + config.batch_size]
            prompts = list(captions[start:start + config.batch_size])
            timestep = timestep.to(model.device)
            noisy, target = noised(model.pipeline.scheduler, clean, noise.to(clean), timestep)
            with torch.no_grad():
                cond = encode(model, prompts, cfg=True).kwargs
            out = model.adapter.denoise(model.denoiser, torch.cat([noisy, noisy]), torch.cat([timestep, timestep]),
                                        cond)
            uncond, text = out.float().chunk(2)
            combined = (1 + config.guidance_scale) * text - config.guidance_scale * uncond
            loss = -F.mse_loss(combined, target.float())
            grads = torch.autograd.grad(loss, list(weights.values()))
            for path, grad in zip(weights, grads):
                gradients[path] += grad.float()
    finally:
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
    if shard.count == 1:
        return gradients
    parts = shard.gather([{path: g.cpu() for path, g in gradients.items()}])
    return {path: torch.stack([part[path] for part in parts]).sum(0).to(model.device) for path in gradients}


def top_fraction(scores: dict[str, torch.Tensor], fraction: float, per_layer: bool = False) -> WeightMask:
    """Exactly int(fraction · n) top scores, over all sites together or within each site."""
    if per_layer:
        return WeightMask({path: _top(s.flatten(), fraction).view_as(s) for path, s in scores.items()})
    flat = torch.cat([s.flatten() for s in scores.values()])
    mask, offset, out = _top(flat, fraction), 0, {}
    for path, s in scores.items():
        out[path] = mask[offset:offset + s.numel()].view_as(s)
        offset += s.numel()
    return WeightMask(out)


def _top(values: torch.Tensor, fraction: float) -> torch.Tensor:
    k = int(fraction * values.numel())
    mask = torch.zeros_like(values, dtype=torch.bool)
    if k:
        mask[torch.topk(values.float().cpu(), k).indices] = True
    return mask


def saliency_mask(model: Model, images: torch.Tensor, captions: Sequence[str],
                  config: SalUnConfig = SalUnConfig(), shard: Shard = Shard()) -> WeightMask:
    """SalUn's mask: the top `fraction` of |G| (module docstring); `shard` splits the forget batches."""
    gradients = forget_gradients(model, images, captions, config, shard)
    return top_fraction({p: g.abs().cpu() for p, g in gradients.items()}, config.fraction, config.per_layer)
