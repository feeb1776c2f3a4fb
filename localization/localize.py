"""One entry point for localization: `localize(model, method, prompts=..., config=...)`.

A `Localization` holds what a method found per prompt, the union of its neurons, its configuration
and its provenance (method, config, prompt-set hash, model tensor hash, seeds, version, time). It is
written onto the neuron graph (`write_onto`), saved as JSON and loaded back.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import workbench
from localization.ablation import (AblationConfig, attention_entropy, concept_probability, memorization_score,
                                   rank_layers)
from localization.detection import calibrate_threshold, check_nemo_threshold, nemo_scores
from localization.nemo import NemoLocalizationConfig, deactivation_baseline, holdout_statistics, localize_prompt
from localization.salun import SalUnConfig, saliency_mask
from localization.sharding import Shard, gather_statistics, map_prompts
from localization.wanda import WandaConfig, localize_weights
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_tensor_hash, prompt_set_hash
from workbench.graph import NeuronGraph
from workbench.intervene import Ablation, Patch, ablate, ablate_to
from workbench.io import atomic_write_json, check_writable, read_json
from workbench.models.model import Model
from workbench.neurons import NeuronSet, WeightMask
from workbench.sampling import generate

LOCALIZATION_FORMAT = "workbench.localization/1"
METHODS = ("nemo", "wanda", "salun", "ablation")
CONFIGS = {"nemo": NemoLocalizationConfig, "wanda": WandaConfig, "salun": SalUnConfig, "ablation": AblationConfig}


def _plain(value: Any) -> Any:
    """JSON form of a config (nested dataclasses and tuples included)."""
    if is_dataclass(value):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class Localization:
    """What a method found: per prompt (`results`, method-specific JSON) and the union of its neurons;
    weight-mask methods (Wanda, SalUn) also hold one `mask` for the whole prompt set."""

    method: str
    results: list[dict[str, Any]]
    config: dict[str, Any]
    provenance: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    mask: WeightMask | None = None

    def per_prompt(self) -> list[NeuronSet]:
        return [NeuronSet(r.get("neurons", {})) for r in self.results]

    @property
    def neurons(self) -> NeuronSet:
        union = NeuronSet()
        for neurons in self.per_prompt():
            union = union | neurons
        return union

    def frequency(self) -> Counter:
        """(site, index) -> number of prompts whose set holds it."""
        return Counter(neuron for neurons in self.per_prompt() for neuron in neurons)

    def deactivate(self, model: Model, neurons: NeuronSet | None = None) -> Ablation | Patch:
        """Switch `neurons` (default: the union) off as the search did, while the block runs: zeroed, or set to
        their holdout mean where NeMo ran with `deactivation="mean"` (the `baseline` saved with the result)."""
        neurons = self.neurons if neurons is None else neurons
        baseline = self.extra.get("baseline")
        if baseline is None:
            return ablate(model, neurons)
        return ablate_to(model, neurons, {path: torch.tensor(values) for path, values in baseline.items()})

    def write_onto(self, graph: NeuronGraph) -> None:
        """Mark each found neuron on the graph: attribute `<method>_prompts` = how many prompts chose it."""
        union, counts = self.neurons, self.frequency()
        graph.annotate(union, f"{self.method}_prompts",
                       {site: [counts[(site, i)] for i in indices] for site, indices in union.items()})

    def to_json(self) -> dict[str, Any]:
        return {"format": LOCALIZATION_FORMAT, "method": self.method, "config": self.config,
                "provenance": self.provenance, "results": self.results, **self.extra}

    @staticmethod
    def mask_path(path: str | os.PathLike) -> Path:
        """Where `save(path)` puts the weight mask: beside the JSON."""
        return Path(path).with_suffix(".mask.safetensors")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """The JSON at `path`; a weight mask beside it (`mask_path`), written first. Both paths are checked
        before either is written, so a refused save leaves no half of it behind."""
        data = self.to_json()
        check_writable(path, overwrite=overwrite)
        if self.mask is not None:
            check_writable(self.mask_path(path), overwrite=overwrite)
            self.mask.save(self.mask_path(path), overwrite=overwrite)
            data["mask"] = self.mask_path(path).name
        atomic_write_json(path, data, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Localization":
        data = read_json(path, "localization")
        if not isinstance(data, dict) or data.get("format") != LOCALIZATION_FORMAT:
            raise WorkbenchError(f"{path} is not a workbench localization ({LOCALIZATION_FORMAT}); "
                                 "write it with Localization.save or `workbench localize --out`")
        core = ("format", "method", "config", "provenance", "results", "mask")
        mask = WeightMask.load(Path(path).parent / data["mask"]) if data.get("mask") else None
        return cls(data["method"], data["results"], data["config"], data["provenance"],
                   {k: v for k, v in data.items() if k not in core}, mask)

    def check_model(self, model: Model) -> None:
        """Raise if `model` is not the model this localization was computed on."""
        if model_tensor_hash(model) != self.provenance["model_tensor_sha256"]:
            raise WorkbenchError("this localization was computed on a different model (tensor hash differs); "
                                 "localize again on this model")


def _check_prompts(prompts: Sequence[str], what: str) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise WorkbenchError(f"give at least one non-empty {what} prompt")
    return prompts


@dataclass
class _Request:
    """One `localize` call: what every method reads, and the provenance it adds to."""

    model: Model
    method: str
    prompts: list[str]
    config: Any
    provenance: dict[str, Any]
    holdout: Sequence[str] | None
    threshold: float | None
    images: torch.Tensor | None
    shard: Shard
    advance: Callable[[str], None]

    def result(self, results: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
               mask: WeightMask | None = None) -> Localization:
        results = results if results is not None else [{"prompt": p} for p in self.prompts]
        if mask is not None:
            extra = {"density": mask.density(), "weights": mask.count(), **(extra or {})}
        return Localization(self.method, results, _plain(self.config), self.provenance, extra or {}, mask)


def _wanda(request: _Request) -> Localization:
    base = list(request.holdout) if request.holdout is not None else None  # "" is a valid base prompt
    if base is not None and (not base or not all(isinstance(p, str) for p in base)):
        raise WorkbenchError("give the base prompts as a non-empty list of strings")
    request.advance("column norms")
    mask = localize_weights(request.model, request.prompts, request.config, base, request.shard)
    request.provenance["seeds"] = f"every prompt generated from seed {request.config.seed}"
    if request.config.mode != "wanda":  # pure Wanda reads no base prompts
        request.provenance["base_sha256"] = prompt_set_hash(base or [""] * len(request.prompts))
    return request.result(mask=mask)


def _salun(request: _Request) -> Localization:
    images, seed = request.images, request.config.seed
    request.provenance["forget_images"] = "given" if images is not None else f"generated, seed {seed} + i"
    if images is None:
        request.advance("generating the forget images")
        images = generate(request.model, request.prompts, seed=seed)
    request.advance("forgetting gradients")
    mask = saliency_mask(request.model, images, request.prompts, request.config, request.shard)
    request.provenance["seeds"] = f"timesteps and noise from torch.Generator().manual_seed({seed})"
    return request.result(mask=mask)


def _ablation(request: _Request) -> Localization:
    model, prompts, config = request.model, request.prompts, request.config
    if config.concept is None:
        score, name = memorization_score(model, prompts, config.detection), "memorization"
    else:
        from workbench.testbed.classifier import load_classifier

        head, label = config.concept_label
        score = concept_probability(model, load_classifier(config.classifier), head, label, prompts,
                                    config.concept_seeds, config.steps, config.guidance_scale)
        name = f"probability of {head}={label}"
        request.provenance["seeds"] = f"concept generations: seeds 0..{config.concept_seeds - 1} per prompt"
    request.advance("ranking layers")
    extra: dict[str, Any] = {"score": name, "ranking": rank_layers(model, score, config.mode, request.advance)}
    if request.holdout is not None and config.entropy:
        request.advance("attention entropy")
        holdout = _check_prompts(request.holdout, "holdout")
        target, ordinary = (attention_entropy(model, group, steps=config.steps, guidance_scale=config.guidance_scale)
                            for group in (prompts, holdout))
        extra["entropy"] = {layer: {"prompts": target[layer], "holdout": ordinary[layer],
                                    "difference": target[layer] - ordinary[layer]} for layer in target}
        request.provenance["holdout_sha256"] = prompt_set_hash(holdout)
    return request.result(extra=extra)


def _nemo(request: _Request) -> Localization:
    model, config, shard, advance = request.model, request.config, request.shard, request.advance
    if request.holdout is None:
        raise WorkbenchError("nemo needs holdout prompts (non-memorized, one per line) for its statistics; "
                             "pass holdout=... or --holdout FILE")
    holdout = _check_prompts(request.holdout, "holdout")
    if len(holdout) < 2:
        raise WorkbenchError("nemo needs at least 2 holdout prompts for its statistics; give more, one per line")
    advance("holdout statistics")
    mine = [holdout[i] for i in shard.positions(len(holdout))]
    statistics = gather_statistics(holdout_statistics(model, mine, config) if mine else {}, shard)
    threshold, source = check_nemo_threshold(request.threshold), "given"
    if threshold is None:
        advance("calibrating the threshold")
        threshold = calibrate_threshold(map_prompts(lambda p: nemo_scores(model, [p], config.detection)[0].score,
                                                    holdout, shard))
        source = f"mean + 1 std of {len(holdout)} holdout prompts"

    def search(prompt: str) -> dict[str, Any]:
        advance(prompt)
        return localize_prompt(model, prompt, statistics, threshold, config).to_json()
    results = map_prompts(search, request.prompts, shard)
    request.provenance.update(holdout_sha256=prompt_set_hash(holdout), threshold=threshold, threshold_source=source,
                              seeds=f"detection latents: draws 0..{config.detection.n_seeds - 1} of "
                                    f"torch.Generator().manual_seed({config.detection.seed})")
    baseline = deactivation_baseline(config, statistics)
    extra = None if baseline is None else {"baseline": {path: values.tolist() for path, values in baseline.items()}}
    return request.result(results, extra)


_METHOD_RUNNERS = {"nemo": _nemo, "wanda": _wanda, "salun": _salun, "ablation": _ablation}


def localize(model: Model, method: str, prompts: Sequence[str], *, config: Any = None,
             holdout: Sequence[str] | None = None, threshold: float | None = None,
             images: torch.Tensor | None = None, shard: Shard = Shard(),
             advance: Callable[[str], None] = lambda text: None) -> Localization:
    """Run `method` on `prompts`. For NeMo, `holdout` are non-memorized prompts (its statistics and,
    unless `threshold` is given, its threshold: mean + 1 std of their noise-consistency scores); for
    Wanda they are the base prompts (default "" per target prompt, ConceptPrune's for memorization);
    for layer ablation, the ordinary prompts of the entropy comparison. SalUn's forget set is `images`
    (N, 3, H, W in [0, 1]) captioned by `prompts`; without images, one generation of the model per
    prompt, as SalUn builds its NSFW forget set.

    `shard` (`localization.sharding.current_shard()` under `accelerate launch`) splits NeMo's holdout
    statistics, calibration and per-prompt search, Wanda's column norms and SalUn's forget batches over
    processes; every process returns the whole result."""
    if method not in METHODS:
        raise WorkbenchError(f"unknown localization method {method!r}; use one of {', '.join(METHODS)}")
    prompts = _check_prompts(prompts, "target")
    config = config or CONFIGS[method]()
    if not isinstance(config, CONFIGS[method]):
        raise WorkbenchError(f"{method} needs a {CONFIGS[method].__name__}, got {type(config).__name__}")
    provenance = {
        "method": method, "workbench": workbench.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model_source": str(model.source) if model.source else None, "model_tensor_sha256": model_tensor_hash(model),
        "prompts_sha256": prompt_set_hash(prompts),
    }
    request = _Request(model, method, prompts, config, provenance, holdout, threshold, images, shard, advance)
    return _METHOD_RUNNERS[method](request)
