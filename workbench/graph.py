"""The neuron graph: a networkx graph of the denoiser's sites and data-flow edges.

Site nodes are module paths (as in `named_modules()`); edges are `flow` (execution order of one
reference forward), `skip` (U-Net long skips), `residual` (around resnet and transformer blocks),
`text` and `time` (where conditioning enters). Neuron nodes `(site, index)` exist only where a
score, selection or edit refers to them. The graph is built on the meta device: no weights needed.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import networkx as nx
import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.io import atomic_write_json, read_json
from workbench.models.adapter import FamilyAdapter, adapter_for
from workbench.models.roles import channel_dim, features, site_kind
from workbench.models.sites import TEXT_KEY_VALUE_ROLES, Role, Site
from workbench.neurons import NeuronSet

GRAPH_FORMAT = "workbench.neuron_graph/1"
INPUTS = ("input:latent", "input:timestep", "input:text")
OUTPUT = "output"
_NON_SPATIAL = TEXT_KEY_VALUE_ROLES | {Role.TIME_EMBED, Role.TEXT_EMBED, Role.MODULATION, Role.CONTEXT_QUERY,
                                       Role.CONTEXT_OUT, Role.CONTEXT_FFN_IN, Role.CONTEXT_FFN_OUT}
Target = str | Sequence[str] | None


class NeuronGraph:
    """Sites, data flow and the neurons something was said about. Build with `NeuronGraph.build`."""

    def __init__(self, sites: Sequence[Site], edges: Iterable[tuple[str, str, str]], meta: Mapping[str, Any]):
        self.meta = dict(meta)
        self._sites = {site.path: site for site in sites}
        self.nx = nx.DiGraph(**self.meta)
        self.nx.add_nodes_from(INPUTS + (OUTPUT,), node_type="io")
        for site in sites:
            self.nx.add_node(site.path, node_type="site", **site.to_json())
        for source, target, kind in edges:
            self.nx.add_edge(source, target, kind=kind)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, denoiser: nn.Module, adapter: FamilyAdapter | None = None) -> "NeuronGraph":
        """Graph of `denoiser` (real or meta weights); runs one forward on a meta copy for the order."""
        adapter = adapter or adapter_for(denoiser)
        meta_model = _meta_copy(denoiser)
        modules = dict(meta_model.named_modules())
        site_modules = {path: m for path, m in modules.items() if path and site_kind(m)}
        executed = _execution_order(meta_model, adapter, site_modules)
        config = getattr(denoiser, "config", None)
        sites = _sites(adapter, site_modules, modules, executed, config)
        edges = _edges(adapter, sites, executed, modules)
        meta = {"family": adapter.family, "denoiser_class": type(denoiser).__name__,
                "order_source": "forward" if executed else "registration",
                "config": _jsonable(dict(config)) if config is not None else None}
        return cls(sites, edges, meta)

    @classmethod
    def from_config(cls, class_name: str, config: Mapping[str, Any], family: str = "auto") -> "NeuronGraph":
        """Graph of a diffusers denoiser class built from a config dict alone (meta device)."""
        import diffusers

        model_cls = getattr(diffusers, class_name, None)
        if model_cls is None:
            raise WorkbenchError(f"diffusers has no model class {class_name!r}; check the config's _class_name")
        with torch.device("meta"):
            model = model_cls.from_config(dict(config))
        return cls.build(model, adapter_for(model, family))

    # ---- sites ----------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.meta["family"]

    @property
    def sites(self) -> list[Site]:
        """All sites, in execution order (sites the reference forward never ran come last)."""
        return list(self._sites.values())

    def site(self, path: str) -> Site:
        try:
            return self._sites[path]
        except KeyError:
            raise WorkbenchError(f"unknown site {path!r}; list sites with `workbench inspect MODEL`") from None

    def select(self, targets: Target = None, *, roles: Iterable[Role | str] | None = None,
               blocks: Iterable[str] | None = None, exclude: Target = None) -> list[Site]:
        """Sites matching all given filters, in execution order.

        Like peft's `target_modules`: a string is a regex that must match the whole path; a list
        matches exact paths or path suffixes (`"attn2.to_v"` matches `....attn2.to_v`). `blocks`
        match exactly or as a prefix (`"down"` matches `down.0`, `down.1`, ...).
        """
        role_set = {parse_role(r) for r in roles} if roles is not None else None
        block_list = list(blocks) if blocks is not None else None
        return [s for s in self._sites.values()
                if (targets is None or _matches(s.path, targets))
                and (role_set is None or s.role in role_set)
                and (block_list is None or any(s.block == b or s.block.startswith(b + ".") for b in block_list))
                and (exclude is None or not _matches(s.path, exclude))]

    def in_execution_order(self, neurons: NeuronSet) -> list[tuple[Site, tuple[int, ...]]]:
        """(site, indices) of a neuron set in execution order: the order an nnsight trace must use
        (a NeuronSet itself is sorted by path, where `blocks.10` comes before `blocks.2`)."""
        neurons.validate(self)
        return [(s, neurons[s.path]) for s in self._sites.values() if s.path in neurons]

    def neurons_of(self, sites: Iterable[Site]) -> NeuronSet:
        """Every neuron of the given sites."""
        return NeuronSet({s.path: range(s.out_features) for s in sites})

    # ---- neurons --------------------------------------------------------------------------------
    def annotate(self, neurons: NeuronSet, key: str, value: Any = True) -> None:
        """Materialize the neurons of `neurons` and set attribute `key` on each.

        `value` is one value for all, or `{site: sequence}` aligned with the *sorted* indices
        `neurons[site]`. Everything is checked before anything is written.
        """
        neurons.validate(self)
        rows = []
        for site, indices in neurons.items():
            values = value[site] if isinstance(value, Mapping) else [value] * len(indices)
            values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
            if len(values) != len(indices):
                raise WorkbenchError(f"{len(values)} values for {len(indices)} neurons of {site}")
            rows += [(site, index, item) for index, item in zip(indices, values)]
        for site, index, item in rows:
            self._set_neuron_attr(site, index, key, item)

    def _set_neuron_attr(self, site: str, index: int, key: str, value: Any) -> None:
        node = (site, index)
        if node not in self.nx:
            self.nx.add_node(node, node_type="neuron")
            self.nx.add_edge(site, node, kind="has")
        self.nx.nodes[node][key] = value

    def neurons(self, key: str | None = None) -> NeuronSet:
        """The materialized neurons (those with attribute `key`, if given)."""
        found: dict[str, list[int]] = {}
        for node, data in self.nx.nodes(data=True):
            if data.get("node_type") == "neuron" and (key is None or key in data):
                found.setdefault(node[0], []).append(node[1])
        return NeuronSet(found)

    def neuron_attrs(self, site: str, index: int) -> dict[str, Any]:
        data = dict(self.nx.nodes.get((site, index), {}))
        data.pop("node_type", None)
        return data

    # ---- summaries ------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Counts of sites and neurons per role and per block."""
        roles: dict[str, Counter] = {}
        blocks: dict[str, Counter] = {}
        for s in self._sites.values():
            for table, key in ((roles, s.role.value), (blocks, s.block)):
                table.setdefault(key, Counter()).update(sites=1, neurons=s.out_features)
        return {"family": self.family, "denoiser_class": self.meta["denoiser_class"],
                "sites": len(self._sites), "neurons": sum(s.out_features for s in self._sites.values()),
                "roles": {k: dict(v) for k, v in sorted(roles.items())},
                "blocks": {k: dict(v) for k, v in blocks.items()}}

    def edges(self, kind: str | None = None) -> list[tuple[Any, Any]]:
        return [(u, v) for u, v, k in self.nx.edges(data="kind") if kind is None or k == kind]

    # ---- serialization --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        neurons = [[n[0], n[1], {k: v for k, v in d.items() if k != "node_type"}]
                   for n, d in self.nx.nodes(data=True) if d.get("node_type") == "neuron"]
        return {"format": GRAPH_FORMAT, **self.meta, "sites": [s.to_json() for s in self._sites.values()],
                "edges": [[u, v, k] for u, v, k in self.nx.edges(data="kind") if k != "has"],
                "neurons": sorted(neurons, key=lambda n: (n[0], n[1]))}

    @classmethod
    def from_json(cls, data: Any) -> "NeuronGraph":
        if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT:
            raise WorkbenchError(f"not a neuron graph (expected format {GRAPH_FORMAT!r}); "
                                 "write it with NeuronGraph.save")
        meta = {k: v for k, v in data.items() if k not in ("format", "sites", "edges", "neurons")}
        graph = cls([Site.from_json(s) for s in data["sites"]], [tuple(e) for e in data["edges"]], meta)
        for site, index, attrs in data["neurons"]:
            NeuronSet({site: [index]}).validate(graph)
            for key, value in attrs.items():
                graph._set_neuron_attr(site, index, key, value)
        return graph

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        atomic_write_json(path, self.to_json(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NeuronGraph":
        return cls.from_json(read_json(path, "neuron graph"))


def parse_role(value: Role | str) -> Role:
    """The `Role` named `value`; a one-line error listing the roles otherwise."""
    try:
        return Role(value)
    except ValueError:
        raise WorkbenchError(f"unknown role {value!r}; use one of: {', '.join(r.value for r in Role)}") from None


def _matches(path: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def _meta_copy(denoiser: nn.Module) -> nn.Module:
    """The same architecture without weights; modules without a diffusers config are used as they are."""
    config = getattr(denoiser, "config", None)
    if config is None or not hasattr(type(denoiser), "from_config") or \
            all(p.device.type == "meta" for p in denoiser.parameters()):
        return denoiser
    with torch.device("meta"):
        return type(denoiser).from_config(config)


def _execution_order(model: nn.Module, adapter: FamilyAdapter, site_modules: dict[str, nn.Module]) -> list[str]:
    """Site paths in the order one reference forward (on the meta device) first calls them."""
    config = getattr(model, "config", None)
    inputs = adapter.example_inputs(config) if config is not None else None
    if inputs is None or any(p.device.type != "meta" for p in model.parameters()):
        return []
    order: list[str] = []
    seen: set[str] = set()

    def first_call(path: str):
        def hook(module, args):
            if path not in seen:
                seen.add(path)
                order.append(path)
        return hook

    handles = [m.register_forward_pre_hook(first_call(p)) for p, m in site_modules.items()]
    args, kwargs = inputs
    to_meta = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    try:
        with torch.no_grad():
            model(*[to_meta(a) for a in args], **{k: _map(v, to_meta) for k, v in kwargs.items()})
    finally:
        for handle in handles:
            handle.remove()
    return order


def _map(value: Any, fn) -> Any:
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return fn(value)


def _sites(adapter: FamilyAdapter, site_modules: dict[str, nn.Module], modules: dict[str, nn.Module],
           executed: list[str], config: Any) -> list[Site]:
    rank = {path: i for i, path in enumerate(executed)}
    paths = executed + [p for p in site_modules if p not in rank]
    depth: dict[str, int] = {}
    sites = []
    for path in paths:
        module = site_modules[path]
        role = adapter.role_of(path, module, modules)
        block, resolution = adapter.block_of(path, config)
        depth.setdefault(block, len(depth))
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        in_features, out_features = features(module)
        sites.append(Site(path=path, role=role, kind=site_kind(module), block=block, depth=depth[block],
                          resolution=None if role in _NON_SPATIAL else resolution,
                          in_features=in_features, out_features=out_features,
                          bias=isinstance(bias, torch.Tensor),
                          weight_shape=tuple(weight.shape) if isinstance(weight, torch.Tensor) else None,
                          channel_dim=channel_dim(module), order=rank.get(path)))
    return sites


def _edges(adapter: FamilyAdapter, sites: list[Site], executed: list[str],
           modules: dict[str, nn.Module]) -> list[tuple[str, str, str]]:
    chain = executed or [s.path for s in sites]
    edges = [(a, b, "flow") for a, b in zip(chain, chain[1:])]
    if chain:
        edges += [("input:latent", chain[0], "flow"), (chain[-1], OUTPUT, "flow")]
    time_sites = [s.path for s in sites if s.role == Role.TIME_EMBED]
    if time_sites:
        edges.append(("input:timestep", time_sites[0], "time"))
    edges += [(a, b, "text") for a, b in adapter.text_edges(sites)]
    edges += [(a, b, "skip") for a, b in adapter.skip_edges(executed, modules)]
    edges += [(a, b, "residual") for a, b in _residual_edges(adapter, sites, executed, modules)]
    return edges


def _residual_edges(adapter: FamilyAdapter, sites: list[Site], executed: list[str],
                    modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    """Around each residual unit, on the latent stream: from the stream site before the unit's
    first site to the stream site after its last (text, time and modulation paths are skipped)."""
    spatial = {s.path for s in sites if s.resolution is not None}
    stream = [p for p in executed if p in spatial]
    edges = []
    for path, module in modules.items():
        if type(module).__name__ not in adapter.residual_units:
            continue
        inside = [i for i, p in enumerate(stream) if p.startswith(path + ".")]
        if inside and inside[0] > 0 and inside[-1] + 1 < len(stream):
            edges.append((stream[inside[0] - 1], stream[inside[-1] + 1]))
    return edges


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (tuple, set)) else str(v)))
