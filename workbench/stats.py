"""Per-neuron streaming statistics that merge exactly across batches, shards and processes.

Welford's update in its batched form (Chan, Golub & LeVeque 1979, "Updating formulae and a pairwise
algorithm for computing sample variances", eq. 2.1): for parts A and B with counts n_A, n_B, means
m_A, m_B and sums of squared deviations M2_A, M2_B,
    n = n_A + n_B,  δ = m_B − m_A,  m = m_A + δ·n_B/n,  M2 = M2_A + M2_B + δ²·n_A·n_B/n.
All accumulation is float64 on the device the activations live on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from workbench.errors import WorkbenchError
from workbench.io import load_tensors, save_tensors

STATS_FORMAT = "workbench.running_stats/1"
_FIELDS = ("count", "mean", "m2", "mean_abs", "max")


@dataclass
class RunningStats:
    """count, mean, M2 (sum of squared deviations), mean of |x| and max, per neuron."""

    count: torch.Tensor  # float64 scalar (float so merges never overflow an int on any device)
    mean: torch.Tensor
    m2: torch.Tensor
    mean_abs: torch.Tensor
    max: torch.Tensor

    @classmethod
    def empty(cls, size: int, device: torch.device | str = "cpu") -> "RunningStats":
        zeros = lambda: torch.zeros(size, dtype=torch.float64, device=device)  # noqa: E731
        return cls(torch.zeros((), dtype=torch.float64, device=device), zeros(), zeros(), zeros(),
                   torch.full((size,), -torch.inf, dtype=torch.float64, device=device))

    @classmethod
    def of(cls, values: torch.Tensor) -> "RunningStats":
        """Statistics of a (samples, neurons) block of activations."""
        x = values.detach().to(torch.float64)
        n = x.shape[0]
        variance, mean = torch.var_mean(x, dim=0, correction=0)  # one fused pass for both
        return cls(torch.full((), n, dtype=torch.float64, device=x.device), mean, variance * n,
                   torch.linalg.vector_norm(x, 1, dim=0) / n, x.amax(0))

    def update(self, values: torch.Tensor) -> None:
        """Fold a (samples, neurons) block into these statistics, in place."""
        if values.shape[0]:
            self.merge_(RunningStats.of(values))

    def merge_(self, other: "RunningStats") -> "RunningStats":
        """Chan et al.'s pairwise merge, in place; returns self."""
        if self.mean.shape != other.mean.shape:
            raise WorkbenchError(f"cannot merge statistics of {self.mean.numel()} and {other.mean.numel()} "
                                 "neurons; were they recorded at different sites?")
        other = other.to(self.mean.device)
        total = self.count + other.count
        weight = other.count / total.clamp(min=1)  # no branch on the count: no device sync per call
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + delta.square() * self.count * weight
        self.mean = self.mean + delta * weight
        self.mean_abs = self.mean_abs + (other.mean_abs - self.mean_abs) * weight
        self.max = torch.maximum(self.max, other.max)
        self.count = total
        return self

    @classmethod
    def combine(cls, parts: "list[RunningStats]") -> "RunningStats":
        """Chan et al.'s merge of k parts at once (eq. 2.1 summed over parts): with n = Σ nᵢ,
        m = Σ nᵢ mᵢ / n and M2 = Σ M2ᵢ + Σ nᵢ (mᵢ − m)². A handful of vector ops for any k."""
        if len(parts) == 1:
            return parts[0]
        counts = torch.stack([p.count for p in parts])
        total = counts.sum()
        weights = (counts / total.clamp(min=1))[:, None]
        means = torch.stack([p.mean for p in parts])
        mean = (weights * means).sum(0)
        m2 = torch.stack([p.m2 for p in parts]).sum(0) + (counts[:, None] * (means - mean).square()).sum(0)
        mean_abs = (weights * torch.stack([p.mean_abs for p in parts])).sum(0)
        return cls(total, mean, m2, mean_abs, torch.stack([p.max for p in parts]).amax(0))

    def merge(self, other: "RunningStats") -> "RunningStats":
        return self.copy().merge_(other)

    def copy(self) -> "RunningStats":
        return RunningStats(*(getattr(self, f).clone() for f in _FIELDS))

    def to(self, device: torch.device | str) -> "RunningStats":
        return RunningStats(*(getattr(self, f).to(device) for f in _FIELDS))

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance (n − 1 in the denominator)."""
        return self.m2 / (self.count - 1).clamp(min=1)

    @property
    def std(self) -> torch.Tensor:
        return self.variance.sqrt()


def save_stats(stats: dict[str, RunningStats], path: str | os.PathLike, *, overwrite: bool = False,
               metadata: dict[str, str] | None = None) -> None:
    """Save `{site: stats}` as one safetensors file (keys `site/field`)."""
    tensors = {f"{site}/{field}": getattr(s, field).detach().cpu().contiguous()
               for site, s in stats.items() for field in _FIELDS}
    save_tensors(path, tensors, STATS_FORMAT, overwrite=overwrite, metadata=metadata)


def load_stats(path: str | os.PathLike) -> dict[str, RunningStats]:
    fields: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_tensors(path, STATS_FORMAT, "statistics file", "save_stats").items():
        site, field = key.rsplit("/", 1)
        fields.setdefault(site, {})[field] = tensor
    if any(set(values) != set(_FIELDS) for values in fields.values()):
        raise WorkbenchError(f"statistics file {path} is incomplete; record it again")
    return {site: RunningStats(**values) for site, values in fields.items()}
