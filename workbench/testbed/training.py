"""A small, deterministic, resumable training loop shared by the testbed's VAE and denoisers.

Determinism without saving RNG state: every step draws its batch, noise and timesteps from a
generator seeded by (seed, step), so step k is the same whether the run was interrupted or not.
State (weights, AdamW moments, step) is saved with safetensors + JSON: never pickled.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from workbench.errors import WorkbenchError

STATE_FILE = "state.json"


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings of one training run."""

    steps: int
    lr: float = 3e-4
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 500
    final_lr_fraction: float = 1.0  # cosine decay after warm-up down to lr × this; 1.0 keeps lr constant

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.save_every < 1 or self.warmup < 0:
            raise WorkbenchError("training needs steps >= 1, lr > 0, save_every >= 1 and warmup >= 0")
        if not 0 <= self.final_lr_fraction <= 1:
            raise WorkbenchError("final_lr_fraction must be in [0, 1]")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        floor = self.final_lr_fraction
        return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random source of one step: a function of (seed, step) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def train(modules: dict[str, nn.Module], loss_of_step: Callable[[torch.Generator], torch.Tensor],
          config: LoopConfig, state_dir: Path, description: str = "training",
          show_progress: bool = True) -> list[float]:
    """Minimise `loss_of_step(generator)` over the parameters of `modules` with AdamW.

    Resumes from `state_dir` if it holds a state of the same config; returns the losses of the
    steps run in this call.
    """
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    start = load_state(state_dir, modules, optimizer, config)
    for module in modules.values():
        module.train()
    losses = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeRemainingColumn())
    with Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task(description, total=config.steps, completed=start, loss="-")
        for step in range(start, config.steps):
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            torch.manual_seed(config.seed * 1_000_003 + step)  # any library randomness (dropout) too
            loss = loss_of_step(step_generator(config.seed, step))
            if not torch.isfinite(loss):
                raise WorkbenchError(f"loss became {loss.item()} at step {step}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            progress.update(task, advance=1, loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
                save_state(state_dir, modules, optimizer, config, step + 1)
    for module in modules.values():
        module.eval()
    return losses


def save_state(state_dir: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
               config: LoopConfig, step: int) -> None:
    """Write weights, optimizer moments and the step into a fresh folder, then swap it in."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = state_dir.with_name(state_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # our own leftover from an interrupted save
    staging.mkdir()
    for name, module in modules.items():
        save_model(module, str(staging / f"{name}.safetensors"))  # handles tied weights (T5 embeddings)
    optimizer_state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value for index, slots in optimizer_state["state"].items()
               for key, value in slots.items()}
    save_file(tensors, str(staging / "optimizer.safetensors"))
    (staging / STATE_FILE).write_text(json.dumps({"step": step, "config": asdict(config),
                                                  "param_groups": optimizer_state["param_groups"]}))
    old = state_dir.with_name(state_dir.name + ".old")
    if state_dir.exists():
        os.replace(state_dir, old)
    os.replace(staging, state_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_state(state_dir: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
               config: LoopConfig) -> int:
    """Restore a saved state into `modules` and `optimizer`; return its step (0 if none)."""
    if not (state_dir / STATE_FILE).is_file():
        return 0
    saved = json.loads((state_dir / STATE_FILE).read_text())
    defaults = {f.name: f.default for f in fields(LoopConfig)}  # a state saved before a setting existed used its default
    # a constant rate can be extended to more steps; a cosine decay's rate at every step depends on them
    extendable = {"steps"} if config.final_lr_fraction == 1 else set()
    mismatched = {k for k, v in asdict(config).items()
                  if k not in extendable and saved["config"].get(k, defaults[k]) != v}
    if mismatched:
        raise WorkbenchError(f"{state_dir} holds a run with different {', '.join(sorted(mismatched))}; "
                             "use another work folder or the same settings")
    for name, module in modules.items():
        load_model(module, str(state_dir / f"{name}.safetensors"))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(state_dir / "optimizer.safetensors")).items():
        index, slot = key.split(".", 1)
        slots.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": slots, "param_groups": saved["param_groups"]})
    return int(saved["step"])
