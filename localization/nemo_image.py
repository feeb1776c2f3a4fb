"""An image check on NeMo's stop rule (ours, beyond the paper): the image must leave too.

NeMo's search (Hintersdorf et al., NeurIPS 2024, §3) accepts a blocked set once the
noise-consistency score of the first denoising step is under the threshold. On models whose later steps
restore the image anyway (the testbed's; see the README) that stops too early. With an `ImageCheck`, a
set counts as under the threshold only if, in addition, the prompt's generations with the set blocked
leave its un-blocked generations: mean SSIM over paired generations (same seed, with and without the
set) below `max_ssim`. The reference is the model's own generation, so no training image is needed.
When no configuration of the initial selection reaches the threshold, NeMo refines holding the last
configuration's score; with the check it also holds that set's image test if the set passed it, and is
the paper's refinement otherwise. The search itself is unchanged (`nemo_search`); only the score it
reads is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from localization.detection import ssim_matrix
from localization.nemo_search import Scorer
from workbench.errors import WorkbenchError
from workbench.intervene import ablate_per_sample
from workbench.models.model import Model
from workbench.neurons import NeuronSet
from workbench.sampling import generate

IMAGE_KEPT_OFFSET = 2.0
"""Added to the score of a set whose image stays: MS-SSIM lies in [−1, 1] and NeMo thresholds in (−1, 1),
so the sum is above any threshold the search holds."""


@dataclass(frozen=True)
class ImageCheck:
    """Which generations the check compares; `steps` / `guidance_scale` None take the pipeline's defaults.
    The seeds start at 100, away from the seeds a caller usually evaluates with (0, 1, ...)."""

    max_ssim: float = 0.5
    seeds: int = 4
    seed: int = 100
    steps: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.max_ssim <= 1:
            raise WorkbenchError(f"the image check's SSIM bound must be in (0, 1] (got {self.max_ssim}); e.g. 0.5")
        if self.seeds < 1 or (self.steps is not None and self.steps < 1):
            raise WorkbenchError("the image check needs seeds >= 1 and steps >= 1")


class ImageCheckedScorer:
    """A `Scorer` that reads `score` and, for the sets scoring at most `gate` (the threshold the search
    holds), also the image check."""

    def __init__(self, model: Model, prompt: str, score: Scorer, gate: float, check: ImageCheck,
                 rows_per_call: int, baseline: dict[str, torch.Tensor] | None = None):
        self.model, self.prompt, self.score, self.gate, self.check = model, prompt, score, gate, check
        self.baseline = baseline  # blocked neurons take it instead of 0 (NeMo's deactivation="mean")
        self.per_call = max(1, rows_per_call // check.seeds)
        self.images_generated = 0
        self.reference = self._generations([NeuronSet()])[0]

    def _generations(self, sets: Sequence[NeuronSet]) -> list[torch.Tensor]:
        """(seeds, 3, H, W) generations of the prompt with each set blocked, at the check's seeds."""
        seeds = [self.check.seed + i for i in range(self.check.seeds)]
        out = []
        for start in range(0, len(sets), self.per_call):
            chunk = sets[start:start + self.per_call]
            with ablate_per_sample(self.model, [s for s in chunk for _ in seeds], baseline=self.baseline):
                images = generate(self.model, [self.prompt] * (len(chunk) * len(seeds)), seeds=seeds * len(chunk),
                                  steps=self.check.steps, guidance_scale=self.check.guidance_scale)
            self.images_generated += len(images)
            out += list(images.unflatten(0, (len(chunk), len(seeds))))
        return out

    def image_ssim(self, sets: Sequence[NeuronSet]) -> list[float]:
        """Mean SSIM of each set's generations to the un-blocked ones, seed by seed."""
        return [float(torch.diagonal(ssim_matrix(images, self.reference)).mean()) for images in self._generations(sets)]

    def image_left(self, neurons: NeuronSet) -> bool:
        """Whether the prompt's image leaves with `neurons` blocked (the check, without the score)."""
        return self.image_ssim([neurons])[0] < self.check.max_ssim

    def __call__(self, sets: list[NeuronSet]) -> list[float]:
        scores = self.score(sets)
        under = [i for i, value in enumerate(scores) if value <= self.gate]
        ssims = dict(zip(under, self.image_ssim([sets[i] for i in under]))) if under else {}
        return [value if i in ssims and ssims[i] < self.check.max_ssim else value + IMAGE_KEPT_OFFSET
                for i, value in enumerate(scores)]
