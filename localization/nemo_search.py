"""NeMo's neuron search, free of any model: z-scores, initial selection and refinement.

Hintersdorf et al., "Finding NeMo", NeurIPS 2024, §3 (out-of-distribution activations, initial
selection, refinement); defaults and order of operations from the reference code
(shared/research/localization.md §1.3–1.4). The search only needs a `Scorer`: given several blocked
neuron sets, the memorization score of each (a batched forward in `localization.nemo`). Scoring
several candidates per call is our speed-up; every decision is the one the sequential search makes,
so the neuron sets are identical to it. Within a site, candidates are in index order (the reference
appends the top-k in activation order, so its single-neuron refinement may visit them in another order).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.neurons import NeuronSet
from workbench.stats import RunningStats

Scorer = Callable[[list[NeuronSet]], list[float]]
"""Memorization score of the model with each neuron set blocked (lower = less memorized)."""


def z_scores(activations: dict[str, torch.Tensor], holdout: dict[str, RunningStats]) -> dict[str, torch.Tensor]:
    """Two-sided z_{l,i} = |a_{l,i} − μ_{l,i}| / σ_{l,i} (σ unbiased over the holdout prompts); z = 0 where
    σ = 0 (a neuron constant over the holdout says nothing about the prompt)."""
    out = {}
    for site, a in activations.items():
        std = holdout[site].std
        out[site] = torch.where(std > 0, (a.double() - holdout[site].mean).abs() / std.clamp_min(1e-300), 0.0)
    return out


def candidates(activations: dict[str, torch.Tensor], z: dict[str, torch.Tensor], theta: float, k: int,
               top_k_on: str = "z") -> NeuronSet:
    """Per site {i : z_i > θ} ∪ the k neurons with the highest z (`top_k_on="z"`) or raw activation
    (`"raw"`, the reference code). Duplicates are merged (the reference keeps them; it changes no result)."""
    chosen = {}
    for site, scores in z.items():
        ranking = scores if top_k_on == "z" else activations[site].double()
        above = torch.nonzero(scores > theta).flatten().tolist()
        top = torch.topk(ranking, min(k, ranking.numel())).indices.tolist() if k else []
        chosen[site] = sorted(set(above) | set(top))
    return NeuronSet(chosen)


@dataclass(frozen=True)
class SelectionSchedule:
    """θ from `initial_theta` down by `theta_step`, k from `initial_k` up by `k_step`; the last
    configuration tried is the one before θ reaches `min_theta` (5.0 → 1.25 and k 0 → 15 by default)."""

    initial_theta: float = 5.0
    theta_step: float = 0.25
    min_theta: float = 1.0
    initial_k: int = 0
    k_step: int = 1

    def __post_init__(self) -> None:
        if not self.theta_step > 0 or self.k_step < 0:
            raise WorkbenchError("NeMo's schedule needs theta_step > 0 and k_step >= 0")

    def steps(self, max_k: int) -> list[tuple[float, int]]:
        out, theta, k = [], self.initial_theta, self.initial_k
        while True:
            out.append((theta, k))
            theta, k = theta - self.theta_step, k + self.k_step
            if theta <= self.min_theta + 1e-9 or k >= max_k:
                return out


@dataclass(frozen=True)
class InitialSelection:
    neurons: NeuronSet
    score: float
    success: bool  # the score reached the threshold; otherwise the last configuration is kept
    theta: float
    k: int
    tried: int  # configurations scored


def initial_selection(activations: dict[str, torch.Tensor], z: dict[str, torch.Tensor], threshold: float,
                      score: Scorer, schedule: SelectionSchedule = SelectionSchedule(), top_k_on: str = "z",
                      batch: int = 8) -> InitialSelection:
    """The first (θ, k) whose candidate set brings the score to ≤ threshold, scored `batch` at a time."""
    max_k = max(a.numel() for a in activations.values())
    configs = schedule.steps(max_k)
    sets = [candidates(activations, z, theta, k, top_k_on) for theta, k in configs]
    last = None
    for start in range(0, len(configs), batch):
        scores = score(sets[start:start + batch])
        for offset, value in enumerate(scores):
            index = start + offset
            last = (index, value)
            if value <= threshold:
                theta, k = configs[index]
                return InitialSelection(sets[index], value, True, theta, k, index + 1)
    index, value = last
    theta, k = configs[index]
    return InitialSelection(sets[index], value, False, theta, k, len(configs))


def _next_live(blocked: NeuronSet, parts: Sequence[NeuronSet], start: int) -> tuple[int, NeuronSet] | None:
    """The first part from `start` on that still unblocks something, with what it unblocks."""
    for index in range(start, len(parts)):
        live = parts[index] & blocked
        if len(live):
            return index, live
    return None


def greedy_removal(blocked: NeuronSet, parts: Sequence[NeuronSet], threshold: float, score: Scorer,
                   batch: int = 8, margin: float = 0.0) -> tuple[NeuronSet, int]:
    """In order, unblock each part if the score stays < threshold − margin without it (it is then dropped
    for good; `margin` 0 is the paper's rule, a small one settles float ties the same way at any batch).

    Speculative batching, with the sequential decisions: the upcoming decisions form a binary tree
    (drop or keep each next part, given the decisions before it); each call scores its `batch` most
    likely nodes, a decision taken to repeat the previous one with the frequency seen so far in this
    pass (Laplace-smoothed). The actual decisions then walk the tree as deep as it was scored (at least
    one decision per call). Returns the remaining set and the number of sets scored.
    """
    scored, repeats, decisions, previous = 0, 0, 0, False
    start = _next_live(blocked, parts, 0)
    while start is not None:
        tree = _likely_tree(blocked, start, parts, batch, (repeats + 1) / (decisions + 2), previous)
        paths = list(tree)
        values = score([tree[path][0] - tree[path][2] for path in paths])
        scored += len(paths)
        dropped_at = {path: value < threshold - margin for path, value in zip(paths, values)}
        path: tuple[bool, ...] = ()
        while path in tree:
            before, index, live = tree[path]
            dropped = dropped_at[path]
            repeats, decisions, previous = repeats + (dropped == previous), decisions + 1, dropped
            blocked = before - live if dropped else before
            path += (dropped,)
        start = _next_live(blocked, parts, index + 1)
    return blocked, scored


def _likely_tree(blocked: NeuronSet, start: tuple[int, NeuronSet], parts: Sequence[NeuronSet], size: int,
                 repeat: float, previous: bool) -> dict[tuple[bool, ...], tuple[NeuronSet, int, NeuronSet]]:
    """The `size` most likely decision nodes, best first: path of decisions → (set before, part index, live part)."""
    tree: dict[tuple[bool, ...], tuple[NeuronSet, int, NeuronSet]] = {}
    frontier = [(-1.0, 0, (), (blocked, *start))]
    pushed = 0
    while frontier and len(tree) < size:
        negative_p, _, path, node = heapq.heappop(frontier)
        tree[path] = node
        before, index, live = node
        last = path[-1] if path else previous
        for dropped in (False, True):
            after = before - live if dropped else before
            following = _next_live(after, parts, index + 1)
            if following is not None:
                pushed += 1
                p = -negative_p * (repeat if dropped == last else 1 - repeat)
                heapq.heappush(frontier, (-p, pushed, path + (dropped,), (after, *following)))
    return tree


def refine(blocked: NeuronSet, site_order: Sequence[str], threshold: float, score: Scorer,
           batch: int = 8, margin: float = 0.0) -> tuple[NeuronSet, int]:
    """Refinement: whole layers, then single neurons, each in reverse site order (mid → first down)."""
    reverse = [site for site in reversed(site_order) if site in blocked.sites]
    blocked, layer_calls = greedy_removal(blocked, [NeuronSet({s: blocked[s]}) for s in reverse], threshold,
                                          score, batch, margin)
    singles = [NeuronSet({s: [i]}) for s in reversed(site_order) if s in blocked.sites for i in blocked[s]]
    blocked, neuron_calls = greedy_removal(blocked, singles, threshold, score, batch, margin)
    return blocked, layer_calls + neuron_calls
