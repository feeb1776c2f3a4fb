"""Learned image similarities for replication checks, from local weights only (nothing is downloaded).

- **CLIP** (Radford et al. 2021): cosine similarity of the image embeddings of a local transformers
  CLIP folder (`CLIPVisionModelWithProjection`, safetensors), as used for replication by Somepalli et
  al. (CVPR 2023) beside SSCD. Images are resized to the model's input size (bicubic) and normalised
  with the CLIP mean and std, as `CLIPImageProcessor` does for square images.
- **SSCD** (Pizzi et al. 2022) is published only as TorchScript, which is a pickle: we do not load it.
- **LPIPS** (Zhang et al. 2018) needs torchvision backbones, which are not a dependency.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError

LEARNED_METRICS = ("clip", "sscd", "lpips")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_UNSUPPORTED = {
    "sscd": "SSCD is published only as TorchScript, which unpickles when loaded; use clip (a local CLIP folder) "
            "or the SSIM / L2 metrics",
    "lpips": "LPIPS needs torchvision backbones, which workbench does not depend on; use clip (a local CLIP "
             "folder) or the SSIM / L2 metrics",
}


def check_learned_metric(metric: str, weights: str | Path | None) -> None:
    """Fail early, in one line, for a learned similarity that cannot run."""
    if metric not in LEARNED_METRICS:
        raise WorkbenchError(f"unknown learned metric {metric!r}; use one of {', '.join(LEARNED_METRICS)}")
    if metric in _UNSUPPORTED:
        raise WorkbenchError(_UNSUPPORTED[metric])
    if weights is None:
        raise WorkbenchError(f"{metric} needs local weights (nothing is downloaded); pass the path to a local "
                             f"CLIP folder (config.json + model.safetensors), or use the SSIM / L2 metrics")
    if not (Path(weights) / "config.json").is_file():
        raise WorkbenchError(f"{weights} is not a local CLIP folder (no config.json); give the folder that "
                             "`CLIPVisionModelWithProjection.save_pretrained` wrote")


@lru_cache(maxsize=2)
def _clip_model(folder: str):
    from transformers import CLIPVisionModelWithProjection

    try:
        model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise WorkbenchError(f"cannot load CLIP from {folder}: {str(error).splitlines()[0]}; "
                             "give a folder with config.json and model.safetensors") from None
    return model.eval()


@torch.no_grad()
def clip_embeddings(images: torch.Tensor, folder: str | Path, batch_size: int = 64) -> torch.Tensor:
    """Unit-norm CLIP image embeddings of (n, 3, H, W) images in [0, 1]."""
    model = _clip_model(str(folder))
    size = model.config.image_size
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    out = []
    for chunk in images.float().split(batch_size):
        pixels = F.interpolate(chunk, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        pixels = (pixels.clamp(0, 1) - mean.to(chunk)) / std.to(chunk)
        out.append(F.normalize(model(pixel_values=pixels.to(model.dtype)).image_embeds.float(), dim=-1))
    return torch.cat(out)


def learned_similarity(generated: torch.Tensor, training: torch.Tensor, metric: str,
                       weights: str | Path | None = None) -> torch.Tensor:
    """(n, m) similarity of every generated image to every training image (higher = more alike)."""
    check_learned_metric(metric, weights)
    return clip_embeddings(generated, weights) @ clip_embeddings(training, weights).T
