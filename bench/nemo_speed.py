"""NeMo per prompt: workbench's batched search against the reference call pattern, same weights and prompts.

The reference pattern (ml-research/localizing_memorization_in_diffusion_models, as read in
shared/research/localization.md §1.4 and §1.7), re-implemented plainly here as the baseline:
  * every initial-selection iteration re-computes the prompt's value activations with a denoiser
    forward and re-derives the z-scores from the statistics;
  * every candidate set is scored on its own, and each scoring runs one extra, wasted denoiser call
    (the reference runs the U-Net at timesteps[0], discards it and returns at the next step);
  * refinement scores one removal per call.
workbench computes the activations once (one matmul where the value input is the text alone) and
scores `batch` candidate sets per batched forward. Both make the same decisions: the script checks
that the initial and refined neuron sets are identical, then reports wall time and denoiser forwards.

Default: the shipped testbed U-Net (checkpoints/unet) on its memorized verbatim captions.
    .venv/bin/python bench/nemo_speed.py [--model checkpoints/unet] [--prompts 4] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import workbench
from localization.detection import calibrate_threshold, first_timesteps, initial_latents, nemo_scores
from localization.nemo import (MemorizationScorer, NemoLocalizationConfig, holdout_statistics, localize_prompt,
                               nemo_sites, capture_outputs)
from localization.nemo_search import candidates, refine, z_scores
from report import emit_json  # bench/report.py (scripts run from bench/ on sys.path)
from workbench.neurons import NeuronSet
from workbench.sampling import encode

ROOT = Path(__file__).resolve().parents[1]


class ReferenceScorer(MemorizationScorer):
    """One candidate set per scoring, plus the reference's wasted first denoiser call."""

    def __call__(self, sets: list[NeuronSet]) -> list[float]:
        out = []
        for neurons in sets:
            self._deltas([NeuronSet()])  # the discarded call at timesteps[0]
            out += super().__call__([neurons])
        return out


def reference_activations(model, prompt, sites, config, counter):
    """The prompt's value activations from a denoiser forward (batch 1), as the reference re-computes them."""
    timestep, _ = first_timesteps(model, config.detection)
    latents = initial_latents(model, config.detection)[:1].to(model.device, model.dtype)
    cond = encode(model, [prompt], cfg=False)
    with torch.no_grad(), capture_outputs(model, sites) as outputs:
        model.adapter.denoise(model.denoiser, latents, timestep.to(model.device), cond.kwargs)
    counter[0] += 1
    mean = (lambda v: v.abs().mean(1)) if config.token_mean == "abs" else (lambda v: v.mean(1))
    return {path: mean(value.double())[0] for path, value in outputs.items()}


def reference_localize(model, prompt, holdout, threshold, config):
    """NeMo's search with the reference's call pattern; returns (initial, refined, forwards)."""
    seeds = nemo_scores(model, [prompt], config.detection, threshold=threshold)[0].memorized_seeds
    sites = nemo_sites(model, config.sites)
    scorer = ReferenceScorer(model, prompt, seeds, config)
    counter = [2]  # the detection call (the reference's two calls: wasted + used)
    steps = config.schedule.steps(max(s.out_features for s in sites))
    chosen, success, value = None, False, None
    for theta, k in steps:
        activations = reference_activations(model, prompt, sites, config, counter)
        z = {p: torch.nan_to_num(v, nan=0.0) for p, v in z_scores(activations, holdout).items()}
        chosen = candidates(activations, z, theta, k, config.top_k_on)
        value = scorer([chosen])[0]
        if value <= threshold:
            success = True
            break
    refined, _ = refine(chosen, [s.path for s in sites], threshold if success else value, scorer, batch=1)
    scorer([refined])
    return chosen, refined, scorer.forwards + counter[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "unet"))
    parser.add_argument("--prompts", type=int, default=4, help="memorized verbatim captions to localize")
    parser.add_argument("--holdout", type=int, default=32, help="held-out captions for statistics and threshold")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", dest="json_out", default=None, help="write results as JSON ('-' = stdout)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = workbench.load(args.model, device=args.device)
    testbed = json.loads((ROOT / "checkpoints" / "testbed.json").read_text())
    prompts = [m["caption"] for m in testbed["memorized"] if m["kind"] == "verbatim"][:args.prompts]
    holdout_prompts = testbed["holdout_prompts"][:args.holdout]
    config = NemoLocalizationConfig(batch=args.batch)
    holdout = holdout_statistics(model, holdout_prompts, config)
    threshold = calibrate_threshold([s.score for s in nemo_scores(model, holdout_prompts, config.detection)])
    rows = []
    for prompt in prompts:
        start = time.perf_counter()
        ours = localize_prompt(model, prompt, holdout, threshold, config)
        ours_s = time.perf_counter() - start
        if not ours.memorized:
            rows.append({"prompt": prompt, "memorized": False})
            continue
        start = time.perf_counter()
        initial, refined, reference_forwards = reference_localize(model, prompt, holdout, threshold, config)
        reference_s = time.perf_counter() - start
        if initial != ours.initial or refined != ours.refined:
            sys.exit(f"neuron sets differ for {prompt!r}: the batched search must make the reference's decisions")
        rows.append({"prompt": prompt, "memorized": True, "neurons": len(refined), "ours_forwards": ours.forwards,
                     "reference_forwards": reference_forwards, "ours_s": ours_s, "reference_s": reference_s})
    done = [r for r in rows if r["memorized"]]
    summary = {"model": args.model, "device": args.device, "threshold": threshold, "batch": args.batch,
               "forwards_ratio": sum(r["reference_forwards"] for r in done) / max(1, sum(r["ours_forwards"] for r in done)),
               "time_ratio": sum(r["reference_s"] for r in done) / max(1e-9, sum(r["ours_s"] for r in done)),
               "identical_neuron_sets": True, "prompts": rows}
    table = Table(title=f"NeMo per prompt, {args.device} (identical neuron sets)")
    for column in ("prompt", "neurons", "forwards ours", "forwards ref", "s ours", "s ref"):
        table.add_column(column)
    for r in done:
        table.add_row(r["prompt"], str(r["neurons"]), str(r["ours_forwards"]), str(r["reference_forwards"]),
                      f"{r['ours_s']:.2f}", f"{r['reference_s']:.2f}")
    Console().print(table)
    Console().print(f"reference / ours: {summary['forwards_ratio']:.1f}× denoiser forwards, "
                    f"{summary['time_ratio']:.1f}× wall time")
    emit_json(summary, args.json_out)


if __name__ == "__main__":
    main()
