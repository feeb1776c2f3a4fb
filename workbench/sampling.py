"""Sampling helpers: encode prompts as the pipeline does, predict at one timestep, generate.

All seeded and deterministic on the CPU. Prompt i of a batch always uses seed `seed + i`, so an
image does not depend on which other prompts share its batch.
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.io import atomic_write
from workbench.models.model import Model


@dataclass
class Conditioning:
    """Denoiser inputs for `prompts`; with `cfg`, rows are [negative prompts; prompts]."""

    prompts: list[str]
    cfg: bool
    kwargs: dict[str, torch.Tensor]


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise WorkbenchError("no prompts given; pass at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise WorkbenchError("prompts must be strings")
    return prompts


def pipeline_default(model: Model, name: str) -> Any:
    """The default of argument `name` of the pipeline's `__call__` (e.g. guidance_scale)."""
    parameter = inspect.signature(model.pipeline.__call__).parameters.get(name)
    return None if parameter is None else parameter.default


def uses_cfg(model: Model, guidance_scale: float) -> bool:
    """Whether the pipeline doubles the batch for classifier-free guidance at this scale."""
    return guidance_scale > 1 and not getattr(model.denoiser.config, "time_cond_proj_dim", None)


@contextmanager
def cfg_layout(model: Model, cfg: bool) -> Iterator[None]:
    """Tell interventions how the denoiser batch is laid out while the block runs."""
    previous, model.cfg_active = model.cfg_active, cfg
    try:
        yield
    finally:
        model.cfg_active = previous


@torch.no_grad()
def encode(model: Model, prompts: str | Sequence[str], *, negative_prompt: str = "", cfg: bool = True,
           max_sequence_length: int | None = None) -> Conditioning:
    """Encode prompts with the pipeline's own `encode_prompt`."""
    prompts = _check_prompts(prompts)
    kwargs = model.adapter.encode(model.pipeline, prompts, negative_prompt, cfg, max_sequence_length)
    return Conditioning(prompts, cfg, kwargs)


@torch.no_grad()
def predict(model: Model, latents: torch.Tensor, timestep: float | int | torch.Tensor,
            prompts: str | Sequence[str] | Conditioning, *, guidance_scale: float = 1.0,
            negative_prompt: str = "") -> torch.Tensor:
    """The denoiser's prediction (noise, or velocity for flow models) for each latent and prompt.

    With `guidance_scale > 1` this is the CFG combination `uncond + s·(cond − uncond)`, computed from
    one batched forward as the pipeline does.
    """
    cfg = uses_cfg(model, guidance_scale)
    cond = prompts if isinstance(prompts, Conditioning) else encode(model, prompts, negative_prompt=negative_prompt,
                                                                    cfg=cfg)
    if cond.cfg != cfg:
        raise WorkbenchError(f"the conditioning was encoded with cfg={cond.cfg} but guidance_scale="
                             f"{guidance_scale} needs cfg={cfg}; encode again with the right cfg")
    if latents.shape[0] != len(cond.prompts):
        raise WorkbenchError(f"{latents.shape[0]} latents for {len(cond.prompts)} prompts; give one latent per prompt")
    if not torch.isfinite(latents).all():
        raise WorkbenchError("latents contain NaN or infinite values; check how they were made")
    latents = latents.to(model.device, model.dtype)
    batch = torch.cat([latents, latents]) if cfg else latents
    with cfg_layout(model, cfg):
        out = model.adapter.denoise(model.denoiser, batch, torch.as_tensor(timestep, device=model.device), cond.kwargs)
    if not cfg:
        return out
    uncond, conditional = out.chunk(2)
    return uncond + guidance_scale * (conditional - uncond)


@torch.no_grad()
def generate(model: Model, prompts: str | Sequence[str], *, seed: int = 0, steps: int | None = None,
             guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
             negative_prompt: str | None = None, max_sequence_length: int | None = None,
             seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Run the pipeline with whatever interventions are active; images (n, 3, H, W) in [0, 1], on the CPU.

    Prompt i is generated from seed `seed + i`, or from `seeds[i]` when `seeds` is given. Unset
    arguments take the pipeline's own defaults.
    """
    prompts = _check_prompts(prompts)
    seeds = list(range(seed, seed + len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise WorkbenchError(f"give one seed per prompt ({len(prompts)} prompts, {len(seeds)} seeds)")
    guidance = guidance_scale if guidance_scale is not None else pipeline_default(model, "guidance_scale")
    if steps is not None and steps < 1:
        raise WorkbenchError(f"steps must be at least 1 (got {steps})")
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance, "height": height,
                              "width": width, "negative_prompt": negative_prompt,
                              "max_sequence_length": max_sequence_length or
                              model.adapter.max_sequence_length(model.pipeline)}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    device = model.device
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    with cfg_layout(model, uses_cfg(model, guidance)):
        images = model.pipeline(prompt=prompts, generator=generators, output_type="pt",
                                **model.adapter.pipeline_kwargs(), **kwargs).images
    images = images.float().cpu()
    if not torch.isfinite(images).all():
        raise WorkbenchError("generation produced NaN values; load in float32 (fp16 can overflow) or check the weights")
    return images


def save_image(image: torch.Tensor, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write one (3, H, W) image in [0, 1] as PNG, atomically."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), overwrite=overwrite)
