"""Overhead of workbench interventions against a plain denoiser forward, as ratios from one run.

Variants, each timed per denoiser forward (torch.no_grad; the intervention is set up and torn down
around every forward, as a loop over single forwards would do):

  plain           the denoiser forward alone (the reference: ratio 1.00)
  record          `workbench.intervene.record` on 16 sites (full per-neuron RunningStats, float64)
  ablate          `workbench.intervene.ablate` of 100 neurons spread over the cross_attn_value sites
  nnsight_record  one `model.tracer()` trace saving the per-neuron mean of the same 16 sites
  nnsight_ablate  one trace zeroing the same 100 neurons
  hook_mean       control: bare `register_forward_hook`s computing the same means as nnsight_record
                  (record computes more than a mean; this separates mechanism from statistics)

The 16 sites are the cross_attn_value sites, topped up with cross_attn_key then ffn_out sites (first
in execution order) where a model has fewer than 16. Variants run interleaved, one forward each per
round (order rotated every round), after warm-up rounds. The ratio of a variant is the median over
rounds of (its time / plain's time in the same round): pairing cancels the machine's slow drift.
Absolute medians (ms) are given for context only.
Before timing, nnsight and hooks are checked to agree (same means, same ablated output).

Default: the tiny test U-Net on CPU (under a minute on 2 cores).
`--sd15`: an SD1.5-size U-Net (bench/configs/sd15_unet.json, random weights), meant for a GPU:
    .venv/bin/python bench/intervention_overhead.py --sd15 --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import diffusers
import nnsight
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

import workbench
from report import emit_json  # bench/report.py (scripts run from bench/ on sys.path)
from sd15 import sd15_unet
from workbench import intervene
from workbench.models.adapter import adapter_for
from workbench.models.loading import parse_device, parse_dtype
from workbench.models.sites import Site
from workbench.neurons import NeuronSet
from workbench.testing import tiny_pipeline

TEXT_TOKENS = 77  # CLIP context length, as SD pipelines pad prompts
RECORD_SITES = 16
ABLATED_NEURONS = 100
SITE_PRIORITY = ("cross_attn_value", "cross_attn_key", "ffn_out")
NOISY = 0.10  # IQR/median of the plain forward above which a run is flagged
VARIANTS = ("plain", "record", "ablate", "nnsight_record", "nnsight_ablate", "hook_mean")


@dataclass
class DenoiserOnly:
    """The least a `workbench.Model` needs: a `unet` component. Stands in for a pipeline when only the
    denoiser is benchmarked (no text encoder or VAE of the right size exists offline; prompt encoding
    and generation are not available on such a model)."""

    unet: nn.Module

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        pass


def tiny_model(device: torch.device, dtype: torch.dtype) -> workbench.Model:
    return workbench.load(tiny_pipeline("unet"), device=device, dtype=dtype)


def sd15_model(device: torch.device, dtype: torch.dtype) -> workbench.Model:
    unet = sd15_unet(device, dtype)
    return workbench.Model(DenoiserOnly(unet), adapter_for(unet))


def record_sites(model: workbench.Model) -> list[Site]:
    """16 sites by role priority, returned in execution order."""
    chosen: list[Site] = []
    for role in SITE_PRIORITY:
        chosen += model.graph.select(roles=[role])[: RECORD_SITES - len(chosen)]
    order = {s.path: i for i, s in enumerate(model.graph.sites)}
    return sorted(chosen, key=lambda s: order[s.path])


def ablation_neurons(model: workbench.Model, seed: int = 0) -> NeuronSet:
    """100 neurons spread evenly over the value sites, random indices within each site."""
    sites = model.graph.select(roles=["cross_attn_value"])
    generator = torch.Generator().manual_seed(seed)
    per_site = [ABLATED_NEURONS // len(sites) + (i < ABLATED_NEURONS % len(sites)) for i in range(len(sites))]
    return NeuronSet({s.path: torch.randperm(s.out_features, generator=generator)[:k].tolist()
                      for s, k in zip(sites, per_site)})


def inputs(model: workbench.Model, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    config = model.denoiser.config
    generator = torch.Generator().manual_seed(batch)
    latents = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    text = torch.randn(batch, TEXT_TOKENS, config.cross_attention_dim, generator=generator)
    timestep = torch.full((batch,), 500.0)
    return tuple(x.to(model.device, model.dtype if x.is_floating_point() and x.ndim > 1 else None)
                 for x in (latents, timestep, text))


def per_neuron_mean(output: torch.Tensor, site: Site) -> torch.Tensor:
    return output.movedim(site.channel_dim, -1).reshape(-1, site.out_features).float().mean(0)


def variants(model: workbench.Model, batch: int) -> tuple[dict[str, Callable[[], Any]], dict[str, Any]]:
    """One callable per variant (each runs one forward with its instrumentation), and the site choice."""
    latents, timestep, text = inputs(model, batch)
    denoiser, sites, neurons = model.denoiser, record_sites(model), ablation_neurons(model)
    traced = model.tracer()  # wrapping once is a one-off cost, not per forward
    # a NeuronSet iterates its sites alphabetically (transformer_blocks.10 before .2); nnsight needs
    # execution order, which the graph's site list is in
    index = {s.path: torch.tensor(neurons[s.path], device=model.device) for s in model.graph.sites if s.path in neurons}
    channel = {path: model.graph.site(path).channel_dim for path in index}

    def plain() -> torch.Tensor:
        return denoiser(latents, timestep, encoder_hidden_states=text).sample

    def record() -> dict[str, Any]:
        with intervene.record(model, sites) as rec:
            plain()
        return {path: stats.mean for path, stats in rec.stats.items()}

    def ablate() -> torch.Tensor:
        with intervene.ablate(model, neurons):
            return plain()

    def nnsight_record() -> dict[str, Any]:
        means: dict[str, Any] = {}  # created before the trace, filled in execution order inside it
        with traced.trace(latents, timestep, encoder_hidden_states=text):
            for site in sites:
                means[site.path] = per_neuron_mean(traced.get(site.path).output, site).save()
        return means

    def nnsight_ablate() -> torch.Tensor:
        with traced.trace(latents, timestep, encoder_hidden_states=text):
            for path, ix in index.items():
                traced.get(path).output.index_fill_(channel[path], ix, 0.0)
            result = traced.output.save()
        return result.sample

    def hook_mean() -> dict[str, Any]:
        means: dict[str, Any] = {}
        handles = [denoiser.get_submodule(s.path).register_forward_hook(
            lambda module, args, output, site=s: means.__setitem__(site.path, per_neuron_mean(output, site)))
            for s in sites]
        try:
            plain()
        finally:
            for handle in handles:
                handle.remove()
        return means

    fns = dict(plain=plain, record=record, ablate=ablate, nnsight_record=nnsight_record,
               nnsight_ablate=nnsight_ablate, hook_mean=hook_mean)
    return fns, {"record_sites": [f"{s.path} ({s.role.value})" for s in sites],
                 "ablated": {path: len(ix) for path, ix in neurons.items()}}


def check_agreement(fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    """nnsight and hooks must compute the same thing, or the timing compares different work."""
    with torch.no_grad():
        hooked, traced, control = fns["record"](), fns["nnsight_record"](), fns["hook_mean"]()
        mean_diff = max(max((hooked[p].float() - traced[p].float()).abs().max().item(),
                            (control[p].float() - traced[p].float()).abs().max().item()) for p in hooked)
        ablated, ablated_nn, plain = fns["ablate"](), fns["nnsight_ablate"](), fns["plain"]()
    return {"record_mean_max_abs_diff": mean_diff,
            "ablate_output_max_abs_diff": (ablated.float() - ablated_nn.float()).abs().max().item(),
            "ablation_effect_max_abs": (ablated.float() - plain.float()).abs().max().item(),
            "plain_output_finite": bool(torch.isfinite(plain).all())}


def time_variants(fns: dict[str, Callable[[], Any]], reps: int, warmup: int, device: torch.device,
                  progress: Progress, label: str) -> dict[str, list[float]]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    task = progress.add_task(label, total=warmup + reps)
    with torch.no_grad():
        names = list(fns)
        for round_ in range(warmup + reps):
            # interleaved, order rotated each round: drift and position effects hit every variant alike
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                fn = fns[name]
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
            progress.advance(task)
    return times


def iqr(values: list[float]) -> float:
    if len(values) < 4:
        return float("nan")
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q3 - q1


def spread(times: list[float]) -> float:
    """Interquartile range over median: how far one forward's time can be trusted."""
    return iqr(times) / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd15", action="store_true", help="SD1.5-size U-Net (random weights) instead of the tiny one")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cpu; cuda with --sd15)")
    parser.add_argument("--dtype", help="float32, float16, bfloat16 (default: float32; float16 with --sd15)")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 20], help="batch sizes")
    parser.add_argument("--reps", type=int, default=30, help="timed forwards per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (allocator and caches warm up)")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON to PATH ('-' for stdout)")
    args = parser.parse_args(argv)
    device = parse_device(args.device or ("cuda" if args.sd15 else "cpu"))
    dtype = parse_dtype(args.dtype or ("float16" if args.sd15 else "float32"))
    stream = sys.stderr if args.json == "-" else sys.stdout
    console = Console(file=stream, width=None if stream.isatty() else 160)  # no wrapping when piped

    model = (sd15_model if args.sd15 else tiny_model)(device, dtype)
    name = "SD1.5-size U-Net (random weights)" if args.sd15 else "tiny U-Net (workbench.testing)"
    params = sum(p.numel() for p in model.denoiser.parameters())
    console.print(f"{name}: {params:,} parameters, {device}, {dtype}, {torch.get_num_threads()} CPU threads, "
                  f"torch {torch.__version__}, nnsight {nnsight.__version__}")
    results: list[dict[str, Any]] = []
    with Progress(console=console, transient=True) as progress:
        for batch in args.batches:
            fns, choice = variants(model, batch)
            agreement = check_agreement(fns)
            times = time_variants(fns, args.reps, args.warmup, device, progress, f"batch {batch}")
            median_ms = {v: 1e3 * statistics.median(times[v]) for v in VARIANTS}
            paired = {v: [t / p for t, p in zip(times[v], times["plain"])] for v in VARIANTS}
            results.append({"batch": batch, "median_ms": median_ms, "spread": {v: spread(times[v]) for v in VARIANTS},
                            "ratio": {v: statistics.median(paired[v]) for v in VARIANTS},
                            "ratio_iqr": {v: iqr(paired[v]) for v in VARIANTS},
                            "all_ms": {v: [1e3 * t for t in times[v]] for v in VARIANTS},
                            "checks": agreement, **choice})
    console.print("recorded sites: " + ", ".join(results[0]["record_sites"]))
    console.print(f"ablated: {ABLATED_NEURONS} neurons over {len(results[0]['ablated'])} cross_attn_value sites")
    out = Table(title=f"{name}, {device}, {dtype}: median of {args.reps} forwards; paired ratio to plain")
    out.add_column("variant")
    for r in results:
        out.add_column(f"batch {r['batch']}: ratio", justify="right")
        out.add_column("ratio IQR", justify="right")
        out.add_column("ms", justify="right")
        out.add_column("ms IQR/med", justify="right")
    for variant in VARIANTS:
        out.add_row(variant, *(cell for r in results for cell in (
            f"{r['ratio'][variant]:.3f}", f"{r['ratio_iqr'][variant]:.3f}", f"{r['median_ms'][variant]:.2f}",
            f"{r['spread'][variant]:.0%}")))
    console.print(out)
    noisy = [r["batch"] for r in results if r["spread"]["plain"] > NOISY]
    if noisy:
        console.print(f"[yellow]warning: plain forward times spread by more than {NOISY:.0%} (IQR/median) at batch "
                      f"{noisy}: the machine is busy; trust ratios only to about their IQR. Run again or raise --reps.")
    for r in results:
        console.print(f"batch {r['batch']} checks: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                               for k, v in r["checks"].items()))
    payload = {"benchmark": "intervention_overhead", "model": name, "params": params, "device": str(device),
               "dtype": str(dtype).removeprefix("torch."), "reps": args.reps, "warmup": args.warmup,
               "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
               "nnsight": nnsight.__version__, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda"
               else None, "results": results}
    emit_json(payload, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
