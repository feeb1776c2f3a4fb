"""`Model`: a loaded pipeline, its family adapter, its denoiser and (lazily) its neuron graph."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.models.adapter import FamilyAdapter

if TYPE_CHECKING:
    from workbench.graph import NeuronGraph

DENOISER_COMPONENTS = ("unet", "transformer")


def denoiser_component(pipeline: Any) -> str:
    """Name of the pipeline component that denoises (`unet` or `transformer`)."""
    for name in DENOISER_COMPONENTS:
        if isinstance(getattr(pipeline, name, None), nn.Module):
            return name
    raise WorkbenchError(f"{type(pipeline).__name__} has no denoiser (a `unet` or `transformer` component); "
                         "load a text-to-image pipeline")


class PipelineView(nn.Module):
    """A module view of a pipeline (components as children, forward = the pipeline call), for nnsight."""

    def __init__(self, pipeline: Any):
        super().__init__()
        self.pipeline = pipeline  # not a Module: a plain attribute
        for name, component in pipeline.components.items():
            if isinstance(component, nn.Module):
                self.add_module(name, component)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.pipeline(*args, **kwargs)


class Model:
    """A diffusers text-to-image pipeline as the workbench sees it.

    `denoiser` is the pipeline's U-Net or transformer; `graph` its neuron graph (built on first use
    without touching the weights); `tracer()` an nnsight wrapper of the denoiser for mechanistic work.
    """

    def __init__(self, pipeline: Any, adapter: FamilyAdapter, source: Path | None = None):
        self.pipeline = pipeline
        self.adapter = adapter
        self.source = source
        self.denoiser_name = denoiser_component(pipeline)
        # CFG layout of the denoiser call in flight, set by the sampling helpers: True means the
        # batch is [unconditional rows; conditional rows]. None when unknown (a direct pipeline call).
        self.cfg_active: bool | None = None
        self._tracers: dict[str, Any] = {}  # nnsight wrappers, built once (wrapping patches every module)

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @cached_property
    def graph(self) -> "NeuronGraph":  # imported lazily: the graph module imports the models package
        from workbench.graph import NeuronGraph

        return NeuronGraph.build(self.denoiser, self.adapter)

    def module(self, path: str) -> nn.Module:
        """The denoiser module of site `path` (validated against the graph)."""
        self.graph.site(path)
        return self.denoiser.get_submodule(path)

    def tracer(self):
        """An `nnsight.NNsight` wrapper of the denoiser: `with model.tracer().trace(latents, t, ...):`.

        Inside one trace, touch module outputs in execution order (`model.graph.sites` is in that order).
        Built once per model: wrapping installs nnsight's forward on every module of the denoiser.
        """
        from nnsight import NNsight

        if self._tracers.get("denoiser") is None:
            self._tracers["denoiser"] = NNsight(self.denoiser)
        return self._tracers["denoiser"]

    def pipeline_tracer(self):
        """An `nnsight.NNsight` wrapper of the whole pipeline: a trace runs the full denoising loop.

        `with t.trace(prompt=[...], num_inference_steps=N) as tracer:` then
        `for step in tracer.iter[0:N]: t.get(f"{model.denoiser_name}.{path}").output[...] = 0`.
        Use a bounded `tracer.iter[0:N]`; with CFG the batch is [unconditional; conditional].
        """
        from nnsight import NNsight

        if self._tracers.get("pipeline") is None:
            self._tracers["pipeline"] = NNsight(PipelineView(self.pipeline))
        return self._tracers["pipeline"]

    def __repr__(self) -> str:
        where = f" from {self.source}" if self.source else ""
        return f"Model({type(self.pipeline).__name__}, family={self.family}{where})"
