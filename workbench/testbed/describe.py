"""`testbed.json`: the ground truth that ships beside the checkpoints.

Which captions are memorized (with their training images as PNG), which concepts exist and which
captions carry them, the member / non-member split and how to regenerate every image, the
generation settings the bars were measured with, and where the checkpoints and classifier are.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from workbench.io import atomic_write_json, check_writable
from workbench.sampling import save_image
from workbench.testbed.classifier import images_to_unit
from workbench.testbed.concepts import LABELS
from workbench.testbed.dataset import TestbedData
from workbench.testbed.private import private_images

TESTBED_FORMAT = "workbench.testbed/1"
GENERATION = {"steps": 25, "guidance": 3.0, "resolution": 32}
"""The settings every testbed bar is measured with. Guidance 3, not SD's 7.5: on a zero-terminal-SNR
schedule strong classifier-free guidance over-exposes (Lin et al. 2024 §3.4), and it pulls memorized
captions off their photo — shipped U-Net, same seeds: 9 / 20 reproduced at guidance 5, 18 / 20 at 3,
while ordinary captions are followed as often (78 % at 5, 81 % at 3)."""


def describe(data: TestbedData, folder: Path, checkpoints: dict[str, str], classifier: str, seed: int,
             size: int, overwrite: bool = False, variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write `folder/testbed.json` and `folder/memorized/*.png`; return the JSON. `checkpoints` maps each
    family to its default checkpoint's folder; `variants` describes other checkpoints, by folder."""
    check_writable(folder / "testbed.json", overwrite=overwrite)
    (folder / "memorized").mkdir(parents=True, exist_ok=True)
    memorized = []
    for private in private_images():
        image = folder / "memorized" / f"{private.id}.png"
        if not image.exists():
            save_image(images_to_unit(private.image[None])[0], image)
        memorized.append({"caption": private.caption, "image": f"memorized/{image.name}", "kind": private.kind})
    members = data.members()
    carried: dict[str, Counter] = {head: Counter() for head in LABELS}
    for sample in data.rows:
        if sample.scene is not None:
            for head, index in sample.scene.labels().items():
                carried[head][LABELS[head][index]] += 1
    description = {
        "format": TESTBED_FORMAT,
        "generation": GENERATION,
        "checkpoints": checkpoints,
        "variants": variants or {},
        "classifier": classifier,
        "data": {"seed": seed, "size": size, "fingerprint": data.fingerprint(),
                 "regenerate": f"workbench.testbed.dataset.build_dataset(seed={seed}, size={size})"},
        "memorized": memorized,
        "holdout_prompts": data.holdout_prompts(),
        "concepts": {head: {value: {"training_captions": carried[head][value]} for value in values}
                     for head, values in LABELS.items()},
        "concept_phrases": {"style:swirlova": "in the style of Vera Swirlova", "subject:house": "house"},
        "members": {"count": len(members), "ids": list(members),
                    "regenerate": "build_dataset(...).images (rows), .rows[i].id; procedural images are "
                                  "render(scene, render_seed), natural ones private.load_natural(source)"},
        "non_members": {"count": len(data.non_members), "ids": [s.id for s in data.non_members],
                        "regenerate": "build_dataset(...).non_member_images"},
    }
    atomic_write_json(folder / "testbed.json", description, overwrite=overwrite)
    return description
