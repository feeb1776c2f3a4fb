"""NeMo: find the cross-attention value neurons that carry a memorized prompt, and switch them off.

Hintersdorf, Struppek, Kersting, Dziedzic, Boenisch, "Finding NeMo: Localizing Neurons Responsible for
Memorization in Diffusion Models", NeurIPS 2024, §3. Per memorized prompt:

1. detect it with the noise-consistency score and keep its memorized seeds (`localization.detection`);
2. compare its value-neuron activations a_{l,i}(p) (token mean of the value projection's output) with
   holdout statistics: z_{l,i} = |a − μ| / σ;
3. initial selection: θ 5.0 → 1.25 by 0.25 (the search stops at 1.0) and top-k 0 → +1, until blocking
   the candidates brings the score s = max over memorized seeds of MS-SSIM(δ(seed), δ_blocked(seed))
   under the threshold; 4. refinement: drop whole layers, then single neurons, in reverse order, while s
   stays under.

Defaults are the paper's: the first timestep, top-k on z, the signed token mean. `legacy=True` gives
the reference code instead (timesteps[1], top-k on raw activations, absolute token mean;
shared/research/localization.md §1.2–1.4). The search scores a blocked set as the reference code does
(each memorized seed's δ against its un-blocked δ) against a threshold calibrated on the cross-seed
score; `search_score="consistency"` (our option) searches against that cross-seed score itself.
`image_check` (our option, `localization.nemo_image`) also asks each accepted set to take the prompt's
generated image away, since a first-step score under the threshold does not mean the later steps
will not restore it. `deactivation="mean"` (our option) switches a neuron off by setting it to its holdout
mean instead of zero (mean ablation, Wang et al., "Interpretability in the Wild", ICLR 2023, §3), in the
search and wherever the result is applied (`Localization.deactivate`): the neuron loses what is specific
to the prompt but keeps the value ordinary prompts give it.
Sites: the official seven SD 1.x sites (value projections of the first transformer block of each down
and mid attention), every value site (`all_value`), or the value sites of named blocks ("down.1,up.0",
e.g. the blocks `localization.ablation` ranks first; ours); PixArt
uses every cross-attention value site and zeroes its bias with the output; MMDiT uses the text-stream
value projections `add_v_proj` — both are our extensions beyond the paper, which studies SD 1.x only.

Speed-ups over the reference call pattern, with the neuron sets a sequential search finds: activations
are computed once, by one matmul where the value input is the text embedding alone; holdout statistics
are mergeable running statistics; several candidate removals are scored in one batched forward
(`nemo_search`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Sequence

import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

from localization.detection import (NemoConfig, consistency, first_timesteps, initial_latents, minmax_per_channel,
                                    msssim_window, nemo_scores, noise_difference, pairwise_msssim, prediction_at)
from localization.nemo_image import ImageCheck, ImageCheckedScorer
from localization.nemo_search import (SelectionSchedule, initial_selection, refine, z_scores)
from workbench.errors import WorkbenchError
from workbench.intervene import ablate_per_sample
from workbench.models.model import Model
from workbench.models.sites import Role, Site
from workbench.neurons import NeuronSet
from workbench.sampling import encode
from workbench.stats import RunningStats

SITE_CHOICES = ("official", "all_value")
SEARCH_SCORES = ("reference", "consistency")
DEACTIVATIONS = ("zero", "mean")


@dataclass(frozen=True)
class NemoLocalizationConfig:
    """NeMo's search; defaults are the paper's (its thresholds and schedule are also the reference code's
    CLI defaults; `legacy=True` switches to the reference code's timestep, top-k and token mean)."""

    sites: str = "official"
    schedule: SelectionSchedule = SelectionSchedule()
    top_k_on: str = "z"  # "raw": the reference code ranks top-k by raw activation
    token_mean: str = "signed"  # "abs": the reference code averages |activation| over tokens
    legacy: bool = False  # all three reference behaviours, timesteps[1] included
    search_score: str = "reference"  # "consistency": search against the detector's cross-seed score (ours)
    detection: NemoConfig = NemoConfig()
    image_check: ImageCheck | None = None  # ours: a set must also take the image away (`nemo_image`)
    deactivation: str = "zero"  # "mean" (ours): a switched-off neuron takes its holdout mean, not 0
    batch: int = 8  # candidate neuron sets scored per batched forward
    rows_per_call: int = 128  # largest denoiser batch: `batch` sets × 10 seeds fit in one forward
    tie_margin: float = 0.0  # ours: refinement drops a part only below threshold − margin (0 = the paper)

    def __post_init__(self) -> None:
        blocks = site_blocks(self.sites)
        object.__setattr__(self, "sites", ",".join(blocks))  # " down.1, up.0" -> "down.1,up.0"
        if self.sites not in SITE_CHOICES and not all(blocks):
            raise WorkbenchError(f"unknown NeMo site set {self.sites!r}; use {', '.join(SITE_CHOICES)} "
                                 "or comma-separated block names such as down.1,up.0")
        if self.top_k_on not in ("z", "raw") or self.token_mean not in ("signed", "abs"):
            raise WorkbenchError("top_k_on must be 'z' or 'raw' and token_mean 'signed' or 'abs'")
        if self.search_score not in SEARCH_SCORES:
            raise WorkbenchError(f"unknown NeMo search score {self.search_score!r}; "
                                 f"use one of {', '.join(SEARCH_SCORES)}")
        if self.batch < 1 or self.rows_per_call < 1:
            raise WorkbenchError("batch and rows_per_call must be >= 1")
        if not 0 <= self.tie_margin < 1:
            raise WorkbenchError(f"tie_margin must be in [0, 1), not {self.tie_margin}")
        if self.deactivation not in DEACTIVATIONS:
            raise WorkbenchError(f"unknown NeMo deactivation {self.deactivation!r}; use {' or '.join(DEACTIVATIONS)}")
        if self.legacy:
            object.__setattr__(self, "top_k_on", "raw")
            object.__setattr__(self, "token_mean", "abs")
            object.__setattr__(self, "detection", replace(self.detection, legacy=True))
        if self.deactivation == "mean" and self.token_mean == "abs":
            raise WorkbenchError("deactivation='mean' sets neurons to their holdout mean, which the absolute "
                                 "token mean does not give; use the signed token mean (drop --legacy)")


def site_blocks(which: str) -> list[str]:
    """The block names of a comma-separated site choice ("down.1, up.0" -> ["down.1", "up.0"])."""
    return [block.strip() for block in which.split(",")]


def nemo_sites(model: Model, which: str = "official") -> list[Site]:
    """The value sites NeMo searches, in execution order: `official`, `all_value` or named blocks."""
    role = Role.CONTEXT_VALUE if model.family == "mmdit" else Role.CROSS_ATTN_VALUE
    values = model.graph.select(roles=[role])
    if which not in SITE_CHOICES:
        blocks = site_blocks(which)
        known = list(dict.fromkeys(s.block for s in values))  # execution order
        unknown = [block for block in blocks if block not in known]
        if unknown:
            raise WorkbenchError(f"the {model.family} denoiser has no value site in block {unknown[0]!r}; "
                                 f"use {', '.join(SITE_CHOICES)} or blocks among {', '.join(known)}")
        values = [s for s in values if s.block in blocks]
    elif which == "official" and model.family == "unet":
        values = [s for s in values if (s.block.startswith("down") or s.block == "mid")
                  and ".transformer_blocks.0." in s.path]
    if not values:
        raise WorkbenchError(f"the {model.family} denoiser has no cross-attention value sites for NeMo")
    return values


@contextmanager
def capture_outputs(model: Model, sites: Sequence[Site]) -> Iterator[dict[str, torch.Tensor]]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [model.module(site.path).register_forward_hook(
        lambda module, args, output, path=site.path: outputs.__setitem__(path, output.detach()))
        for site in sites]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def value_activations(model: Model, prompts: Sequence[str], sites: Sequence[Site],
                      config: NemoLocalizationConfig = NemoLocalizationConfig()) -> dict[str, torch.Tensor]:
    """a_{l,i}(p): per site, (prompts, neurons) token means of the value outputs (float64).

    Where the family's value input is the text embedding alone (U-Net, PixArt) this is one matmul
    per site; otherwise (MMDiT, whose text stream is modulated by the timestep) one denoiser forward
    at NeMo's timestep on its first initial latent.
    """
    out: dict[str, list[torch.Tensor]] = {site.path: [] for site in sites}
    per_call = config.rows_per_call
    for start in range(0, len(prompts), per_call):
        chunk = list(prompts[start:start + per_call])
        cond = encode(model, chunk, cfg=False)
        text = model.adapter.text_value_input(model.denoiser, cond.kwargs)
        if text is not None:
            outputs = {site.path: model.module(site.path)(text) for site in sites}
        else:
            timestep, _ = first_timesteps(model, config.detection)
            latents = initial_latents(model, config.detection)[:1].repeat(len(chunk), 1, 1, 1)
            with capture_outputs(model, sites) as outputs:
                model.adapter.denoise(model.denoiser, latents.to(model.device, model.dtype),
                                      timestep.to(model.device), cond.kwargs)
        for path, value in outputs.items():
            value = value.double()
            out[path].append((value.abs() if config.token_mean == "abs" else value).mean(dim=1))
    return {path: torch.cat(parts) for path, parts in out.items()}


def holdout_statistics(model: Model, prompts: Sequence[str],
                       config: NemoLocalizationConfig = NemoLocalizationConfig()) -> dict[str, RunningStats]:
    """μ, σ of a_{l,i} over non-memorized prompts: mergeable running statistics (`workbench.stats`)."""
    if not prompts:
        raise WorkbenchError("holdout statistics need prompts; give non-memorized prompts, one per line")
    sites = nemo_sites(model, config.sites)
    return {path: RunningStats.of(a) for path, a in value_activations(model, prompts, sites, config).items()}


def deactivation_baseline(config: NemoLocalizationConfig,
                          holdout: dict[str, RunningStats]) -> dict[str, torch.Tensor] | None:
    """What a switched-off neuron outputs besides zero: its holdout mean with `deactivation="mean"`, else None."""
    if config.deactivation == "zero":
        return None
    return {path: stats.mean for path, stats in holdout.items()}


def prompt_z_scores(model: Model, prompt: str, holdout: dict[str, RunningStats],
                    config: NemoLocalizationConfig = NemoLocalizationConfig()
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """a_{l,i}(p) and z_{l,i}(p) of one prompt per NeMo site, in execution order."""
    sites = nemo_sites(model, config.sites)
    missing = [s.path for s in sites if s.path not in holdout]
    if missing:
        raise WorkbenchError(f"holdout statistics lack {len(missing)} NeMo sites (e.g. {missing[0]}); compute them "
                             f"with the same site set ({config.sites!r}) on this model")
    activations = {path: a[0] for path, a in value_activations(model, [prompt], sites, config).items()}
    return activations, z_scores(activations, holdout)


@dataclass
class MemorizationScorer:
    """s(B) = max over the memorized seeds of MS-SSIM(δ(seed), δ with B blocked (seed)) (§1.2 of the notes),
    the reference code's search score; with `search_score="consistency"` (our option) s(B) is instead the
    detector's own noise-consistency score of the blocked model (max pairwise MS-SSIM over all seeds), the
    quantity the threshold is calibrated on.

    Each call scores several blocked sets in one batched forward; `forwards` counts denoiser calls.
    """

    model: Model
    prompt: str
    seeds: tuple[int, ...]
    config: NemoLocalizationConfig
    baseline: dict[str, torch.Tensor] | None = None  # `deactivation_baseline`: blocked neurons take it, not 0
    forwards: int = 0
    _state: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.seeds:
            raise WorkbenchError(f"prompt {self.prompt!r} has no memorized seeds; NeMo localizes memorized prompts")
        detection = self.config.detection
        timestep, _ = first_timesteps(self.model, detection)
        rows = list(self.seeds) if self.config.search_score == "reference" else list(range(detection.n_seeds))
        latents = initial_latents(self.model, detection)[rows].to(self.model.device, self.model.dtype)
        cond = encode(self.model, [self.prompt], cfg=False)
        self._state.update(timestep=timestep, latents=latents, cond=cond)
        self._state["window"] = msssim_window(*latents.shape[-2:], detection.betas, detection.max_kernel_size,
                                              detection.sigma_per_tap)
        if self.config.search_score == "reference":
            self._state["reference"] = self._deltas([NeuronSet()])[0]

    def _deltas(self, sets: Sequence[NeuronSet]) -> list[torch.Tensor]:
        """Normalised δ of the scored seeds (seeds, C, H, W) with each set blocked."""
        latents, cond = self._state["latents"], self._state["cond"]
        seeds = len(latents)
        per_call = max(1, self.config.rows_per_call // seeds)
        out = []
        for start in range(0, len(sets), per_call):
            chunk = sets[start:start + per_call]
            rows = latents.repeat(len(chunk), 1, 1, 1)
            kwargs = {k: v.repeat_interleave(len(rows), dim=0) if isinstance(v, torch.Tensor) else v
                      for k, v in cond.kwargs.items()}
            batch_cond = replace(cond, prompts=[self.prompt] * len(rows), kwargs=kwargs)
            with ablate_per_sample(self.model, [s for s in chunk for _ in range(seeds)], baseline=self.baseline):
                eps = prediction_at(self.model, rows, self._state["timestep"], batch_cond, self.config.detection)
            self.forwards += 1
            delta = noise_difference(self.model, eps.float(), rows.float(), self._state["timestep"])
            out += list(minmax_per_channel(delta).unflatten(0, (len(chunk), seeds)))
        return out

    def __call__(self, sets: list[NeuronSet]) -> list[float]:
        kernel, sigma = self._state["window"]
        blocked = torch.stack(self._deltas(sets))  # (sets, seeds, C, H, W)
        if self.config.search_score == "consistency":
            betas = self.config.detection.betas
            return consistency(pairwise_msssim(blocked, kernel_size=kernel, sigma=sigma, betas=betas))[0].tolist()
        reference = self._state["reference"]
        values = ms_ssim(reference.expand_as(blocked).flatten(0, 1), blocked.flatten(0, 1), kernel_size=kernel,
                         sigma=sigma, betas=self.config.detection.betas, data_range=1.0, reduction="none")
        return values.view(len(sets), len(self.seeds)).amax(dim=1).tolist()


@dataclass(frozen=True)
class NemoResult:
    """One prompt's localization: what NeMo found, with the scores that justify it."""

    prompt: str
    detection_score: float
    threshold: float
    memorized_seeds: tuple[int, ...]
    initial: NeuronSet
    initial_score: float | None
    initial_success: bool
    theta: float | None
    k: int | None
    refined: NeuronSet
    refined_score: float | None
    forwards: int
    refined_image_ssim: float | None = None  # with an image check: mean SSIM to the un-blocked generations
    images_generated: int = 0  # by the image check

    @property
    def memorized(self) -> bool:
        return bool(self.memorized_seeds)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "memorized": self.memorized, "detection_score": self.detection_score,
                "threshold": self.threshold, "memorized_seeds": list(self.memorized_seeds),
                "initial": {"neurons": self.initial.to_json()["neurons"], "count": len(self.initial),
                            "score": self.initial_score, "success": self.initial_success, "theta": self.theta,
                            "k": self.k},
                "neurons": self.refined.to_json()["neurons"], "count": len(self.refined),
                "refined_score": self.refined_score, "denoiser_forwards": self.forwards,
                "refined_image_ssim": self.refined_image_ssim, "images_generated": self.images_generated}


def localize_prompt(model: Model, prompt: str, holdout: dict[str, RunningStats], threshold: float,
                    config: NemoLocalizationConfig = NemoLocalizationConfig()) -> NemoResult:
    """NeMo for one prompt; a prompt no seed of which is memorized gets empty sets (as in the reference)."""
    detection = nemo_scores(model, [prompt], config.detection, threshold=threshold)[0]
    seeds = detection.memorized_seeds or ()
    if not seeds:
        return NemoResult(prompt, detection.score, threshold, (), NeuronSet(), None, False, None, None,
                          NeuronSet(), None, 1)
    activations, z = prompt_z_scores(model, prompt, holdout, config)
    baseline = deactivation_baseline(config, holdout)
    scorer = MemorizationScorer(model, prompt, seeds, config, baseline)
    checked = None if config.image_check is None else ImageCheckedScorer(model, prompt, scorer, threshold,
                                                                         config.image_check, config.rows_per_call,
                                                                         baseline)
    search = checked or scorer
    initial = initial_selection(activations, z, threshold, search, config.schedule, config.top_k_on, config.batch)
    refine_threshold = threshold
    if not initial.success:  # NeMo holds the last configuration's score ...
        refine_threshold = initial.score if checked is None else scorer([initial.neurons])[0]
        if checked is not None:  # ... and with a check its image test, if the set passed it
            checked.gate = refine_threshold
            search = checked if checked.image_left(initial.neurons) else scorer
    refined, _ = refine(initial.neurons, list(z), refine_threshold, search, config.batch, config.tie_margin)
    if checked is None:
        initial_score, refined_score, image_ssim = initial.score, scorer([refined])[0], None
    else:  # the search read scores with the image offset; report the plain ones
        initial_score, refined_score = scorer([initial.neurons, refined])
        image_ssim = checked.image_ssim([refined])[0]
    return NemoResult(prompt, detection.score, threshold, seeds, initial.neurons, initial_score, initial.success,
                      initial.theta, initial.k, refined, refined_score, scorer.forwards + 1, image_ssim,
                      checked.images_generated if checked else 0)
