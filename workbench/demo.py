"""The main job (`make demo`): inspect, record, ablate and generate on the tiny U-Net.

Until the project ships trained checkpoints, the demo builds a tiny random-weight SD-style pipeline
(saved once under the output folder) and shows the whole loop on it: the neuron graph, value-neuron
statistics, the effect of ablating the most active value neurons against a random control with the
same per-layer counts, and that an empty ablation changes nothing.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import workbench
from workbench.graph import NeuronGraph
from workbench.intervene import ablate, record
from workbench.io import atomic_write_json
from workbench.models.sites import Role
from workbench.neurons import NeuronSet
from workbench.sampling import generate, save_image
from workbench.stats import save_stats
from workbench.testing import save_tiny_pipeline

PROMPTS = ("a red circle", "a photo of a cat", "a blue square in the city", "a painting of a horse")
GENERATION = {"steps": 10, "guidance_scale": 5.0, "seed": 0}
TOP_FRACTION = 0.1  # share of each value site's neurons ablated


def most_active(stats: dict, graph: NeuronGraph, fraction: float) -> NeuronSet:
    """Per site, the `fraction` of neurons with the largest mean |activation|."""
    chosen = {}
    for path, s in stats.items():
        k = max(1, round(fraction * graph.site(path).out_features))
        chosen[path] = torch.topk(s.mean_abs, k).indices.tolist()
    return NeuronSet(chosen)


def random_like(neurons: NeuronSet, graph: NeuronGraph, seed: int) -> NeuronSet:
    """A random set with the same number of neurons per site."""
    generator = torch.Generator().manual_seed(seed)
    return NeuronSet({path: torch.randperm(graph.site(path).out_features, generator=generator)[:len(idx)].tolist()
                      for path, idx in neurons.items()})


def image_grid(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack rows of (n, 3, H, W) images into one (3, rows·H, n·W) image."""
    return torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)


def run_demo(out: Path, console: Console | None = None) -> dict[str, Any]:
    """Run the demo; write its files under `out/runs/<time>/` and return the summary."""
    model_dir = out / "tiny-unet"
    run_dir = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    if not model_dir.exists():
        save_tiny_pipeline("unet", model_dir)
    run_dir.mkdir(parents=True, exist_ok=False)
    progress = Progress(console=console, transient=True) if console else nullcontext()
    with progress:
        task = progress.add_task("demo", total=6) if console else None
        advance = (lambda text: progress.update(task, advance=1, description=text)) if console \
            else (lambda text: None)
        model = workbench.load(model_dir)
        graph = model.graph
        graph.save(run_dir / "graph.json")
        advance("recording value neurons")
        values = graph.select(roles=[Role.CROSS_ATTN_VALUE])
        with record(model, values, branch="cond") as recording:
            baseline = generate(model, PROMPTS, **GENERATION)
        save_stats(recording.stats, run_dir / "value_stats.safetensors")
        advance("ablating the most active value neurons")
        top = most_active(recording.stats, graph, TOP_FRACTION)
        control = random_like(top, graph, seed=1)
        top.save(run_dir / "ablated_neurons.json")
        with ablate(model, top):
            ablated = generate(model, PROMPTS, **GENERATION)
        advance("random control")
        with ablate(model, control):
            controlled = generate(model, PROMPTS, **GENERATION)
        advance("empty ablation")
        with ablate(model, NeuronSet()):
            unchanged = generate(model, PROMPTS, **GENERATION)
        advance("writing images")
        save_image(image_grid([baseline, ablated, controlled]), run_dir / "grid.png")
        graph.annotate(top, "demo_mean_abs", {p: recording.stats[p].mean_abs[list(i)] for p, i in top.items()})
        advance("done")
    change = lambda images: (images - baseline).abs().mean(dim=(1, 2, 3)).tolist()  # noqa: E731
    summary = {
        "model": str(model_dir), "run": str(run_dir), "family": model.family,
        "graph": {k: graph.summary()[k] for k in ("sites", "neurons", "roles")},
        "prompts": list(PROMPTS), "generation": GENERATION,
        "recorded_sites": len(values), "recorded_values_per_site": int(recording.stats[values[0].path].count),
        "ablated": {"neurons": len(top), "sites": len(top.sites), "fraction_per_site": TOP_FRACTION},
        "pixel_change": {"most_active": change(ablated), "random_control": change(controlled),
                         "empty_set": change(unchanged)},
        "files": {name: str(run_dir / name) for name in
                  ("graph.json", "value_stats.safetensors", "ablated_neurons.json", "grid.png")},
    }
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def print_summary(summary: dict[str, Any], console: Console) -> None:
    graph = summary["graph"]
    console.print(f"[bold]model[/] {summary['model']} (family {summary['family']}): {graph['sites']} sites, "
                  f"{graph['neurons']:,} neurons, {graph['roles']['cross_attn_value']['sites']} cross-attention "
                  f"value sites")
    console.print(f"recorded {summary['recorded_sites']} value sites over {len(summary['prompts'])} prompts "
                  f"({summary['recorded_values_per_site']:,} activations per neuron, conditional branch)")
    console.print(f"ablated {summary['ablated']['neurons']} neurons (top {summary['ablated']['fraction_per_site']:.0%}"
                  f" by mean |activation| in each value site) and a random control of the same per-site counts")
    table = Table(title="mean |pixel change| against the un-ablated image (0..1 scale)")
    for column in ("prompt", "most active", "random control", "empty set"):
        table.add_column(column, justify="left" if column == "prompt" else "right")
    change = summary["pixel_change"]
    for i, prompt in enumerate(summary["prompts"]):
        table.add_row(prompt, f"{change['most_active'][i]:.4f}", f"{change['random_control'][i]:.4f}",
                      f"{change['empty_set'][i]:.4f}")
    console.print(table)
    console.print(f"files in {summary['run']}: grid.png (rows: original, ablated, random control), "
                  "graph.json, value_stats.safetensors, ablated_neurons.json, summary.json")
