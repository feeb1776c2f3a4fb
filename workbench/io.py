"""Atomic file writes: write beside the target, then rename, so an interrupted write loses nothing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from workbench.errors import WorkbenchError


def folder_writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


def check_writable(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fail early, before any work, if `path` cannot be written (missing folder, exists, read-only)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise WorkbenchError(f"{path} already exists; choose another path or pass overwrite")
    if path.is_dir():
        raise WorkbenchError(f"{path} is a folder; give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise WorkbenchError(f"folder {parent} does not exist; create it first")
    if not folder_writable(parent):
        raise WorkbenchError(f"folder {parent} is not writable; choose another output path")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call `write(tmp_path)` on a temporary file next to `path`, then rename it into place."""
    path = check_writable(path, overwrite=overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, data: Any, *, overwrite: bool = False) -> Path:
    """Stable JSON (sorted keys, two-space indent, trailing newline)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n", overwrite=overwrite)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"{what} {path} not found; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorkbenchError(f"{what} {path} is not valid JSON ({err.msg if hasattr(err, 'msg') else err}); "
                             "restore it or write it again") from None


def read_rgb_images(paths: Sequence[str | os.PathLike], what: str = "image") -> torch.Tensor:
    """(N, 3, H, W) float in [0, 1] from image files of one size; a missing, unreadable or differently
    sized file is a one-line error."""
    from PIL import Image, UnidentifiedImageError

    arrays: list[np.ndarray] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise WorkbenchError(f"{what} {path} not found; check the path")
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except (UnidentifiedImageError, OSError) as err:
            raise WorkbenchError(f"{what} {path} is not a readable image ({err}); give a PNG or JPEG") from None
        if arrays[-1].shape != arrays[0].shape:
            raise WorkbenchError(f"{what} {path} is {arrays[-1].shape[1]}×{arrays[-1].shape[0]} but the first is "
                                 f"{arrays[0].shape[1]}×{arrays[0].shape[0]}; give images of one size")
    if not arrays:
        raise WorkbenchError(f"no {what} paths given; list one path per line")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], file_format: str, *,
                 overwrite: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Atomic safetensors write tagged `workbench.format` (and `format: pt`, as diffusers expects)."""
    meta = {"format": "pt", "workbench.format": file_format, **(metadata or {})}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), overwrite=overwrite)


def load_tensors(path: str | os.PathLike, file_format: str, what: str, writer: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file written by `save_tensors` with this format; one-line errors otherwise."""
    if not os.path.isfile(path):
        raise WorkbenchError(f"{what} {path} not found; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("workbench.format") != file_format:
                raise WorkbenchError(f"{path} is not a workbench {what} ({file_format}); write it with {writer}")
            return {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as err:
        raise WorkbenchError(f"{what} {path} is corrupt ({err}); write it again") from None


def save_pretrained_atomically(pipeline: Any, out: Path) -> Path:
    """`pipeline.save_pretrained` into a fresh hidden sibling folder, then rename it to `out`.

    diffusers cleans the folder it saves into, so it never sees a user's folder; an interrupted save
    leaves `out` absent. `out` must not exist or be an empty folder (callers check first).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex}"
    # pipelines without an optional component (SD3 without T5) log that it "cannot be saved": expected
    save_logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    level = save_logger.level
    save_logger.setLevel(logging.ERROR)
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        save_logger.setLevel(level)
    return out
