"""Does localization find the testbed's planted memorization, and only it? The bars of issue 4 on a checkpoint.

- **NeMo**: for each verbatim-memorized caption, its refined neurons (`localization.localize`); with
  them switched off as the search switched them off (zeroed, or set to their holdout mean) (a) the
  noise-consistency score against the calibrated threshold and (b) the replication SSIM of generations
  to the training image; the same for a random set with the same per-layer counts. Ordinary captions are generated with each caption's set off (the bar: mean SSIM to
  their un-ablated generations, same seeds, over all sets), with each random control off, and with the
  union of all sets off (the edit one would ship for all captions at once).
- **Wanda / SalUn**: one mask for all verbatim captions (the method's defaults unless configured), applied
  as zeroed weights; the same measurements against a random mask of equal density per site. Wanda's base prompts
  are "" by default, or ordinary held-out captions (`ReportConfig.wanda_base`).
- **Layer ablation**: the ranking of cross-attention layers and the attention-entropy difference
  between memorized and ordinary captions.
- **Dose-response** (a diagnostic of ours, not a method): the top fraction of each caption's value
  neurons by NeMo's |z| switched off, against random sets with the same per-site counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from localization.aggregate import random_like, random_mask_like
from localization.detection import calibrate_threshold, nemo_scores, ssim_matrix
from localization.localize import localize
from localization.nemo import NemoLocalizationConfig, holdout_statistics, nemo_sites, prompt_z_scores
from localization.salun import top_fraction
from workbench.errors import WorkbenchError
from workbench.intervene import ablate, mask_weights
from workbench.models.model import Model
from workbench.neurons import NeuronSet
from workbench.sampling import generate
from workbench.testbed.classifier import images_to_unit
from workbench.testbed.describe import GENERATION
from workbench.testbed.private import private_images


WANDA_BASES = ("empty", "ordinary")


@dataclass(frozen=True)
class ReportConfig:
    seeds: int = 8  # generations per caption
    holdout: int = 32  # held-out captions for NeMo's statistics and threshold
    ordinary: int = 16  # ordinary captions checked for side effects
    steps: int = GENERATION["steps"]
    guidance_scale: float = GENERATION["guidance"]
    control_seed: int = 1
    captions: tuple[str, ...] | None = None  # verbatim captions to check (None = all fourteen)
    # Wanda's base prompts: "" per caption (ConceptPrune's memorize_*), or `ordinary`: as many held-out
    # captions, taken after the threshold and side-effect ones (its coco_memorize_*, with COCO captions)
    wanda_base: str = "empty"

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.holdout < 2 or self.ordinary < 1:
            raise WorkbenchError("the localization report needs seeds >= 1, holdout >= 2 and ordinary >= 1")
        if self.wanda_base not in WANDA_BASES:
            raise WorkbenchError(f"unknown Wanda base {self.wanda_base!r}; use {' or '.join(WANDA_BASES)}")

    def base_prompts(self, holdout_prompts: list[str], captions: int) -> list[str] | None:
        """Wanda's base prompts for `captions` verbatim captions (None: ConceptPrune's "" per caption)."""
        if self.wanda_base == "empty":
            return None
        start = self.holdout + self.ordinary
        return check_holdout(holdout_prompts, self, captions)[start:start + captions]


def check_holdout(prompts: Any, config: ReportConfig, wanda_captions: int = 0) -> list[str]:
    """The held-out captions, if there are enough for NeMo's statistics, the side-effect check and (with
    `wanda_base="ordinary"`) Wanda's base prompts for `wanda_captions` captions."""
    need = config.holdout + config.ordinary + (wanda_captions if config.wanda_base == "ordinary" else 0)
    if not isinstance(prompts, list) or len(prompts) < need or not all(isinstance(p, str) and p for p in prompts):
        fix = "; or use --wanda-base empty" if need > config.holdout + config.ordinary else ""
        raise WorkbenchError(f"the report needs {need} held-out captions (testbed.json's holdout_prompts); "
                             f"write testbed.json with `workbench testbed describe`{fix}")
    return prompts


def _verbatim(config: ReportConfig) -> list:
    """The verbatim-memorized photos the report checks."""
    photos = [p for p in private_images() if p.kind == "verbatim"]
    return photos if config.captions is None else [p for p in photos if p.caption in config.captions]


