"""`load`: open a diffusers text-to-image pipeline from a local folder (never the network)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from workbench.errors import WorkbenchError
from workbench.io import read_json
from workbench.models.adapter import ADAPTERS, adapter_for, supported_families
from workbench.models.model import DENOISER_COMPONENTS, Model, denoiser_component

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise WorkbenchError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise WorkbenchError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise WorkbenchError(f"device {device!r} does not exist ({torch.cuda.device_count()} GPUs); "
                             "use cuda:0 .. cuda:N-1")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise WorkbenchError(f"unsupported device {device!r}; use cpu, cuda or cuda:N")
    return parsed


def load(source: str | os.PathLike | Any, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, family: str = "auto") -> Model:
    """Open a pipeline folder (with `model_index.json`) offline, or wrap a pipeline object.

    A folder loads on `device` (default cpu) in `dtype` (default float32), safetensors only. A pipeline
    object is moved only if `device`/`dtype` are given. `family` forces an adapter (`"generic"` lists
    role-less sites for denoisers no adapter knows).
    """
    torch_dtype = parse_dtype(dtype) if dtype is not None else None
    target = parse_device(device) if device is not None else None
    if family != "auto" and family not in ADAPTERS:
        raise WorkbenchError(f"unknown family {family!r}; use one of: auto, {', '.join(ADAPTERS)}")
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        pipeline = _load_folder(folder, torch_dtype or torch.float32, family)
        torch_dtype = None  # already loaded in it
    else:
        folder = None
        pipeline = source
        if not hasattr(pipeline, "components"):
            raise WorkbenchError(f"cannot load a {type(source).__name__}; give a pipeline folder or a "
                                 "diffusers pipeline object")
    denoiser = getattr(pipeline, denoiser_component(pipeline))
    current = next(denoiser.parameters())
    moves = target is not None and target != current.device
    casts = torch_dtype is not None and torch_dtype != current.dtype
    if moves or casts:  # a no-op .to() still makes diffusers warn about fp32 modules
        pipeline.to(device=target, dtype=torch_dtype)
    pipeline.set_progress_bar_config(disable=True)
    adapter = adapter_for(denoiser, family)
    return Model(pipeline, adapter, source=folder)


def _load_folder(folder: Path, torch_dtype: torch.dtype, family: str) -> Any:
    if not folder.is_dir():
        raise WorkbenchError(f"model folder {folder} not found; give a local diffusers pipeline folder")
    if not (folder / "model_index.json").is_file():
        raise WorkbenchError(f"{folder} is not a diffusers pipeline folder (no model_index.json); "
                             "save one with pipeline.save_pretrained(folder)")
    index = read_json(folder / "model_index.json", "pipeline index")
    if not isinstance(index, dict) or "_class_name" not in index:
        raise WorkbenchError(f"{folder / 'model_index.json'} has no _class_name; it is not a pipeline index")
    _check_family(folder, index, family)
    # components saved as [null, null] (e.g. SD3 without T5, SD without safety checker) must be passed
    # as None explicitly, or diffusers refuses to build the pipeline
    absent = {name: None for name, spec in index.items()
              if isinstance(spec, list) and len(spec) == 2 and spec[0] is None}
    if "requires_safety_checker" in index and "safety_checker" in absent:
        absent["requires_safety_checker"] = False
    from diffusers import DiffusionPipeline

    try:
        with _library_progress_bars_off():
            return DiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                     dtype=torch_dtype, **absent)
    except Exception as err:  # diffusers raises OSError, ValueError, SafetensorError, ... for broken folders
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WorkbenchError(f"could not load the pipeline in {folder}: {reason[:300]}; check that the folder "
                             "is a complete diffusers pipeline with safetensors weights") from None


@contextmanager
def _library_progress_bars_off() -> Iterator[None]:
    """diffusers and transformers draw one bar per component and per weight file: noise beside ours."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    were_on = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in were_on:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, on in were_on:
            if on:
                lib.enable_progress_bar()


def _check_family(folder: Path, index: dict, family: str) -> None:
    """Fail before loading any weights if the denoiser class is unsupported."""
    if family != "auto":
        return
    for name in DENOISER_COMPONENTS:
        spec = index.get(name)
        if isinstance(spec, list) and len(spec) == 2 and spec[1]:
            if any(spec[1] in cls.denoiser_classes for cls in ADAPTERS.values()):
                return
            raise WorkbenchError(f"unsupported denoiser {spec[1]} in {folder}; supported: {supported_families()} "
                                 "(or pass family='generic' for role-less Linear/Conv sites)")
    raise WorkbenchError(f"{folder} has no denoiser (unet or transformer) in model_index.json; "
                         "load a text-to-image pipeline")
