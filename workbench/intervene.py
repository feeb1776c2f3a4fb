"""The intervention layer: record, ablate, scale, patch neurons while the denoiser runs.

Each intervention is a context manager that installs plain forward hooks on the chosen sites and
always removes them. By default it acts on every denoiser call (all steps), every token and both
CFG halves; `steps` (call indices), `timesteps` (timestep values) and `branch` ("cond"/"uncond")
narrow it. Contexts nest: hooks run in the order the contexts were entered, so a recording opened
inside an ablation sees the ablated activations.

Zeroing output i of a Linear/Conv equals zeroing row i of its weight and entry i of its bias
(`ablate_weights` does the latter, for hook-free runs). `ablate_to` replaces neurons with a baseline
(mean ablation) instead of zero. nnsight is the API for free-form mechanistic work (`model.tracer()`);
these hooks are the measured hot path (`bench/intervention_overhead.py`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.models.model import Model
from workbench.models.sites import Role, Site
from workbench.neurons import NeuronSet, WeightMask
from workbench.stats import RunningStats

BRANCHES = ("both", "cond", "uncond")
PatchValue = torch.Tensor | Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class CallFilter:
    """Which denoiser calls and which rows of the batch an intervention acts on."""

    steps: frozenset[int] | None = None
    timesteps: frozenset[float] | None = None
    branch: str = "both"

    def __post_init__(self) -> None:
        if self.branch not in BRANCHES:
            raise WorkbenchError(f"unknown branch {self.branch!r}; use one of {', '.join(BRANCHES)}")

    def rows(self, batch: int, cfg_active: bool | None) -> slice | None:
        """The batch rows to act on in this call; None means none."""
        if self.branch == "both":
            return slice(0, batch)
        if cfg_active is None:
            raise WorkbenchError("branch selection needs the CFG layout; run the model through "
                                 "workbench.sampling.generate or workbench.sampling.predict")
        if not cfg_active:
            return slice(0, batch) if self.branch == "cond" else None
        half = batch // 2
        return slice(half, batch) if self.branch == "cond" else slice(0, half)


class Intervention:
    """Base: hooks on sites for the duration of a `with` block, plus a counter of denoiser calls."""

    def __init__(self, model: Model, *, steps: Iterable[int] | None = None,
                 timesteps: Iterable[float] | None = None, branch: str = "both"):
        self.model = model
        self.filter = CallFilter(frozenset(steps) if steps is not None else None,
                                 frozenset(float(t) for t in timesteps) if timesteps is not None else None,
                                 branch)
        self.call = -1  # index of the denoiser call in flight, counted from entering the block
        self.timestep: float | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def site_hooks(self) -> Iterator[tuple[Site, Callable]]:
        """(site, forward hook) pairs; subclasses implement."""
        raise NotImplementedError

    def active_rows(self, batch: int) -> slice | None:
        """Rows to act on in the current call, or None if this call is filtered out."""
        if self.filter.steps is not None and self.call not in self.filter.steps:
            return None
        if self.filter.timesteps is not None and self.timestep not in self.filter.timesteps:
            return None
        rows = self.filter.rows(batch, self.model.cfg_active)
        return rows if rows is not None and rows.stop > rows.start else None

    def _count_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.call += 1
        if self.filter.timesteps is not None:  # reading the value may sync the device: only when asked
            timestep = self.model.adapter.timestep_of(args, kwargs)
            self.timestep = float(timestep.reshape(-1)[0]) if timestep is not None else None

    def editing_hook(self, edit: Callable[[torch.Tensor, slice], None]) -> Callable:
        """A forward hook that lets `edit(output, rows)` change the active rows of the output in place.

        The output is copied first only when autograd needs the original.
        """
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            rows = self.active_rows(output.shape[0])
            if rows is None:
                return None
            target = output.clone() if torch.is_grad_enabled() and output.requires_grad else output
            edit(target, rows)
            return target
        return hook

    def __enter__(self) -> "Intervention":
        try:
            self._handles.append(self.model.denoiser.register_forward_pre_hook(self._count_call, with_kwargs=True))
            for site, hook in self.site_hooks():
                self._handles.append(self.model.denoiser.get_submodule(site.path).register_forward_hook(hook))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _per_neuron_shape(site: Site, ndim: int, size: int) -> list[int]:
    """Shape that broadcasts a per-neuron vector along the site's channel dimension."""
    return [size] + [1] * (ndim - 2) if site.channel_dim == 1 else [size]


