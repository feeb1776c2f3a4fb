"""Which neurons, which weights: `NeuronSet` (site -> output indices) and `WeightMask` (site -> bool mask).

Both have set algebra and stable serialization (JSON for indices, safetensors for masks), and both
validate against a `NeuronGraph` so an out-of-range neuron is a one-line error, not a silent no-op.
"""

from __future__ import annotations

import numbers
import os
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

import torch
from workbench.errors import WorkbenchError
from workbench.io import atomic_write_json, load_tensors, read_json, save_tensors

if TYPE_CHECKING:
    from workbench.graph import NeuronGraph

NEURON_SET_FORMAT = "workbench.neuron_set/1"
WEIGHT_MASK_FORMAT = "workbench.weight_mask/1"


def _indices(site: object, indices: object) -> list[int]:
    """Validate one site's indices: non-negative integers (ints or an integer tensor), nothing else."""
    if isinstance(indices, torch.Tensor):
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise WorkbenchError(f"neuron indices of {site} must be integers, not a {indices.dtype} tensor")
        indices = indices.reshape(-1).tolist()
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise WorkbenchError(f"neuron indices of {site} must be a list of non-negative integers")
    values = list(indices)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in values):
        raise WorkbenchError(f"neuron indices of {site} must be non-negative integers")
    return [int(i) for i in values]


class NeuronSet:
    """Output units of sites: `{site path: sorted unique indices}`. Empty sites are dropped.

    `len()` is the number of neurons; iteration yields `(site, index)` pairs in a stable order.
    """

    def __init__(self, neurons: Mapping[str, Iterable[int]] | None = None):
        clean: dict[str, tuple[int, ...]] = {}
        for site, indices in (neurons or {}).items():
            values = _indices(site, indices)
            if values:
                clean[str(site)] = tuple(sorted(set(values)))
        self._neurons = dict(sorted(clean.items()))

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._neurons)

    def items(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        return iter(self._neurons.items())

    def __getitem__(self, site: str) -> tuple[int, ...]:
        return self._neurons.get(site, ())

    def __contains__(self, item: object) -> bool:
        if isinstance(item, tuple):
            return item[1] in self._neurons.get(item[0], ())
        return item in self._neurons

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return ((site, index) for site, indices in self._neurons.items() for index in indices)

    def __len__(self) -> int:
        return sum(len(indices) for indices in self._neurons.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NeuronSet) and self._neurons == other._neurons

    def __hash__(self) -> int:
        return hash(tuple(self._neurons.items()))

    def __repr__(self) -> str:
        return f"NeuronSet({len(self)} neurons in {len(self._neurons)} sites)"

    def _combine(self, other: "NeuronSet", op) -> "NeuronSet":
        sites = set(self._neurons) | set(other._neurons)
        return NeuronSet({s: op(set(self[s]), set(other[s])) for s in sites})

    def __or__(self, other: "NeuronSet") -> "NeuronSet":
        return self._combine(other, set.union)

    def __and__(self, other: "NeuronSet") -> "NeuronSet":
        return self._combine(other, set.intersection)

    def __sub__(self, other: "NeuronSet") -> "NeuronSet":
        return self._combine(other, set.difference)

    def __xor__(self, other: "NeuronSet") -> "NeuronSet":
        return self._combine(other, set.symmetric_difference)

    def validate(self, graph: "NeuronGraph") -> "NeuronSet":
        """Raise a one-line error for an unknown site or an out-of-range index; return self."""
        for site, indices in self._neurons.items():
            size = graph.site(site).out_features
            if indices[-1] >= size:
                raise WorkbenchError(f"neuron {indices[-1]} is out of range for site {site} ({size} neurons); "
                                     f"indices must be in [0, {size})")
        return self

    def to_json(self) -> dict:
        return {"format": NEURON_SET_FORMAT, "neurons": {s: list(i) for s, i in self._neurons.items()}}

    @classmethod
    def from_json(cls, data: object) -> "NeuronSet":
        if not isinstance(data, dict) or data.get("format") != NEURON_SET_FORMAT or \
                not isinstance(data.get("neurons"), dict):
            raise WorkbenchError(f"not a neuron set (expected format {NEURON_SET_FORMAT!r}); "
                                 "write it with NeuronSet.save")
        return cls(data["neurons"])

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        atomic_write_json(path, self.to_json(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NeuronSet":
        return cls.from_json(read_json(path, "neuron set"))


class WeightMask:
    """Individual weights of sites: `{site path: bool tensor shaped like the site's weight}`."""

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None):
        clean = {}
        for site, mask in (masks or {}).items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise WorkbenchError(f"mask of {site} must be a bool tensor")
            clean[str(site)] = mask.detach().to("cpu", copy=True).contiguous()  # never aliases the caller's
        self._masks = dict(sorted(clean.items()))

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self._masks)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._masks.items())

    def __getitem__(self, site: str) -> torch.Tensor:
        return self._masks[site]

    def __contains__(self, site: object) -> bool:
        return site in self._masks

    def count(self) -> int:
        """Number of selected weights."""
        return sum(int(m.sum()) for m in self._masks.values())

    def density(self) -> float:
        """Selected weights over all weights of the masked sites."""
        total = sum(m.numel() for m in self._masks.values())
        return self.count() / total if total else 0.0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WeightMask) and self._masks.keys() == other._masks.keys() and \
            all(torch.equal(m, other._masks[s]) for s, m in self._masks.items())

    def __repr__(self) -> str:
        return f"WeightMask({self.count()} weights in {len(self._masks)} sites)"

    def _other_mask(self, other: "WeightMask", site: str) -> torch.Tensor | None:
        theirs = other._masks.get(site)
        mine = self._masks.get(site)
        if theirs is not None and mine is not None and theirs.shape != mine.shape:
            raise WorkbenchError(f"masks of {site} differ in shape ({tuple(mine.shape)} vs "
                                 f"{tuple(theirs.shape)}); were they made for different models?")
        return theirs

    def __or__(self, other: "WeightMask") -> "WeightMask":
        out = dict(other._masks)
        for site, mask in self._masks.items():
            theirs = self._other_mask(other, site)
            out[site] = mask if theirs is None else mask | theirs
        return WeightMask(out)

    def __and__(self, other: "WeightMask") -> "WeightMask":
        return WeightMask({site: mask & theirs for site, mask in self._masks.items()
                           if (theirs := self._other_mask(other, site)) is not None})

    def __sub__(self, other: "WeightMask") -> "WeightMask":
        return WeightMask({site: mask if (theirs := self._other_mask(other, site)) is None else mask & ~theirs
                           for site, mask in self._masks.items()})

    def validate(self, graph: "NeuronGraph") -> "WeightMask":
        for site, mask in self._masks.items():
            expected = graph.site(site).weight_shape
            if expected is None or tuple(mask.shape) != expected:
                raise WorkbenchError(f"mask of {site} has shape {tuple(mask.shape)} but the weight is "
                                     f"{expected}; was it made for another model?")
        return self

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        save_tensors(path, dict(self._masks), WEIGHT_MASK_FORMAT, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WeightMask":
        return cls(load_tensors(path, WEIGHT_MASK_FORMAT, "weight mask", "WeightMask.save"))