def _effect(model: Model, caption: str, own: torch.Tensor, threshold: float, nemo: NemoLocalizationConfig,
            config: "ReportConfig") -> dict[str, Any]:
    """Noise-consistency score and replication SSIM of one caption, under whatever edit is active."""
    images = generate(model, [caption] * config.seeds, seed=0, steps=config.steps,
                      guidance_scale=config.guidance_scale)
    score = nemo_scores(model, [caption], nemo.detection)[0].score
    ssim = ssim_matrix(images, own)[:, 0]
    return {"score": score, "under_threshold": score <= threshold, "ssim_mean": float(ssim.mean()),
            "ssim_max": float(ssim.max()), "seed_ssim": _seed_similarity(images)}


def _seed_similarity(images: torch.Tensor) -> float | None:
    """Mean SSIM between generations of different seeds: near 1 when the caption fixes the image."""
    if len(images) < 2:
        return None
    pairs = ssim_matrix(images, images)
    return float((pairs.sum() - pairs.diagonal().sum()) / (len(images) * (len(images) - 1)))


def _calibrated_threshold(model: Model, holdout_prompts: list[str], config: "ReportConfig",
                          nemo: NemoLocalizationConfig) -> float:
    """NeMo's threshold (mean + 1 std of the held-out captions' scores), as `localize` calibrates it."""
    return calibrate_threshold([s.score for s in nemo_scores(model, holdout_prompts[:config.holdout], nemo.detection)])


def _ordinary_change(model: Model, prompts: list[str], config: "ReportConfig",
                     edits: dict[str, Callable[[], Any]]) -> dict[str, torch.Tensor]:
    """Per edit (a context-manager factory): SSIM of each ordinary caption's generation to its un-edited one."""
    sample = dict(seed=0, steps=config.steps, guidance_scale=config.guidance_scale)
    before = generate(model, prompts, **sample)
    out = {}
    for name, edit in edits.items():
        with edit():
            out[name] = torch.diagonal(ssim_matrix(generate(model, prompts, **sample), before))
    return out


