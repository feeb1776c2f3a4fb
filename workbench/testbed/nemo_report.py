"""Does NeMo remove the testbed's planted memorization, and only it? The bars of issue 4 on a checkpoint.

For each verbatim-memorized caption: NeMo's refined neurons (`localization.localize`), then with them
switched off (a) the noise-consistency score against the calibrated threshold and (b) the replication
SSIM of generations to the training image; the same for a random set with the same per-layer counts.
Ordinary captions are generated with the union of all refined sets off (the edit one would ship) and
compared with their un-ablated generations (SSIM, same seeds).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from localization.aggregate import random_like
from localization.detection import nemo_scores, ssim_matrix
from localization.localize import localize
from localization.nemo import NemoLocalizationConfig
from workbench.intervene import ablate
from workbench.models.model import Model
from workbench.neurons import NeuronSet
from workbench.sampling import generate
from workbench.testbed.classifier import images_to_unit
from workbench.testbed.private import private_images


@dataclass(frozen=True)
class NemoReportConfig:
    seeds: int = 8  # generations per caption
    holdout: int = 32  # held-out captions for NeMo's statistics and threshold
    ordinary: int = 16  # ordinary captions checked for side effects
    steps: int = 25
    guidance_scale: float = 5.0
    control_seed: int = 1
    captions: int | None = None  # verbatim captions to check (None = all fourteen)


def nemo_report(model: Model, holdout_prompts: list[str], config: NemoReportConfig = NemoReportConfig(),
                nemo: NemoLocalizationConfig = NemoLocalizationConfig(),
                advance: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Per verbatim caption: neurons, scores and SSIMs with NeMo's set and with a random control."""
    photos = [p for p in private_images() if p.kind == "verbatim"][:config.captions]
    sample = dict(steps=config.steps, guidance_scale=config.guidance_scale)
    located = localize(model, "nemo", [p.caption for p in photos], config=nemo,
                       holdout=holdout_prompts[:config.holdout], advance=advance)
    threshold = located.provenance["threshold"]
    rows = []
    for photo, result, neurons in zip(photos, located.results, located.per_prompt()):
        advance(f"checking {photo.caption}")
        own = images_to_unit(photo.image[None])
        control = random_like(neurons, model.graph, config.control_seed)
        entry = {"caption": photo.caption, "memorized": result["memorized"], "neurons": len(neurons),
                 "per_site": {site: len(indices) for site, indices in neurons.items()},
                 "score_before": result["detection_score"]}
        for name, blocked in (("none", NeuronSet()), ("nemo", neurons), ("random", control)):
            with ablate(model, blocked):
                images = generate(model, [photo.caption] * config.seeds, seed=0, **sample)
                score = nemo_scores(model, [photo.caption], nemo.detection)[0].score
            ssim = ssim_matrix(images, own)[:, 0]
            entry[name] = {"score": score, "under_threshold": score <= threshold,
                           "ssim_mean": float(ssim.mean()), "ssim_max": float(ssim.max())}
        entry["removed"] = bool(len(neurons)) and entry["nemo"]["under_threshold"] and entry["nemo"]["ssim_mean"] < 0.5
        entry["random_removed"] = entry["random"]["under_threshold"] and entry["random"]["ssim_mean"] < 0.5
        rows.append(entry)
    union = located.neurons
    advance("ordinary captions")
    ordinary = holdout_prompts[config.holdout:config.holdout + config.ordinary]
    before = generate(model, ordinary, seed=0, **sample)
    with ablate(model, union):
        after = generate(model, ordinary, seed=0, **sample)
    unchanged = torch.diagonal(ssim_matrix(after, before))
    per_site = Counter()
    for site, _ in union:
        per_site[site] += 1
    summary = {
        "threshold": threshold, "captions": len(rows),
        "removed": float(np.mean([r["removed"] for r in rows])),
        "random_removed": float(np.mean([r["random_removed"] for r in rows])),
        "neurons_per_caption": [r["neurons"] for r in rows], "union_per_site": dict(per_site),
        "ordinary_ssim_to_unablated_mean": float(unchanged.mean()),
    }
    summary["passes"] = {"removes_memorization": summary["removed"] >= 0.8,
                         "random_does_not": summary["random_removed"] < summary["removed"],
                         "ordinary_unchanged": summary["ordinary_ssim_to_unablated_mean"] >= 0.9}
    return {"config": asdict(config), "summary": summary, "captions": rows,
            "ordinary": [{"prompt": p, "ssim_to_unablated": float(s)} for p, s in zip(ordinary, unchanged)],
            "localization": located.to_json()}
