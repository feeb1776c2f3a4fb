"""Content hashes that tie a result to exactly the model and prompts it came from."""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from workbench.models.model import Model

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def model_tensor_hash(model: Model) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the denoiser's and text encoders' tensors.

    Two models hash alike only if every weight that shapes a denoising step is bit-identical; the VAE
    is left out (it never changes what localization or edits see). Computed afresh on every call,
    since edits change the weights in place.
    """
    digest = hashlib.sha256()
    modules = [("denoiser", model.denoiser)] + [(name, getattr(model.pipeline, name)) for name in TEXT_ENCODERS
                                                if getattr(model.pipeline, name, None) is not None]
    for prefix, module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{prefix}.{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def prompt_set_hash(prompts: Sequence[str]) -> str:
    """sha256 of the prompts, in order, one per line (UTF-8)."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
