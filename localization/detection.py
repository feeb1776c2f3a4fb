"""Memorization detection: does a prompt make the model reproduce a training image?

Two detectors that need no training data, and replication metrics that do:

1. **Noise consistency** (NeMo). Hintersdorf, Struppek, Kersting, Dziedzic, Boenisch, "Finding NeMo:
   Localizing Neurons Responsible for Memorization in Diffusion Models", NeurIPS 2024 (arXiv
   2406.02366), the memorization-strength score of §3 and of the project page. For N initial latents
   x_T^(i) and the prompt embedding c,

       δ_i = minmax_{H,W}( ε_θ(x_T^(i), t*, c) − x_T^(i) )           per sample and per latent channel
       s_ij = MS-SSIM(δ_i, δ_j),   score = max_{i<j} s_ij,   seed_i = max_{j≠i} s_ij

   A memorized prompt makes the first noise prediction nearly seed-independent, so s_ij is high.
   For v-prediction models δ is taken up to a positive factor that keeps it defined at zero terminal
   SNR (`noise_difference`).
   The paper's text gives no equation number we could verify; the details (10 latents from one
   generator seeded 1, DDIM 50 steps, guidance 0, kernel 11, betas (0.33,)*3) follow the reference
   code as described in shared/research/localization.md §1.2. Our extension for small models: on
   latents too small for the reference's 11-tap window at 3 scales (e.g. 16×16), the window shrinks
   to the largest odd size torchmetrics accepts (`msssim_window`); each score records the one used.
2. **Text-conditional noise magnitude**. Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating
   Memorization in Diffusion Models", ICLR 2024, §3.3 (the detection metric):

       d(p) = 1/(|T|·G) Σ_{t∈T} Σ_g ‖ε_θ(x_t^(g), e_p) − ε_θ(x_t^(g), e_∅)‖₂

   measured inside an ordinary CFG sampling loop (DDIM, 50 steps, guidance 7.5, G = 4 generations).
   ε_θ is the denoiser's raw output: for v-prediction models that is v, whose text-conditional part
   is the noise's divided by √ᾱ_t (nonzero at zero terminal SNR, where the noise's vanishes), and
   the velocity for flow-matching models.
3. **Replication** against training images: nearest neighbour by SSIM (Wang et al. 2004) and pixel
   L2, as used to count replications by Somepalli et al. (CVPR 2023) and Carlini et al. (USENIX
   Security 2023). A learned similarity (CLIP, from a local folder) is added on request
   (`localization.similarity`).

Thresholds are calibrated per model: mean + k·std of a detector's scores on non-memorized prompts
(`calibrate_threshold`). NeMo's published 0.428 (`NEMO_SD14_THRESHOLD`) holds for SD 1.4 only.
Where the reference code deviates from the paper, the paper is the default and the code's behaviour
is a named `legacy` option.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure as ms_ssim,
    structural_similarity_index_measure as ssim,
)

from localization.similarity import LEARNED_METRICS, check_learned_metric, learned_similarity
from workbench.errors import WorkbenchError
from workbench.models.model import Model
from workbench.sampling import Conditioning, cfg_layout, encode, generate, uses_cfg

NEMO_SD14_THRESHOLD = 0.428
"""NeMo's published threshold: mean + 1 std of the pairwise score on unmemorized LAION prompts for
Stable Diffusion 1.4 (reference README). Valid for that model only; never a default here."""

SCHEDULERS = ("auto", "ddim", "pipeline")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def _config_json(config: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


# ---------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NemoConfig:
    """NeMo noise-consistency score; defaults are the paper's (and its reference code's)."""

    n_seeds: int = field(default=10, metadata=_help("initial latents per prompt, all drawn from one generator"))
    seed: int = field(default=1, metadata=_help("seed of that generator (the reference seeds 1)"))
    steps: int = field(default=50, metadata=_help("scheduler steps; the score uses the first timestep"))
    guidance_scale: float = field(default=0.0, metadata=_help(
        "CFG scale of the prediction; <= 1 means the conditional prediction only (the paper's 0)"))
    legacy: bool = field(default=False, metadata=_help(
        "reproduce the reference code: timesteps[1] on the un-stepped x_T (an off-by-one), and swapped "
        "CFG labels when guidance_scale > 1"))
    max_kernel_size: int = field(default=11, metadata=_help(
        "largest MS-SSIM Gaussian window (taps); smaller latents get the largest odd size that fits"))
    sigma_per_tap: float = field(default=1.5 / 11, metadata=_help(
        "Gaussian sigma per window tap: 1.5/11 gives the reference's sigma 1.5 at 11 taps"))
    betas: tuple[float, ...] = field(default=(0.33, 0.33, 0.33), metadata=_help(
        "MS-SSIM scale exponents; their number is the number of scales"))
    scheduler: str = field(default="auto", metadata=_help(
        "auto: DDIM (the paper's) for noise-prediction pipelines, the pipeline's own for flow matching; "
        "ddim; pipeline"))

    def __post_init__(self) -> None:
        if self.n_seeds < 2:
            raise WorkbenchError(f"NeMo compares seeds: give at least 2 (n_seeds, --seeds; got {self.n_seeds})")
        if self.steps < 1 or (self.legacy and self.steps < 2):
            raise WorkbenchError(f"steps must be >= 1, and >= 2 with legacy, which uses timesteps[1] "
                                 f"(got {self.steps})")
        if self.guidance_scale < 0:
            raise WorkbenchError(f"guidance_scale must be >= 0 (got {self.guidance_scale})")
        if self.max_kernel_size < 3 or self.max_kernel_size % 2 == 0:
            raise WorkbenchError(f"max_kernel_size must be odd and >= 3 (got {self.max_kernel_size})")
        if self.sigma_per_tap <= 0:
            raise WorkbenchError(f"sigma_per_tap must be > 0 (got {self.sigma_per_tap})")
        if not self.betas or not all(isinstance(b, float) and b > 0 for b in self.betas):
            raise WorkbenchError(f"betas must be a non-empty tuple of positive floats (got {self.betas!r})")
        _check_scheduler(self.scheduler)

    @property
    def timestep_index(self) -> int:
        return 1 if self.legacy else 0


@dataclass(frozen=True)
class WenConfig:
    """Wen et al.'s text-conditional noise magnitude; defaults are the paper's (detect_mem.py)."""

    generations: int = field(default=4, metadata=_help("generations per prompt; generation g uses seed + g"))
    seed: int = field(default=0, metadata=_help("seed of the first generation (ours: workbench seeds start at 0)"))
    steps: int = field(default=50, metadata=_help("scheduler steps of the sampling loop"))
    guidance_scale: float = field(default=7.5, metadata=_help("CFG scale of the sampling loop (must be > 1)"))
    measure_steps: tuple[int, ...] | None = field(default=None, metadata=_help(
        "step indices to average over; None = all; (0,) = the cheap first-step mode (stops sampling there)"))
    scheduler: str = field(default="auto", metadata=_help(
        "auto: DDIM (the paper's) for noise-prediction pipelines, the pipeline's own for flow matching; "
        "ddim; pipeline"))

    def __post_init__(self) -> None:
        if self.generations < 1 or self.steps < 1:
            raise WorkbenchError(f"generations and steps must be >= 1 (got {self.generations}, {self.steps})")
        if self.guidance_scale <= 1:
            raise WorkbenchError(f"guidance_scale must be > 1 so the loop has an unconditional branch "
                                 f"(got {self.guidance_scale})")
        if self.measure_steps is not None:
            steps = tuple(sorted(set(self.measure_steps)))
            if not steps or steps[0] < 0 or steps[-1] >= self.steps:
                raise WorkbenchError(f"measure_steps must be indices in 0..{self.steps - 1} "
                                     f"(got {self.measure_steps!r}); or None for all steps")
            object.__setattr__(self, "measure_steps", steps)
        _check_scheduler(self.scheduler)

    @classmethod
    def first_step(cls, **overrides: Any) -> "WenConfig":
        """The cheap mode: the magnitude at the first step only; sampling stops after it."""
        return cls(measure_steps=(0,), **overrides)


@dataclass(frozen=True)
class ReplicationConfig:
    """Nearest training image by SSIM and pixel L2 (images in [0, 1])."""

    sigma: float = field(default=1.5, metadata=_help(
        "SSIM Gaussian window sigma: 1.5 = 11 taps (Wang et al. 2004); works for images >= 6 px a side"))
    learned: tuple[str, ...] = field(default=(), metadata=_help(
        f"learned similarities to add (of {', '.join(LEARNED_METRICS)}; clip works); each needs local weights"))
    weights: str | None = field(default=None, metadata=_help("local weights folder of the learned metric"))
    ssim_candidates: int | None = field(default=None, metadata=_help(
        "None: SSIM against every training image (exact); k: only against each generation's k most correlated "
        "training images (L2 between images standardised per channel, blind to colour casts); fast on large sets"))

    def __post_init__(self) -> None:
        if self.sigma <= 0:
            raise WorkbenchError(f"SSIM sigma must be > 0 (got {self.sigma})")
        if self.ssim_candidates is not None and self.ssim_candidates < 1:
            raise WorkbenchError(f"ssim_candidates must be >= 1 or None (got {self.ssim_candidates})")
        for metric in self.learned:
            check_learned_metric(metric, self.weights)

    @property
    def kernel_size(self) -> int:
        return gaussian_taps(self.sigma)


def _check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise WorkbenchError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")


# ---------------------------------------------------------------------------------------------------
# thresholds and verdicts
# ---------------------------------------------------------------------------------------------------

def calibrate_threshold(scores: Sequence[float], k: float = 1.0) -> float:
    """mean + k·std of a detector's scores on non-memorized prompts (NeMo's rule, k = 1).

    The std is the unbiased sample std (Bessel's n − 1), torch's default; NeMo's reference computed
    its 0.428 by hand and does not say which it used.
    """
    values = torch.as_tensor([float(s) for s in scores], dtype=torch.float64)
    if values.numel() < 2:
        raise WorkbenchError(f"calibration needs at least 2 scores (got {values.numel()}); "
                             "give more non-memorized prompts")
    if not torch.isfinite(values).all():
        raise WorkbenchError("calibration scores contain NaN or infinite values; check the detector run")
    return float(values.mean() + k * values.std(unbiased=True))


def check_nemo_threshold(value: float | None) -> float | None:
    """A given NeMo threshold: an MS-SSIM value strictly between −1 and 1 (at 1 no seed is ever flagged)."""
    if value is not None and not (math.isfinite(value) and -1 < value < 1):
        raise WorkbenchError(f"NeMo threshold {value} is outside (-1, 1); give an MS-SSIM value such as 0.428, "
                             "or leave it out to calibrate on non-memorized prompts")
    return value


def _exceeds(score: float, threshold: float | None) -> bool | None:
    return None if threshold is None else bool(score > threshold)


@dataclass(frozen=True)
class Thresholds:
    """Per-detector thresholds; None = no threshold (scores only, verdict null)."""

    nemo: float | None = None
    wen: float | None = None
    source: str = "scores only"  # or "calibration (n prompts, mean + k·std)", "given", ...

    def __post_init__(self) -> None:
        check_nemo_threshold(self.nemo)
        if self.wen is not None and not (math.isfinite(self.wen) and self.wen >= 0):
            raise WorkbenchError(f"Wen threshold {self.wen} must be a finite magnitude >= 0")

    def to_json(self) -> dict[str, Any]:
        return {"nemo": self.nemo, "wen": self.wen, "source": self.source}


def combined_verdict(nemo: bool | None, wen: bool | None) -> bool | None:
    """Memorized if any detector with a threshold flags it; None when neither has one.

    "Any" rather than "all": a missed memorized prompt leaks a training image, while a false alarm
    costs one localization run that finds nothing; the separate verdicts stay in the report.
    """
    verdicts = [v for v in (nemo, wen) if v is not None]
    return any(verdicts) if verdicts else None


# ---------------------------------------------------------------------------------------------------
# 1. NeMo noise consistency
# ---------------------------------------------------------------------------------------------------

def minmax_per_channel(delta: torch.Tensor) -> torch.Tensor:
    """Scale each (sample, channel) plane to [0, 1] over H, W; a constant plane becomes 0 (not NaN)."""
    low = delta.amin(dim=(-2, -1), keepdim=True)
    span = delta.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (delta - low) / span.clamp_min(torch.finfo(delta.dtype).tiny), 0.0)


def gaussian_taps(sigma: float) -> int:
    """Width of torchmetrics' Gaussian window for `sigma` (it ignores kernel_size when Gaussian)."""
    return int(3.5 * sigma + 0.5) * 2 + 1


@lru_cache(maxsize=None)
def msssim_window(height: int, width: int, betas: tuple[float, ...] = (0.33, 0.33, 0.33),
                  max_kernel_size: int = 11, sigma_per_tap: float = 1.5 / 11) -> tuple[int, float]:
    """(kernel size, sigma): the largest odd window <= max_kernel_size that torchmetrics' MS-SSIM
    accepts on height × width inputs with len(betas) scales.

    Our extension for small models: SD's 64×64 latents take the reference's 11 taps (sigma 1.5), but
    the coarsest of 3 scales of a 16×16 latent is 4×4, too small for it. sigma shrinks with the
    window (sigma = taps · sigma_per_tap) so torchmetrics' Gaussian really has `taps` taps.
    """
    probe = torch.zeros(1, 1, height, width)
    for size in range(max_kernel_size, 2, -2):
        sigma = size * sigma_per_tap
        if gaussian_taps(sigma) != size:
            continue
        try:
            ms_ssim(probe, probe, kernel_size=size, sigma=sigma, betas=betas, data_range=1.0)
        except (ValueError, RuntimeError):  # size checks (ValueError), reflect padding (RuntimeError)
            continue
        return size, sigma
    raise WorkbenchError(f"latents of {height}×{width} are too small for {len(betas)}-scale MS-SSIM; "
                         "use fewer betas (scales)")


def pairwise_msssim(deltas: torch.Tensor, *, kernel_size: int, sigma: float,
                    betas: tuple[float, ...]) -> torch.Tensor:
    """(P, N, N) MS-SSIM between all seed pairs of each prompt, from normalised δ (P, N, C, H, W).

    All P·N(N−1)/2 pairs go through torchmetrics in one batch; the diagonal is −inf (no self-pairs).
    """
    prompts, n = deltas.shape[:2]
    i, j = torch.triu_indices(n, n, offset=1, device=deltas.device)
    values = ms_ssim(deltas[:, i].flatten(0, 1), deltas[:, j].flatten(0, 1), kernel_size=kernel_size,
                     sigma=sigma, betas=betas, data_range=1.0, reduction="none").view(prompts, -1)
    matrix = deltas.new_full((prompts, n, n), -math.inf)
    matrix[:, i, j] = values
    matrix[:, j, i] = values
    return matrix


def consistency(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(score (P,), per-seed (P, N)): max over all pairs, and each seed's max over its pairs."""
    per_seed = matrix.amax(dim=-1)
    return per_seed.amax(dim=-1), per_seed


@dataclass(frozen=True)
class NemoScore:
    """One prompt's noise-consistency score, with what a report needs to reproduce it."""

    prompt: str
    score: float
    per_seed: tuple[float, ...]
    timestep: float
    kernel_size: int
    sigma: float
    scheduler: str
    config: NemoConfig
    threshold: float | None = None

    @property
    def memorized(self) -> bool | None:
        return _exceeds(self.score, self.threshold)

    @property
    def memorized_seeds(self) -> tuple[int, ...] | None:
        """Seeds whose best pair exceeds the threshold: the ones NeMo localizes on."""
        if self.threshold is None:
            return None
        return tuple(i for i, s in enumerate(self.per_seed) if s > self.threshold)

    def to_json(self) -> dict[str, Any]:
        return {"score": self.score, "per_seed": list(self.per_seed), "threshold": self.threshold,
                "memorized": self.memorized, "memorized_seeds": _list_or_none(self.memorized_seeds),
                "timestep": self.timestep, "kernel_size": self.kernel_size, "sigma": self.sigma,
                "scheduler": self.scheduler, "seeds": f"draws 0..{self.config.n_seeds - 1} of "
                f"torch.Generator().manual_seed({self.config.seed})", "config": _config_json(self.config)}


def _list_or_none(values: tuple | None) -> list | None:
    return None if values is None else list(values)


def _scheduler(model: Model, choice: str) -> Any:
    """A fresh scheduler for detection (the pipeline's own is never mutated)."""
    from diffusers import DDIMScheduler

    own = model.pipeline.scheduler
    flow = type(own).__name__.startswith("FlowMatch")
    if choice == "ddim" and flow:
        raise WorkbenchError(f"DDIM cannot sample the flow-matching {type(own).__name__}; use scheduler='auto'")
    if choice == "pipeline" or (choice == "auto" and flow):
        return type(own).from_config(own.config)
    return DDIMScheduler.from_config(own.config)


def first_timesteps(model: Model, config: NemoConfig) -> tuple[torch.Tensor, str]:
    """The timestep t* the score uses (timesteps[0], or [1] with legacy) and the scheduler's name."""
    scheduler = _scheduler(model, config.scheduler)
    if scheduler.config.get("use_dynamic_shifting"):
        raise WorkbenchError(f"{type(scheduler).__name__} uses dynamic shifting, which NeMo detection does "
                             "not support yet; use a pipeline without it")
    scheduler.set_timesteps(config.steps)
    return scheduler.timesteps[config.timestep_index], type(scheduler).__name__


def initial_latents(model: Model, config: NemoConfig) -> torch.Tensor:
    """x_T: (n_seeds, C, H, W) from one CPU generator seeded `seed`, as the reference draws them.

    Drawn on the CPU so the latents (and scores) do not depend on the device.
    """
    sample = model.denoiser.config.sample_size
    height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)
    shape = (config.n_seeds, model.denoiser.config.in_channels, height, width)
    return torch.randn(shape, generator=torch.Generator().manual_seed(config.seed))


def _repeat_rows(cond: Conditioning, n: int) -> Conditioning:
    """Each prompt's conditioning n times in a row, keeping the [uncond; cond] halves with CFG."""
    def repeat(value: torch.Tensor) -> torch.Tensor:
        halves = value.chunk(2) if cond.cfg else (value,)
        return torch.cat([h.repeat_interleave(n, dim=0) for h in halves])
    return Conditioning([p for p in cond.prompts for _ in range(n)], cond.cfg,
                        {k: repeat(v) if isinstance(v, torch.Tensor) else v for k, v in cond.kwargs.items()})


@torch.no_grad()
def prediction_at(model: Model, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                config: NemoConfig) -> torch.Tensor:
    """ε_θ(x_T, t*, c) for a batch, conditional only unless guidance_scale > 1."""
    rows = torch.cat([latents, latents]) if cond.cfg else latents
    with cfg_layout(model, cond.cfg):
        out = model.adapter.denoise(model.denoiser, rows, timestep.to(model.device), cond.kwargs)
    if not cond.cfg:
        return out
    uncond, text = out.chunk(2)
    if config.legacy:  # the reference unpacks [uncond, text] as (text, uncond)
        uncond, text = text, uncond
    return uncond + config.guidance_scale * (text - uncond)


def noise_difference(model: Model, output: torch.Tensor, x_t: torch.Tensor,
                     timestep: torch.Tensor) -> torch.Tensor:
    """NeMo's δ before normalisation: ε̂ − x_t from the denoiser's output at t (flow matching: v̂ − x_t).

    For v-prediction, ε̂ − x_t = √ᾱ_t v̂ − (1 − √(1−ᾱ_t)) x_t vanishes at zero terminal SNR, so δ is
    taken divided by √ᾱ_t: v̂ − x_t (1 − √(1−ᾱ_t))/√ᾱ_t, the same δ after the per-channel min–max
    normalisation, and v̂ (the predicted −x₀) where ᾱ_t = 0.
    """
    scheduler = model.pipeline.scheduler
    if scheduler.config.get("prediction_type") != "v_prediction":
        return output - x_t
    alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
    keep = (1 - math.sqrt(1 - alpha_bar)) / math.sqrt(alpha_bar) if alpha_bar > 0 else 0.0
    return output - keep * x_t


def noise_differences(model: Model, prompts: Sequence[str], config: NemoConfig = NemoConfig(), *,
                      batch_size: int = 64) -> tuple[torch.Tensor, float, str]:
    """Normalised δ (P, N, C, H, W) on the model's device, the timestep used and the scheduler name.

    Every prompt sees the same N latents; prompts are batched so one denoiser call holds at most
    `batch_size` rows (at least one prompt's seeds).
    """
    if batch_size < 1:
        raise WorkbenchError(f"batch_size must be >= 1 (got {batch_size})")
    timestep, scheduler = first_timesteps(model, config)
    x_t = initial_latents(model, config).to(model.device)
    cfg = uses_cfg(model, config.guidance_scale)
    per_call = max(1, batch_size // (config.n_seeds * (2 if cfg else 1)))
    deltas = []
    for start in range(0, len(prompts), per_call):
        chunk = list(prompts[start:start + per_call])
        cond = _repeat_rows(encode(model, chunk, cfg=cfg), config.n_seeds)
        latents = x_t.repeat(len(chunk), 1, 1, 1)
        eps = prediction_at(model, latents.to(model.dtype), timestep, cond, config).float()
        delta = noise_difference(model, eps, latents, timestep)
        deltas.append(minmax_per_channel(delta).unflatten(0, (len(chunk), config.n_seeds)))
    return torch.cat(deltas), float(timestep), scheduler


def nemo_scores(model: Model, prompts: Sequence[str], config: NemoConfig = NemoConfig(), *,
                threshold: float | None = None, batch_size: int = 64) -> list[NemoScore]:
    """The noise-consistency score of each prompt (see the module docstring, item 1)."""
    prompts = _check_prompt_list(prompts)
    deltas, timestep, scheduler = noise_differences(model, prompts, config, batch_size=batch_size)
    kernel, sigma = msssim_window(*deltas.shape[-2:], config.betas, config.max_kernel_size, config.sigma_per_tap)
    score, per_seed = consistency(pairwise_msssim(deltas, kernel_size=kernel, sigma=sigma, betas=config.betas))
    return [NemoScore(p, float(s), tuple(per_seed[k].tolist()), timestep, kernel, sigma, scheduler, config, threshold)
            for k, (p, s) in enumerate(zip(prompts, score.tolist()))]


def _check_prompt_list(prompts: Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise WorkbenchError("give at least one prompt, as strings")
    return prompts


# ---------------------------------------------------------------------------------------------------
# 2. Wen et al. text-conditional noise magnitude
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WenScore:
    """One prompt's text-conditional noise magnitude, per step and per generation."""

    prompt: str
    magnitude: float
    norms: tuple[tuple[float, ...], ...]  # [measured step][generation]: ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂
    steps: tuple[int, ...]
    timesteps: tuple[float, ...]
    seeds: tuple[int, ...]
    scheduler: str
    config: WenConfig
    threshold: float | None = None
    images: torch.Tensor | None = field(default=None, repr=False, compare=False)  # None if stopped early

    @property
    def memorized(self) -> bool | None:
        return _exceeds(self.magnitude, self.threshold)

    @property
    def per_step(self) -> tuple[float, ...]:
        return tuple(sum(row) / len(row) for row in self.norms)

    @property
    def per_generation(self) -> tuple[float, ...]:
        return tuple(sum(col) / len(col) for col in zip(*self.norms))

    def to_json(self) -> dict[str, Any]:
        return {"magnitude": self.magnitude, "threshold": self.threshold, "memorized": self.memorized,
                "per_step": list(self.per_step), "per_generation": list(self.per_generation),
                "steps": list(self.steps), "timesteps": list(self.timesteps), "seeds": list(self.seeds),
                "scheduler": self.scheduler, "config": _config_json(self.config)}


class _EnoughSteps(Exception):
    """Raised from the hook once every requested step is measured: ends the sampling loop early."""


@contextmanager
def _text_noise_hook(model: Model, measure: frozenset[int] | None, last: int | None) -> Iterator[list]:
    """Record, per denoiser call, (step, timestep, per-row ‖cond − uncond‖₂) from its output.

    Reads the output the loop computes anyway (no extra forward). The batch is [uncond; cond]; a
    learned-sigma output (PixArt) keeps its first `in_channels` channels, the noise.
    """
    records: list[tuple[int, float, torch.Tensor]] = []
    channels = model.denoiser.config.in_channels
    calls = [-1]

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        calls[0] += 1
        step = calls[0]
        if measure is None or step in measure:
            if not model.cfg_active:
                raise WorkbenchError("the text-conditional magnitude needs a CFG batch; run through "
                                     "workbench.sampling.generate with guidance_scale > 1")
            out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            uncond, text = out[:, :channels].float().chunk(2)
            timestep = model.adapter.timestep_of(args, kwargs)
            records.append((step, float(timestep.reshape(-1)[0]), (text - uncond).flatten(1).norm(dim=1).cpu()))
        if last is not None and step >= last:
            raise _EnoughSteps

    handle = model.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        yield records
    finally:
        handle.remove()


@contextmanager
def _pipeline_scheduler(model: Model, choice: str) -> Iterator[str]:
    """Sample with the chosen scheduler; the pipeline's own is put back afterwards."""
    own = model.pipeline.scheduler
    model.pipeline.scheduler = _scheduler(model, choice)
    try:
        yield type(model.pipeline.scheduler).__name__
    finally:
        model.pipeline.scheduler = own


def text_noise_magnitude(model: Model, prompt: str, config: WenConfig = WenConfig(), *,
                         threshold: float | None = None) -> WenScore:
    """d(p) of one prompt (module docstring, item 2), from its G generations in one batch.

    One denoiser call per step is assumed (DDIM, Euler, flow matching; not Heun-type solvers).
    """
    if not isinstance(prompt, str):
        raise WorkbenchError("give the prompt as a string")
    measure = frozenset(config.measure_steps) if config.measure_steps is not None else None
    last = max(measure) if measure is not None else None
    images = None
    with _pipeline_scheduler(model, config.scheduler) as scheduler, _text_noise_hook(model, measure, last) as records:
        try:
            images = generate(model, [prompt] * config.generations, seed=config.seed, steps=config.steps,
                              guidance_scale=config.guidance_scale)
        except _EnoughSteps:
            pass
    if not records:
        raise WorkbenchError("the sampling loop made no denoiser call; check steps")
    norms = torch.stack([r[2] for r in records])  # (measured steps, generations)
    return WenScore(prompt, float(norms.mean()), tuple(tuple(row) for row in norms.tolist()),
                    tuple(r[0] for r in records), tuple(r[1] for r in records),
                    tuple(config.seed + g for g in range(config.generations)), scheduler, config, threshold, images)


# ---------------------------------------------------------------------------------------------------
# both detectors, per prompt
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Detection:
    """Both detectors' results for one prompt and the combined verdict (`combined_verdict`)."""

    prompt: str
    nemo: NemoScore
    wen: WenScore

    @property
    def memorized(self) -> bool | None:
        return combined_verdict(self.nemo.memorized, self.wen.memorized)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "nemo": self.nemo.to_json(), "wen": self.wen.to_json(),
                "memorized": self.memorized}


def detect(model: Model, prompts: Sequence[str], *, nemo: NemoConfig = NemoConfig(), wen: WenConfig = WenConfig(),
           thresholds: Thresholds = Thresholds(), batch_size: int = 64) -> Iterator[Detection]:
    """Yield each prompt's `Detection` in order; NeMo runs several prompts per denoiser batch."""
    prompts = _check_prompt_list(prompts)
    per_batch = max(1, batch_size // nemo.n_seeds)
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start:start + per_batch]
        for score in nemo_scores(model, chunk, nemo, threshold=thresholds.nemo, batch_size=batch_size):
            magnitude = text_noise_magnitude(model, score.prompt, wen, threshold=thresholds.wen)
            yield Detection(score.prompt, score, magnitude)


def calibrate(detections: Sequence[Detection], k: float = 1.0) -> Thresholds:
    """Thresholds mean + k·std (unbiased) of each detector over detections of non-memorized prompts."""
    return Thresholds(calibrate_threshold([d.nemo.score for d in detections], k),
                      calibrate_threshold([d.wen.magnitude for d in detections], k),
                      f"calibration ({len(detections)} prompts, mean + {k:g}·std)")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file, one per line; blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"prompts file {path} not found; give a text file with one prompt per line")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise WorkbenchError(f"{path} is not UTF-8 text; give a text file with one prompt per line") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise WorkbenchError(f"{path} has no prompts; write one prompt per line")
    return prompts


# ---------------------------------------------------------------------------------------------------
# 3. replication against training images
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Replication:
    """Per generation: the nearest training image by SSIM (highest) and by pixel L2 (lowest).

    `l2` is the Euclidean distance over all pixel values in [0, 1] (not divided by their number).
    """

    ssim_index: torch.Tensor
    ssim: torch.Tensor
    l2_index: torch.Tensor
    l2: torch.Tensor
    config: ReplicationConfig
    learned: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # metric -> (index, sim)

    def to_json(self) -> dict[str, Any]:
        return {"nearest_by_ssim": self.ssim_index.tolist(), "ssim": self.ssim.tolist(),
                "nearest_by_l2": self.l2_index.tolist(), "l2": self.l2.tolist(),
                "ssim_window": {"sigma": self.config.sigma, "kernel_size": self.config.kernel_size},
                **{f"nearest_by_{m}": index.tolist() for m, (index, _) in self.learned.items()},
                **{m: similarity.tolist() for m, (_, similarity) in self.learned.items()}}


def _check_images(images: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise WorkbenchError(f"{what} must be a non-empty (n, C, H, W) tensor")
    images = images.float()
    if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
        raise WorkbenchError(f"{what} must hold values in [0, 1]; divide 8-bit images by 255")
    return images


def ssim_matrix(generated: torch.Tensor, training: torch.Tensor, sigma: float = 1.5,
                max_elements: int = 2 ** 22) -> torch.Tensor:
    """(n, m) SSIM of every generated image against every training image, in chunks of pairs."""
    n, pixels = generated.shape[0], generated[0].numel()
    per_chunk = max(1, max_elements // (pixels * n))  # training images per torchmetrics call
    columns = []
    for start in range(0, training.shape[0], per_chunk):
        chunk = training[start:start + per_chunk]
        values = ssim(generated.repeat_interleave(chunk.shape[0], dim=0), chunk.repeat(n, 1, 1, 1),
                      sigma=sigma, kernel_size=gaussian_taps(sigma), data_range=1.0, reduction="none")
        columns.append(values.view(n, chunk.shape[0]))
    return torch.cat(columns, dim=1)


def nearest_training_images(generated: torch.Tensor, training: torch.Tensor,
                            config: ReplicationConfig = ReplicationConfig()) -> Replication:
    """For each generated image (n, C, H, W), its nearest of the training images (m, C, H, W)."""
    generated = _check_images(generated, "generated images")
    training = _check_images(training, "training images").to(generated.device)
    if generated.shape[1:] != training.shape[1:]:
        raise WorkbenchError(f"generated images are {tuple(generated.shape[1:])} but training images "
                             f"{tuple(training.shape[1:])}; resize them to the same size first")
    if min(generated.shape[-2:]) <= config.kernel_size // 2:
        raise WorkbenchError(f"images of {tuple(generated.shape[-2:])} are too small for an SSIM window of "
                             f"{config.kernel_size}; lower ReplicationConfig.sigma")
    learned = {}
    for metric in config.learned:
        best, index = learned_similarity(generated, training, metric, config.weights).max(dim=1)
        learned[metric] = (index, best)
    distance = torch.cdist(generated.flatten(1), training.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    best_l2, l2_index = distance.min(dim=1)
    k = config.ssim_candidates
    if k is None or k >= training.shape[0]:
        best_ssim, ssim_index = ssim_matrix(generated, training, config.sigma).max(dim=1)
    else:
        standard = lambda x: ((x - x.mean(dim=(2, 3), keepdim=True)) /  # noqa: E731
                              x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)).flatten(1)
        candidates = torch.cdist(standard(generated), standard(training)).topk(k, dim=1, largest=False).indices
        similarity = ssim(generated.repeat_interleave(k, dim=0), training[candidates.flatten()], sigma=config.sigma,
                          kernel_size=config.kernel_size, data_range=1.0, reduction="none").view(-1, k)
        best_ssim, best = similarity.max(dim=1)
        ssim_index = candidates.gather(1, best[:, None])[:, 0]
    return Replication(ssim_index, best_ssim, l2_index, best_l2, config, learned)
