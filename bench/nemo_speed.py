"""NeMo per prompt: workbench's batched search against the reference call pattern, same weights and prompts.

The reference pattern (ml-research/localizing_memorization_in_diffusion_models, as read in
shared/research/localization.md §1.4 and §1.7), re-implemented plainly here as the baseline:
  * every initial-selection iteration re-computes the prompt's value activations with a denoiser
    forward and re-derives the z-scores from the statistics;
  * every candidate set is scored on its own, and each scoring runs one extra, wasted denoiser call
    (the reference runs the U-Net at timesteps[0], discards it and returns at the next step);
  * refinement scores one removal per call.
workbench computes the activations once (one matmul where the value input is the text alone) and
scores `batch` candidate sets per batched forward. Both follow the same decision logic: the script
reports, per prompt, whether the initial and refined neuron sets are identical (float ties can differ:
a batched forward is not bit-identical to a single one), wall time and denoiser forwards, and exits
non-zero if any set differs.

Default: the shipped testbed U-Net (checkpoints/unet) on its memorized verbatim captions.
    .venv/bin/python bench/nemo_speed.py [--model checkpoints/unet] [--prompts 4] [--device cuda]
`--sd15`: an SD1.5-size U-Net and text encoder with random weights (bench/sd15.py), meant for a GPU
(float32 by default: half precision widens the float noise that decides ties; see bench/README.md):
    .venv/bin/python bench/nemo_speed.py --sd15 --device cuda
A random model memorizes nothing, so the prompts are the first testbed captions NeMo's detector flags
(score above the threshold calibrated on the held-out ones): the search runs on them as on a memorized
prompt. `--sample-size` shrinks the latent (64 = 512 px) for a CPU run.
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
from sd15 import sd15_pipeline
from workbench.models.loading import parse_device, parse_dtype
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
    refined, _ = refine(chosen, [s.path for s in sites], threshold if success else value, scorer, batch=1,
                        margin=config.tie_margin)
    scorer([refined])
    return chosen, refined, scorer.forwards + counter[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "unet"))
    parser.add_argument("--sd15", action="store_true", help="SD1.5-size U-Net and text encoder, random weights")
    parser.add_argument("--sample-size", type=int, default=None, help="latent side with --sd15 (default 64)")
    parser.add_argument("--prompts", type=int, default=4, help="flagged captions to localize")
    parser.add_argument("--holdout", type=int, default=32, help="held-out captions for statistics and threshold")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tie-margin", type=float, default=0.0, help="NeMo's tie_margin for both searches")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    parser.add_argument("--json", dest="json_out", default=None, help="write results as JSON ('-' = stdout)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    model = sd15_pipeline(device, dtype, args.sample_size) if args.sd15 else workbench.load(args.model, device=device,
                                                                                           dtype=dtype)
    name = "SD1.5-size, random weights" if args.sd15 else args.model
    testbed = json.loads((ROOT / "checkpoints" / "testbed.json").read_text())
    holdout_prompts = testbed["holdout_prompts"][:args.holdout]
    pool = [m["caption"] for m in testbed["memorized"] if m["kind"] == "verbatim"]
    pool += testbed["holdout_prompts"][args.holdout:]
    config = NemoLocalizationConfig(batch=args.batch, tie_margin=args.tie_margin)
    holdout = holdout_statistics(model, holdout_prompts, config)
    threshold = calibrate_threshold([s.score for s in nemo_scores(model, holdout_prompts, config.detection)])

    def summary() -> dict:
        return {"model": name, "device": str(device), "dtype": args.dtype, "threshold": threshold,
                "batch": args.batch, "tie_margin": args.tie_margin, "sample_size": model.denoiser.config.sample_size,
                "forwards_ratio": sum(r["reference_forwards"] for r in rows) / max(1, sum(r["ours_forwards"]
                                                                                      for r in rows)),
                "time_ratio": sum(r["reference_s"] for r in rows) / max(1e-9, sum(r["ours_s"] for r in rows)),
                "identical_neuron_sets": all(r["identical"] for r in rows), "prompts": rows}

    rows: list[dict] = []
    for prompt in pool:
        if len(rows) == args.prompts:
            break
        start = time.perf_counter()
        ours = localize_prompt(model, prompt, holdout, threshold, config)
        ours_s = time.perf_counter() - start
        if not ours.memorized:
            continue
        start = time.perf_counter()
        initial, refined, reference_forwards = reference_localize(model, prompt, holdout, threshold, config)
        reference_s = time.perf_counter() - start
        rows.append({"prompt": prompt, "identical": initial == ours.initial and refined == ours.refined,
                     "neurons": len(refined), "initial_neurons": len(initial),
                     "ours_forwards": ours.forwards, "reference_forwards": reference_forwards,
                     "ours_s": ours_s, "reference_s": reference_s})
        if args.json_out not in (None, "-"):
            emit_json(summary(), args.json_out)  # after every prompt: a run cut short keeps what it measured
    if not rows:
        sys.exit("NeMo flagged none of the testbed captions on this model: nothing to localize")
    result = summary()
    table = Table(title=f"NeMo per prompt, {name}, {device} {args.dtype}")
    for column in ("prompt", "neurons", "identical sets", "forwards ours", "forwards ref", "s ours", "s ref"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["prompt"], str(r["neurons"]), "yes" if r["identical"] else "NO", str(r["ours_forwards"]),
                      str(r["reference_forwards"]), f"{r['ours_s']:.2f}", f"{r['reference_s']:.2f}")
    Console().print(table)
    Console().print(f"reference / ours: {result['forwards_ratio']:.1f}× denoiser forwards, "
                    f"{result['time_ratio']:.1f}× wall time")
    emit_json(result, args.json_out)
    if not result["identical_neuron_sets"]:
        sys.exit("neuron sets differ: the batched search must make the reference's decisions")


if __name__ == "__main__":
    main()