class NeuronIntervention(Intervention):
    """Base of interventions on a validated NeuronSet; indices live on the model's device."""

    def __init__(self, model: Model, neurons: NeuronSet, **call_filter):
        super().__init__(model, **call_filter)
        self.neurons = neurons.validate(model.graph)

    def site_hooks(self) -> Iterator[tuple[Site, Callable]]:
        for path, indices in self.neurons.items():
            site = self.model.graph.site(path)
            index = torch.tensor(indices, device=self.model.device)
            yield site, self.editing_hook(lambda output, rows, site=site, index=index:
                                          self.edit(output[rows], site.channel_dim % output.ndim, site, index))

    def edit(self, part: torch.Tensor, dim: int, site: Site, index: torch.Tensor) -> None:
        """Change the selected neurons (`index` along `dim`) of `part` in place."""
        raise NotImplementedError


class Ablation(NeuronIntervention):
    """Multiply the selected neurons by `factor` (0 = zero-ablation)."""

    def __init__(self, model: Model, neurons: NeuronSet, factor: float = 0.0, **call_filter):
        super().__init__(model, neurons, **call_filter)
        self.factor = float(factor)

    def edit(self, part: torch.Tensor, dim: int, site: Site, index: torch.Tensor) -> None:
        if self.factor == 0.0:
            part.index_fill_(dim, index, 0.0)
        else:
            part.index_copy_(dim, index, part.index_select(dim, index) * self.factor)


class Patch(NeuronIntervention):
    """Replace the selected neurons' activations with given values (or a function of them).

    A value for site S is a tensor of shape (k,) — one constant per selected neuron — or any tensor
    that broadcasts to the selected slice; or a callable `(selected, call_index) -> replacement`.
    """

    def __init__(self, model: Model, neurons: NeuronSet, values: Mapping[str, PatchValue], **call_filter):
        super().__init__(model, neurons, **call_filter)
        missing = set(self.neurons.sites) - set(values)
        if missing:
            raise WorkbenchError(f"no patch value for site(s) {', '.join(sorted(missing))}; "
                                 "give one value per site of the neuron set")
        self.values = {path: value if callable(value) else torch.as_tensor(value, device=model.device)
                       for path, value in values.items()}

    def edit(self, part: torch.Tensor, dim: int, site: Site, index: torch.Tensor) -> None:
        selected = part.index_select(dim, index)
        value = self.values[site.path]
        if callable(value):
            replacement = value(selected, self.call)
        elif value.ndim == 1 and value.numel() == len(index):
            replacement = value.reshape(_per_neuron_shape(site, part.ndim, len(index)))
        else:
            replacement = value
        part.index_copy_(dim, index, replacement.to(selected).expand_as(selected))


def baseline_vector(model: Model, baseline: Mapping[str, torch.Tensor], path: str) -> torch.Tensor:
    """`baseline[path]`, checked: one finite value per neuron of the site, on the model's device."""
    if path not in baseline:
        raise WorkbenchError(f"no baseline for site {path}; give one value per neuron of every site in the set")
    vector = torch.as_tensor(baseline[path], dtype=torch.float32).to(model.device).flatten()
    size = model.graph.site(path).out_features
    if vector.numel() != size or not torch.isfinite(vector).all():
        raise WorkbenchError(f"the baseline of {path} must hold {size} finite values (got {vector.numel()}); "
                             "compute it on this model, e.g. the neurons' mean over ordinary prompts")
    return vector


