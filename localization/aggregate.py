"""Aggregating per-prompt localizations: the neurons most prompts share, and a matched random control."""

from __future__ import annotations

import torch

from localization.localize import Localization
from workbench.graph import NeuronGraph
from workbench.neurons import NeuronSet, WeightMask


def most_frequent(localization: Localization, top: int, *, per_layer: bool = False) -> NeuronSet:
    """The `top` neurons chosen by the most prompts, globally or per site (ties: lower site, index first)."""
    ranked = sorted(localization.frequency().items(), key=lambda item: (-item[1], item[0]))
    if not per_layer:
        ranked = ranked[:top]
    kept: dict[str, list[int]] = {}
    for (site, index), _ in ranked:
        if len(kept.setdefault(site, [])) < top:
            kept[site].append(index)
    return NeuronSet(kept)


def random_like(neurons: NeuronSet, graph: NeuronGraph, seed: int = 0) -> NeuronSet:
    """A random set with the same number of neurons in each site (the control of NeMo's §4)."""
    generator = torch.Generator().manual_seed(seed)
    return NeuronSet({site: torch.randperm(graph.site(site).out_features, generator=generator)[:len(indices)].tolist()
                      for site, indices in neurons.items()})


def random_mask_like(mask: WeightMask, seed: int = 0) -> WeightMask:
    """A random weight mask with the same number of weights in each site (the control of a pruning mask)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for site, selected in mask.items():
        flat = torch.zeros(selected.numel(), dtype=torch.bool)
        flat[torch.randperm(selected.numel(), generator=generator)[:int(selected.sum())]] = True
        out[site] = flat.view_as(selected)
    return WeightMask(out)
