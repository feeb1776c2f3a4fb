"""Does a testbed checkpoint do what the testbed promises? The bars of the shipped models.

1. Memorized captions reproduce their training image: replication SSIM ≥ `ssim_bar` on at least
   `min_seeds` of `seeds` seeds (Somepalli et al. 2023 count replication the same way, with SSCD).
2. Ordinary (held-out) captions do not: the nearest distinct training image stays below the bar.
3. The model follows ordinary captions: the concept classifier reads the captioned subject, colour
   and style from the generation.
4. Both detectors separate memorized from ordinary captions: ROC AUC of NeMo's consistency score and
   of Wen et al.'s text-conditional noise magnitude, both at their papers' defaults (Wen: DDIM, 50
   steps, all steps averaged, 4 generations) except Wen's guidance; Wen's first-step magnitude (its
   cheap mode) is reported beside it.

Bars 1–3 sample at the testbed's own generation settings (`GENERATION` in describe.py, the
`generation` entry of testbed.json): 25 steps, guidance 3. Wen's sampling loop uses that guidance too,
not the 7.5 of the reference code: Wen et al. measure inside the model's ordinary CFG sampling loop,
and 7.5 is SD's ordinary guidance, whereas on these zero-terminal-SNR models it over-exposes and pulls
memorized samples off their photo (Lin et al. 2024 §3.4), so the later steps no longer measure the
memorized trajectory. `wen_guidance_scale=7.5` gives the reference setting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from localization.detection import NemoConfig, WenConfig, nemo_scores, ssim_matrix, text_noise_magnitude
from workbench.models.model import Model
from workbench.sampling import generate
from workbench.testbed.captions import parse
from workbench.testbed.classifier import ConceptClassifier, images_to_unit
from workbench.testbed.dataset import TestbedData
from workbench.testbed.describe import GENERATION
from workbench.testbed.private import private_images

FOLLOWED_HEADS = ("subject", "colour", "style")  # the concepts a caption asks for by name


@dataclass(frozen=True)
class EvalConfig:
    seeds: int = 8
    min_seeds: int = 6
    ssim_bar: float = 0.85
    steps: int = GENERATION["steps"]
    guidance_scale: float = GENERATION["guidance"]  # the testbed's generation settings (testbed.json)
    ordinary_prompts: int = 32
    ordinary_seeds: int = 2
    wen_generations: int = 4
    wen_steps: int = 50  # Wen et al.'s defaults (detect_mem.py), not the testbed's generation settings
    wen_guidance_scale: float = GENERATION["guidance"]  # the model's own sampling guidance (module docstring)

    def __post_init__(self) -> None:
        self.wen  # a bad Wen setting fails here, not after minutes of sampling

    @property
    def wen(self) -> WenConfig:
        return WenConfig(generations=self.wen_generations, steps=self.wen_steps,
                         guidance_scale=self.wen_guidance_scale)


def roc_auc(positive: list[float], negative: list[float]) -> float:
    """Probability that a positive outscores a negative (ties count half): the Mann–Whitney form of AUC."""
    pos, neg = torch.tensor(positive)[:, None], torch.tensor(negative)[None, :]
    return float(((pos > neg).float() + 0.5 * (pos == neg).float()).mean())


def evaluate(model: Model, data: TestbedData, classifier: ConceptClassifier, config: EvalConfig = EvalConfig(),
             advance: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """All four checks; returns per-caption details and a summary with pass/fail per bar."""
    sample = dict(steps=config.steps, guidance_scale=config.guidance_scale)
    memorized = []
    for private in private_images():
        advance(f"memorized: {private.caption}")
        images = generate(model, [private.caption] * config.seeds, seed=0, **sample)
        own = images_to_unit(private.image[None])
        similarity = ssim_matrix(images, own)[:, 0]
        memorized.append({"caption": private.caption, "kind": private.kind, "ssim": similarity.tolist(),
                          "seeds_over_bar": int((similarity >= config.ssim_bar).sum())})
    prompts = data.holdout_prompts()[:config.ordinary_prompts]
    advance("ordinary captions")
    ordinary_images = torch.cat([generate(model, [p] * config.ordinary_seeds, seed=0, **sample) for p in prompts])
    _, first_rows = np.unique(np.array(data.ids), return_index=True)
    training = images_to_unit(data.images[np.sort(first_rows)])
    advance("nearest training images")
    nearest = ssim_matrix(ordinary_images, training).max(dim=1).values
    predicted = classifier.predict(ordinary_images)
    truth = [parse(p).labels() for p in prompts for _ in range(config.ordinary_seeds)]
    correct = {head: (predicted[head] == torch.tensor([t[head] for t in truth])) for head in predicted}
    followed = torch.stack([correct[h] for h in FOLLOWED_HEADS]).all(dim=0)
    advance("detectors")
    memorized_captions = [m["caption"] for m in memorized]
    nemo = [s.score for s in nemo_scores(model, memorized_captions + prompts, NemoConfig())]
    wen_scores = [text_noise_magnitude(model, p, config.wen) for p in memorized_captions + prompts]
    wen = [w.magnitude for w in wen_scores]
    wen_first = [w.per_step[0] for w in wen_scores]
    k = len(memorized_captions)
    passing = [m["seeds_over_bar"] >= config.min_seeds for m in memorized]
    summary = {
        "memorized_captions_reproduced": sum(passing) / len(passing),
        "ordinary_generations_below_bar": float((nearest < config.ssim_bar).float().mean()),
        "ordinary_generations_followed": float(followed.float().mean()),
        "classifier_accuracy_per_head": {h: float(c.float().mean()) for h, c in correct.items()},
        "nemo_auc": roc_auc(nemo[:k], nemo[k:]), "wen_auc": roc_auc(wen[:k], wen[k:]),
        "wen_first_step_auc": roc_auc(wen_first[:k], wen_first[k:]),
    }
    summary["passes"] = {"memorization": summary["memorized_captions_reproduced"] >= 0.9,
                         "no_replication_of_ordinary": summary["ordinary_generations_below_bar"] >= 0.95,
                         "follows_captions": summary["ordinary_generations_followed"] >= 0.8,
                         "detectors": min(summary["nemo_auc"], summary["wen_auc"]) >= 0.95}
    return {"config": asdict(config), "summary": summary, "memorized": memorized,
            "ordinary": [{"prompt": p, "nearest_ssim": nearest[i * config.ordinary_seeds:(i + 1) * config.ordinary_seeds]
                          .tolist()} for i, p in enumerate(prompts)],
            "detectors": {"nemo": {"memorized": nemo[:k], "ordinary": nemo[k:]},
                          "wen": {"memorized": wen[:k], "ordinary": wen[k:]},
                          "wen_first_step": {"memorized": wen_first[:k], "ordinary": wen_first[k:]}}}