class PerSampleAblation(Intervention):
    """One batched forward, a different ablation per sample: sample i gets `neuron_sets[i]`.

    Samples are the rows of the un-doubled batch; under CFG both halves of sample i get its set. With a
    `baseline` (site path -> one value per neuron) an ablated neuron becomes b + factor·(x − b) instead of
    factor·x: factor 0 replaces it with b (mean ablation when b is its mean over ordinary prompts).
    """

    def __init__(self, model: Model, neuron_sets: Sequence[NeuronSet], factor: float = 0.0,
                 baseline: Mapping[str, torch.Tensor] | None = None, **call_filter):
        super().__init__(model, **call_filter)
        if not neuron_sets:
            raise WorkbenchError("no neuron sets given; pass one NeuronSet per sample")
        self.samples = len(neuron_sets)
        union = NeuronSet()
        for neurons in neuron_sets:
            union = union | neurons.validate(model.graph)
        self.masks, self.baselines = {}, {}
        for path in union.sites:
            mask = torch.ones(self.samples, model.graph.site(path).out_features, device=model.device)
            for sample, neurons in enumerate(neuron_sets):
                mask[sample, list(neurons[path])] = float(factor)
            self.masks[path] = mask
            if baseline is not None:
                self.baselines[path] = baseline_vector(model, baseline, path)

    def site_hooks(self) -> Iterator[tuple[Site, Callable]]:
        for path, mask in self.masks.items():
            site = self.model.graph.site(path)
            yield site, self.editing_hook(lambda output, rows, site=site, mask=mask:
                                          self.edit(output, rows, site, mask))

    def edit(self, output: torch.Tensor, rows: slice, site: Site, mask: torch.Tensor) -> None:
        batch = output.shape[0]
        if batch == 2 * self.samples and self.model.cfg_active:
            per_row = torch.cat([mask, mask])
        elif batch == self.samples:
            per_row = mask
        else:
            raise WorkbenchError(f"per-sample ablation has {self.samples} masks but the denoiser got a batch "
                                 f"of {batch}; give one neuron set per prompt")
        shape = [batch] + ([mask.shape[1]] + [1] * (output.ndim - 2) if site.channel_dim == 1
                           else [1] * (output.ndim - 2) + [mask.shape[1]])
        keep = per_row.reshape(shape)[rows].to(output.dtype)
        if site.path not in self.baselines:
            output[rows] *= keep
            return
        base = self.baselines[site.path].reshape(shape[1:]).to(output.dtype)
        output[rows] = base + keep * (output[rows] - base)


class Recording(Intervention):
    """Per-neuron streaming statistics (count, mean, M2, mean |x|, max) at the chosen sites.

    Statistics pool all tokens / spatial positions and selected rows of every selected call;
    `per_step=True` keeps one set per denoiser call as well (`by_step[call][site]`). Each call's
    block statistics are queued and folded in batches (`RunningStats.combine`), which keeps the
    per-call cost to a few kernels.
    """

    FOLD_EVERY = 32  # queued blocks per site before they are folded

    def __init__(self, model: Model, sites: Iterable[Site | str], *, per_step: bool = False, **call_filter):
        super().__init__(model, **call_filter)
        self.sites = [s if isinstance(s, Site) else model.graph.site(s) for s in sites]
        if not self.sites:
            raise WorkbenchError("no sites to record; select some with model.graph.select(...)")
        self.per_step = per_step
        self.by_step: dict[int, dict[str, RunningStats]] = {}
        self._queued: dict[str, list[RunningStats]] = {}

    @property
    def stats(self) -> dict[str, RunningStats]:
        """`{site path: statistics}` of everything recorded so far."""
        for path, queue in self._queued.items():
            if len(queue) > 1:
                queue[:] = [RunningStats.combine(queue)]
        return {path: queue[0] for path, queue in self._queued.items()}

    def site_hooks(self) -> Iterator[tuple[Site, Callable]]:
        for site in self.sites:
            yield site, self._hook(site)

    def _hook(self, site: Site) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            rows = self.active_rows(output.shape[0])
            if rows is None:
                return
            values = output[rows].detach().movedim(site.channel_dim, -1).reshape(-1, site.out_features)
            block = RunningStats.of(values)
            queue = self._queued.setdefault(site.path, [])
            queue.append(block)
            if len(queue) >= self.FOLD_EVERY:
                queue[:] = [RunningStats.combine(queue)]
            if self.per_step:
                step = self.by_step.setdefault(self.call, {})
                step[site.path] = step[site.path].merge(block) if site.path in step else block
        return hook


