"""Build a testbed checkpoint end to end: data → shared VAE → one family's denoiser → diffusers folder.

All intermediate state lives in a work folder (resumable); the finished pipeline is written to a
temporary sibling of `out` and renamed into place, so `out` is either complete or absent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.io import save_pretrained_atomically
from workbench.models.loading import parse_device
from workbench.noising import check_flow_sampling
from workbench.testbed.captions import VOCABULARY
from workbench.testbed.dataset import build_dataset
from workbench.testbed.models import (TEXT_TOKENS, UNET_CHANNELS, build_pipeline, build_vae, check_objective,
                                      check_unet_channels)
from workbench.testbed.train import (DenoiserConfig, VAEConfig, check_offset_noise, encode_latents, train_denoiser,
                                     train_vae)
from workbench.testbed.training import LoopConfig
from workbench.testing import build_clip_tokenizer


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines a testbed checkpoint (the training command's options)."""

    family: str
    steps: int = 6000
    lr: float = 1e-3
    batch_size: int = 32
    vae_steps: int = 1500
    vae_lr: float = 1e-3
    data_size: int = 8192
    seed: int = 0
    final_lr_fraction: float = 0.1  # the denoiser's cosine-decay floor, as the shipped runs (1.0: constant)
    flow_sampling: str = "uniform"  # training timesteps of the flow-matching family (mmdit) only
    objective: str = "v-zero-snr"  # noise schedule and target of the DDPM-type families (`models.OBJECTIVES`)
    offset_noise: float = 0.0  # `train.offset`; 0 as the shipped runs
    unet_channels: tuple[int, ...] = UNET_CHANNELS  # the U-Net's block_out_channels

    def __post_init__(self) -> None:
        check_flow_sampling(self.flow_sampling)
        check_objective(self.family, self.objective)
        check_unet_channels(self.family, self.unet_channels)
        check_offset_noise(self.offset_noise)
        if self.flow_sampling != "uniform" and self.family != "mmdit":
            raise WorkbenchError(f"--flow-sampling applies to the flow-matching family (mmdit) only, "
                                 f"not {self.family}; leave it at uniform")


VARIANTS: dict[str, BuildConfig] = {"unet-eps": BuildConfig("unet", objective="epsilon", offset_noise=0.1)}
"""Checkpoints shipped beside the families' defaults, by folder name: `unet-eps` is the U-Net with SD 1.x's
ε-objective and offset noise, the setting NeMo's noise-consistency score assumes (README, Localization)."""


def variant_record(name: str) -> dict[str, Any]:
    """testbed.json's entry for the variant `name`: what it changes and the command that trains it."""
    config = VARIANTS[name]
    changed = {field: getattr(config, field) for field in ("objective", "offset_noise")}
    options = [f"--{field.replace('_', '-')} {value}" for field, value in changed.items()
               if value != getattr(BuildConfig(config.family), field)]
    command = " ".join(["workbench testbed train", config.family, *options, f"--out checkpoints/{name}"])
    return {"family": config.family, **changed, "train": command}


def build_checkpoint(config: BuildConfig, out: Path, work: Path, show_progress: bool = True,
                     device: str = "cpu") -> Path:
    """Train (or resume) and save the testbed pipeline of `config.family` to `out`, training on `device`.

    Weights are initialised and batches drawn on the CPU, so every device starts from the same model
    and sees the same data; a run is deterministic on one device, and a state saved on one device
    resumes on another.
    """
    target = parse_device(device)
    if out.exists():
        raise WorkbenchError(f"{out} already exists; choose a new output folder")
    data = build_dataset(config.seed, config.data_size)
    vae = build_vae(config.seed).to(target)
    vae_config = VAEConfig(LoopConfig(steps=config.vae_steps, lr=config.vae_lr, seed=config.seed))
    vae_tag = settings_tag(vae=vae.config, batch_size=vae_config.batch_size, kl_weight=vae_config.kl_weight)
    train_vae(vae, data.images, vae_config, work / f"vae-{data.fingerprint()[:12]}-{vae_tag}", show_progress)
    tokenizer = build_clip_tokenizer(VOCABULARY, model_max_length=TEXT_TOKENS)
    pipe = build_pipeline(config.family, tokenizer, vae, config.seed, config.objective,
                          config.unet_channels).to(target)
    train_denoiser(pipe, encode_latents(vae, data.images), data.captions,
                   DenoiserConfig(LoopConfig(steps=config.steps, lr=config.lr, seed=config.seed,
                                             final_lr_fraction=config.final_lr_fraction),
                                  batch_size=config.batch_size, flow_sampling=config.flow_sampling,
                                  offset_noise=config.offset_noise),
                   work / denoiser_state_name(config, data.fingerprint(), pipe), show_progress)
    return save_pipeline(pipe, out)


def denoiser_state_name(config: BuildConfig, data_fingerprint: str, pipe: Any) -> str:
    """The work-folder entry of one denoiser run: a run never resumes one trained with another noise
    schedule or prediction target, architecture (denoiser and text encoders) or batch size."""
    tag = settings_tag(batch_size=config.batch_size, **run_settings(pipe))
    sampling = "" if config.flow_sampling == "uniform" else f"-{config.flow_sampling}"
    shifted = "" if config.offset_noise == 0 else f"-offset{config.offset_noise:g}"
    return f"{config.family}-{data_fingerprint[:12]}-{tag}{sampling}{shifted}"


def run_settings(pipe: Any) -> dict[str, Any]:
    """The configs a denoiser run trains under: noise schedule, denoiser and trained text encoders."""
    parts = ("scheduler", "unet", "transformer", "text_encoder", "text_encoder_2")
    return {name: getattr(pipe, name).config for name in parts if getattr(pipe, name, None) is not None}


def settings_tag(**settings: Any) -> str:
    """8 hex digits of the settings a saved state must share beyond its loop settings (LoopConfig is
    checked on load). Model configs count by their public keys, not by the library versions, storage dtype
    or class annotations that saving adds to them."""
    public = {name: _public(value) for name, value in settings.items()}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:8]


_SAVE_ANNOTATIONS = {"dtype", "torch_dtype", "architectures"}


def _public(value: Any) -> Any:
    mapping = value.to_dict() if hasattr(value, "to_dict") else value  # transformers configs
    if not isinstance(mapping, dict):
        return value
    return {key: item for key, item in mapping.items()
            if not key.startswith("_") and not key.endswith("_version") and key not in _SAVE_ANNOTATIONS}


def save_pipeline(pipe, out: Path) -> Path:
    """Save atomically (`save_pretrained_atomically`).

    The denoiser and the VAE are stored in float16 (the shipped folders stay under 15 MB; plain
    `from_pretrained` loads them back in float32); the tiny text encoders stay float32, because
    transformers would load them in the stored dtype.
    """
    halved = [getattr(pipe, name) for name in ("unet", "transformer", "vae") if getattr(pipe, name, None) is not None]
    try:
        for module in halved:
            module.to(torch.float16)
        return save_pretrained_atomically(pipe, out)
    finally:
        for module in halved:
            module.to(torch.float32)
