"""The testbed's concept classifier: one small CNN with a head per concept label.

It scores erasure (is the house still drawn? is the style still there?) and utility (does the model
still follow ordinary captions?) on the procedural data, where the ground truth is exact. Trained on
procedural members with light noise and brightness jitter, so generated images with sampling
artefacts are still read; accuracy is measured on the non-members.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from workbench.errors import WorkbenchError
from workbench.io import atomic_write, atomic_write_json, read_json
from workbench.testbed.concepts import LABELS
from workbench.testbed.training import LoopConfig, train

WEIGHTS, CONFIG = "classifier.safetensors", "classifier.json"


class ConceptClassifier(nn.Module):
    """Four 3×3 conv stages (32→16→8→4 px), global average pooling, one linear head per label."""

    def __init__(self, labels: dict[str, tuple[str, ...]] | None = None, width: int = 16):
        super().__init__()
        self.labels = dict(labels or LABELS)
        self.width = width
        channels = (3, width, 2 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = []
        for index, (inputs, outputs) in enumerate(zip(channels, channels[1:])):
            layers += [nn.Conv2d(inputs, outputs, 3, stride=1 if index == 0 else 2, padding=1),
                       nn.GroupNorm(8, outputs), nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({head: nn.Linear(channels[-1], len(names)) for head, names in self.labels.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for (B, 3, H, W) images in [0, 1]."""
        features = self.features(images * 2 - 1)
        return {head: layer(features) for head, layer in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted label index per head."""
        self.eval()
        return {head: logits.argmax(-1) for head, logits in self(images).items()}


def images_to_unit(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255


def train_classifier(images: np.ndarray, labels: dict[str, np.ndarray], config: LoopConfig, state_dir: Path,
                     batch_size: int = 64, show_progress: bool = True) -> ConceptClassifier:
    """Cross-entropy summed over heads on the rows labelled in every head (procedural images)."""
    labelled = np.all([labels[head] >= 0 for head in LABELS], axis=0)
    if not labelled.any():
        raise WorkbenchError("no labelled procedural images to train the classifier on")
    pixels = images_to_unit(images[labelled])
    targets = {head: torch.from_numpy(values[labelled]) for head, values in labels.items()}
    torch.manual_seed(config.seed)
    model = ConceptClassifier()

    def loss_of_step(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(len(pixels), (batch_size,), generator=generator)
        brightness = 1 + 0.1 * torch.randn(batch_size, 1, 1, 1, generator=generator)
        noisy = (pixels[index] * brightness + 0.03 * torch.randn(pixels[index].shape, generator=generator)).clamp(0, 1)
        logits = model(noisy)
        return sum(F.cross_entropy(logits[head], targets[head][index]) for head in LABELS)

    train({"classifier": model}, loss_of_step, config, state_dir, "training classifier", show_progress)
    return model


def accuracy(model: ConceptClassifier, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of correctly predicted labels per head, over rows labelled in that head."""
    predicted = model.predict(images_to_unit(images))
    return {head: float((predicted[head].numpy() == labels[head])[labels[head] >= 0].mean()) for head in LABELS}


def save_classifier(model: ConceptClassifier, folder: Path) -> None:
    """Weights (safetensors) and label names (JSON) into `folder`, atomically, never over existing files."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / WEIGHTS, lambda tmp: save_model(model, str(tmp)))
    # heads as a list of pairs: the JSON writer sorts keys, and the head order is part of the model
    atomic_write_json(folder / CONFIG, {"heads": [[h, list(v)] for h, v in model.labels.items()], "width": model.width})


def load_classifier(folder: str | os.PathLike) -> ConceptClassifier:
    folder = Path(folder)
    config = read_json(folder / CONFIG, "classifier config")
    model = ConceptClassifier({h: tuple(v) for h, v in config["heads"]}, config["width"])
    if not (folder / WEIGHTS).is_file():
        raise WorkbenchError(f"classifier weights {folder / WEIGHTS} not found; train them with "
                             "`workbench testbed classifier --out FOLDER`")
    load_model(model, str(folder / WEIGHTS))
    return model.eval()