def record(model: Model, sites: Iterable[Site | str] | None = None, *, roles: Iterable[Role | str] | None = None,
           steps: Iterable[int] | None = None, timesteps: Iterable[float] | None = None,
           branch: str = "both", per_step: bool = False) -> Recording:
    """`with record(model, roles=["cross_attn_value"]) as rec: ...` then `rec.stats[path].mean`."""
    chosen = list(sites) if sites is not None else model.graph.select(roles=roles)
    return Recording(model, chosen, per_step=per_step, steps=steps, timesteps=timesteps, branch=branch)


def ablate(model: Model, neurons: NeuronSet, *, steps: Iterable[int] | None = None,
           timesteps: Iterable[float] | None = None, branch: str = "both") -> Ablation:
    """Zero the neurons' outputs while the block runs."""
    return Ablation(model, neurons, 0.0, steps=steps, timesteps=timesteps, branch=branch)


def scale(model: Model, neurons: NeuronSet, factor: float, *, steps: Iterable[int] | None = None,
          timesteps: Iterable[float] | None = None, branch: str = "both") -> Ablation:
    """Multiply the neurons' outputs by `factor` while the block runs."""
    return Ablation(model, neurons, factor, steps=steps, timesteps=timesteps, branch=branch)


def patch(model: Model, neurons: NeuronSet, values: Mapping[str, PatchValue], *,
          steps: Iterable[int] | None = None, timesteps: Iterable[float] | None = None,
          branch: str = "both") -> Patch:
    """Replace the neurons' outputs with `values[site]` while the block runs."""
    return Patch(model, neurons, values, steps=steps, timesteps=timesteps, branch=branch)


def ablate_to(model: Model, neurons: NeuronSet, baseline: Mapping[str, torch.Tensor], *,
              steps: Iterable[int] | None = None, timesteps: Iterable[float] | None = None,
              branch: str = "both") -> Patch:
    """Replace each neuron's output with its `baseline` value (site path -> one value per neuron of the
    site) while the block runs: mean ablation when the baseline is the neurons' mean over ordinary prompts."""
    neurons = neurons.validate(model.graph)
    values = {path: baseline_vector(model, baseline, path)[list(indices)] for path, indices in neurons.items()}
    return Patch(model, neurons, values, steps=steps, timesteps=timesteps, branch=branch)


def ablate_per_sample(model: Model, neuron_sets: Sequence[NeuronSet], factor: float = 0.0, *,
                      baseline: Mapping[str, torch.Tensor] | None = None, steps: Iterable[int] | None = None,
                      timesteps: Iterable[float] | None = None, branch: str = "both") -> PerSampleAblation:
    """Sample i of the batch runs with `neuron_sets[i]` ablated (scaled by `factor`; toward `baseline`
    instead of 0 when one is given)."""
    return PerSampleAblation(model, neuron_sets, factor, baseline, steps=steps, timesteps=timesteps, branch=branch)


@contextmanager
def _zeroed(entries: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Zero `param[where]` for each (param, bool index) while the block runs; restore them exactly after."""
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for param, where in entries:
                saved.append((param, where, param[where].clone()))
                param[where] = 0.0
        yield
    finally:
        with torch.no_grad():
            for param, where, original in reversed(saved):
                param[where] = original


def ablate_weights(model: Model, neurons: NeuronSet) -> AbstractContextManager[None]:
    """Zero weight rows and bias entries of the neurons while the block runs; restore them after."""
    neurons.validate(model.graph)
    entries = []
    for path, indices in neurons.items():
        module = model.denoiser.get_submodule(path)
        if getattr(module, "weight", None) is None:
            raise WorkbenchError(f"site {path} has no weights; ablate it with hooks (workbench.ablate)")
        for param in (module.weight, getattr(module, "bias", None)):
            if param is not None:
                rows = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
                rows[list(indices)] = True
                entries.append((param, rows))
    return _zeroed(entries)


def mask_weights(model: Model, mask: WeightMask) -> AbstractContextManager[None]:
    """Zero the masked weights (e.g. a Wanda / SalUn mask) while the block runs; restore them after."""
    mask.validate(model.graph)
    return _zeroed([(model.module(path).weight, selected.to(model.module(path).weight.device))
                    for path, selected in mask.items()])