def nemo_report(model: Model, holdout_prompts: list[str], config: ReportConfig = ReportConfig(),
                nemo: NemoLocalizationConfig = NemoLocalizationConfig(),
                advance: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Per verbatim caption: neurons, scores and SSIMs with NeMo's set and with a random control."""
    photos = _verbatim(config)
    located = localize(model, "nemo", [p.caption for p in photos], config=nemo,
                       holdout=holdout_prompts[:config.holdout], advance=advance)
    threshold = located.provenance["threshold"]
    rows, controls = [], []
    for photo, result, neurons in zip(photos, located.results, located.per_prompt()):
        advance(f"checking {photo.caption}")
        own = images_to_unit(photo.image[None])
        control = random_like(neurons, model.graph, config.control_seed)
        controls.append(control)
        entry = {"caption": photo.caption, "memorized": result["memorized"], "neurons": len(neurons),
                 "per_site": {site: len(indices) for site, indices in neurons.items()},
                 "score_before": result["detection_score"], "search_image_ssim": result["refined_image_ssim"]}
        for name, blocked in (("none", NeuronSet()), ("nemo", neurons), ("random", control)):
            with located.deactivate(model, blocked):
                entry[name] = _effect(model, photo.caption, own, threshold, nemo, config)
        entry["removed"] = bool(len(neurons)) and entry["nemo"]["under_threshold"] and entry["nemo"]["ssim_mean"] < 0.5
        entry["random_removed"] = (bool(len(control)) and entry["random"]["under_threshold"]
                                   and entry["random"]["ssim_mean"] < 0.5)
        rows.append(entry)
    advance("ordinary captions")
    ordinary = holdout_prompts[config.holdout:config.holdout + config.ordinary]
    edits = {"union": lambda: located.deactivate(model)}
    for row, neurons, control in zip(rows, located.per_prompt(), controls):
        if len(neurons):
            edits[row["caption"]] = lambda neurons=neurons: located.deactivate(model, neurons)
            edits["random: " + row["caption"]] = lambda control=control: located.deactivate(model, control)
    changes = _ordinary_change(model, ordinary, config, edits)
    unchanged = changes.pop("union")
    for row in rows:
        for key, name in (("ordinary_ssim_to_unablated_mean", row["caption"]),
                          ("random_ordinary_ssim_to_unablated_mean", "random: " + row["caption"])):
            change = changes.get(name)
            row[key] = float(change.mean()) if change is not None else None
    own_set = [row["ordinary_ssim_to_unablated_mean"] for row in rows if row["caption"] in changes]
    random_set = [row["random_ordinary_ssim_to_unablated_mean"] for row in rows if row["caption"] in changes]
    per_site = Counter()
    for site, _ in located.neurons:
        per_site[site] += 1
    summary = {
        "threshold": threshold, "captions": len(rows),
        "removed": float(np.mean([r["removed"] for r in rows])),
        "random_removed": float(np.mean([r["random_removed"] for r in rows])),
        "neurons_per_caption": [r["neurons"] for r in rows], "union_per_site": dict(per_site),
        "ordinary_ssim_to_unablated_mean": float(np.mean(own_set)) if own_set else None,
        "random_ordinary_ssim_to_unablated_mean": float(np.mean(random_set)) if random_set else None,
        "ordinary_ssim_with_union_off_mean": float(unchanged.mean()),
    }
    summary["passes"] = {"removes_memorization": summary["removed"] >= 0.8,
                         "random_does_not": summary["random_removed"] < summary["removed"],
                         "ordinary_unchanged": bool(own_set) and summary["ordinary_ssim_to_unablated_mean"] >= 0.9}
    return {"config": asdict(config), "summary": summary, "captions": rows,
            "ordinary_with_union_off": [{"prompt": p, "ssim_to_unablated": float(s)}
                                        for p, s in zip(ordinary, unchanged)],
            "localization": located.to_json()}


def mask_report(model: Model, method: str, holdout_prompts: list[str], config: ReportConfig = ReportConfig(),
                method_config: Any = None, nemo: NemoLocalizationConfig = NemoLocalizationConfig(),
                advance: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Wanda or SalUn (defaults unless `method_config`): one mask for every verbatim caption, zeroed; against a
    random mask of equal density per site."""
    photos = _verbatim(config)
    captions = [p.caption for p in photos]
    images = images_to_unit(np.stack([p.image for p in photos])) if method == "salun" else None
    base = config.base_prompts(holdout_prompts, len(captions)) if method == "wanda" else None
    located = localize(model, method, captions, config=method_config, images=images, holdout=base, advance=advance)
    mask, control = located.mask, random_mask_like(located.mask, config.control_seed)
    threshold = _calibrated_threshold(model, holdout_prompts, config, nemo)
    rows = []
    for photo in photos:
        advance(f"checking {photo.caption}")
        own = images_to_unit(photo.image[None])
        entry = {"caption": photo.caption, "none": _effect(model, photo.caption, own, threshold, nemo, config)}
        for name, chosen in ((method, mask), ("random", control)):
            with mask_weights(model, chosen):
                entry[name] = _effect(model, photo.caption, own, threshold, nemo, config)
        rows.append(entry)
    ordinary = holdout_prompts[config.holdout:config.holdout + config.ordinary]
    unchanged = {name: float(change.mean()) for name, change in _ordinary_change(
        model, ordinary, config, {method: lambda: mask_weights(model, mask),
                                  "random": lambda: mask_weights(model, control)}).items()}
    mean = lambda name, key: float(np.mean([r[name][key] for r in rows]))  # noqa: E731
    summary = {"threshold": threshold, "density": mask.density(), "weights": mask.count(),
               **{f"{name}_ssim_mean": mean(name, "ssim_mean") for name in ("none", method, "random")},
               **{f"{name}_under_threshold": mean(name, "under_threshold") for name in ("none", method, "random")},
               "ordinary_ssim_to_unedited": unchanged}
    return {"method": method, "config": located.config, "base_prompts": base, "summary": summary, "captions": rows}


def _top_z(z: dict[str, torch.Tensor], fraction: float) -> NeuronSet:
    """The int(fraction · n) neurons of highest z over every site pooled (n: all of them)."""
    chosen = top_fraction(z, fraction)
    return NeuronSet({path: torch.nonzero(mask).flatten().tolist() for path, mask in chosen.items() if mask.any()})


DOSE_FRACTIONS = (0.1, 0.25, 0.5)
REPORT_METHODS = ("nemo", "wanda", "salun", "ablation", "dose")


def dose_report(model: Model, holdout_prompts: list[str], config: ReportConfig = ReportConfig(),
                nemo: NemoLocalizationConfig = NemoLocalizationConfig(), fractions: tuple[float, ...] = DOSE_FRACTIONS,
                advance: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """How much of NeMo's own ranking must go before a verbatim caption's memorization goes.

    Per caption and fraction f: switch off the top f of its value neurons by NeMo's |z| (every NeMo site
    pooled) and, as control, a random set with the same per-site counts; measure the noise-consistency
    score, the replication SSIM, the SSIM between seeds, and the ordinary captions' SSIM to their
    un-edited generations. NeMo's search stops at θ 1.25 and top-15 per site; this shows whether any
    z-ranked set meets issue 4's bar at all on the checkpoint.
    """
    photos = _verbatim(config)
    stats = holdout_statistics(model, holdout_prompts[:config.holdout], nemo)
    threshold = _calibrated_threshold(model, holdout_prompts, config, nemo)
    ordinary = holdout_prompts[config.holdout:config.holdout + config.ordinary]
    rows = []
    for photo in photos:
        advance(f"dose: {photo.caption}")
        own = images_to_unit(photo.image[None])
        _, z = prompt_z_scores(model, photo.caption, stats, nemo)
        entry: dict[str, Any] = {"caption": photo.caption, "fractions": []}
        for fraction in fractions:
            ranked = _top_z(z, fraction)
            arms = {"nemo_z": ranked, "random": random_like(ranked, model.graph, config.control_seed)}
            point: dict[str, Any] = {"fraction": fraction, "neurons": len(ranked)}
            for name, neurons in arms.items():
                with ablate(model, neurons):
                    point[name] = _effect(model, photo.caption, own, threshold, nemo, config)
                point[name]["removed"] = point[name]["under_threshold"] and point[name]["ssim_mean"] < 0.5
            changes = _ordinary_change(model, ordinary, config, {
                name: (lambda neurons=neurons: ablate(model, neurons)) for name, neurons in arms.items()})
            for name, change in changes.items():
                point[name]["ordinary_ssim_to_unablated"] = float(change.mean())
            entry["fractions"].append(point)
        rows.append(entry)
    summary = []
    for index, fraction in enumerate(fractions):
        points = [row["fractions"][index] for row in rows]
        summary.append({"fraction": fraction, **{name: {
            "removed": float(np.mean([p[name]["removed"] for p in points])),
            "ssim_mean": float(np.mean([p[name]["ssim_mean"] for p in points])),
            "seed_ssim": float(np.mean([p[name]["seed_ssim"] for p in points])) if config.seeds > 1 else None,
            "score_mean": float(np.mean([p[name]["score"] for p in points])),
            "ordinary_ssim_to_unablated": float(np.mean([p[name]["ordinary_ssim_to_unablated"] for p in points])),
        } for name in ("nemo_z", "random")}})
    return {"threshold": threshold, "sites": nemo.sites, "summary": summary, "captions": rows}


def ablation_report(model: Model, holdout_prompts: list[str], config: ReportConfig = ReportConfig(),
                    advance: Callable[[str], None] = lambda text: None) -> dict[str, Any]:
    """Layer ranking on the verbatim captions and the entropy difference to ordinary captions."""
    captions = [p.caption for p in _verbatim(config)]
    located = localize(model, "ablation", captions, holdout=holdout_prompts[:config.ordinary], advance=advance)
    entropy = located.extra.get("entropy", {})
    return {"ranking": located.extra["ranking"], "entropy": entropy,
            "mean_entropy_difference": float(np.mean([v["difference"] for v in entropy.values()])) if entropy else None}


def check_methods(methods: tuple[str, ...]) -> None:
    """One-line error for a section name the report does not have, or for none at all."""
    if not methods:
        raise WorkbenchError(f"give at least one method: {', '.join(REPORT_METHODS)}")
    unknown = [method for method in methods if method not in REPORT_METHODS]
    if unknown:
        raise WorkbenchError(f"unknown method {unknown[0]!r}; use {', '.join(REPORT_METHODS)}")


def localization_report(model: Model, holdout_prompts: list[str], methods: tuple[str, ...],
                        config: ReportConfig = ReportConfig(),
                        advance: Callable[[str], None] = lambda text: None,
                        nemo: NemoLocalizationConfig = NemoLocalizationConfig(),
                        dose_fractions: tuple[float, ...] = DOSE_FRACTIONS,
                        mask_configs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sections of `methods` (nemo, wanda, salun, ablation, dose) on one checkpoint; `nemo` configures
    NeMo's search, the score every section reports and the dose-response's sites; `mask_configs` maps
    wanda / salun to a config other than the method's defaults."""
    check_methods(methods)
    check_holdout(holdout_prompts, config, len(_verbatim(config)) if "wanda" in methods else 0)
    if {"nemo", "dose"} & set(methods):
        nemo_sites(model, nemo.sites)  # a wrong block name fails before any section runs
    report: dict[str, Any] = {"config": asdict(config), "nemo_config": asdict(nemo)}
    for method in methods:
        if method == "nemo":
            report["nemo"] = nemo_report(model, holdout_prompts, config, nemo, advance)
        elif method in ("wanda", "salun"):
            report[method] = mask_report(model, method, holdout_prompts, config, (mask_configs or {}).get(method),
                                         nemo, advance)
        elif method == "ablation":
            report["ablation"] = ablation_report(model, holdout_prompts, config, advance)
        else:
            report["dose"] = dose_report(model, holdout_prompts, config, nemo, dose_fractions, advance)
    return report
