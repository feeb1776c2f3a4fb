"""NeuronGraph on the three tiny families: roles, execution order, edges, selection, annotation, I/O.

Expectations come from the tiny models themselves: a real CPU forward (with real weights) tells which
module runs when and which tensor flows where; roles are checked against hand-written path rules.
"""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from workbench import NeuronGraph, NeuronSet, Role, WorkbenchError
from workbench.models import adapter_for
from workbench.testing import TINY_FAMILIES, tiny_pipeline

CROSS_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.fixture(scope="module")
def denoisers() -> dict[str, nn.Module]:
    out = {}
    for family in TINY_FAMILIES:
        pipe = tiny_pipeline(family)
        out[family] = pipe.unet if family == "unet" else pipe.transformer
    return out


@pytest.fixture(scope="module")
def graphs(denoisers) -> dict[str, NeuronGraph]:
    """Built once per module; tests that annotate build their own."""
    return {family: NeuronGraph.build(d) for family, d in denoisers.items()}


SKIP_UNIT = re.compile(r"down_blocks\.\d+\.(resnets|attentions|downsamplers)\.\d+")


@pytest.fixture(scope="module")
def recorded(denoisers, graphs) -> dict[str, dict]:
    """One real forward per family, hooked at every site (and at the U-Net's skip-producing units)."""
    out = {}
    for family, denoiser in denoisers.items():
        paths = [s.path for s in graphs[family].sites]
        units = [name for name, _ in denoiser.named_modules() if SKIP_UNIT.fullmatch(name)]
        out[family] = record_forward(family, denoiser, paths + units, order_of=set(paths))
    return out


def forward_inputs(family: str, denoiser: nn.Module) -> tuple[tuple, dict]:
    """Random inputs for one real forward of a tiny denoiser, written independently of the adapters."""
    c = denoiser.config
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    latent = randn(1, c.in_channels, c.sample_size, c.sample_size)
    t = torch.tensor([500])
    if family == "unet":
        return (latent, t), {"encoder_hidden_states": randn(1, 7, c.cross_attention_dim)}
    if family == "dit":
        return (latent,), {"encoder_hidden_states": randn(1, 7, c.caption_channels), "timestep": t,
                           "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return (), {"hidden_states": latent, "encoder_hidden_states": randn(1, 7, c.joint_attention_dim),
                "pooled_projections": randn(1, c.pooled_projection_dim), "timestep": t}


def record_forward(family: str, denoiser: nn.Module, paths, order_of) -> dict:
    """Run a real forward; first inputs and outputs of `paths`, first-call order of those in `order_of`."""
    order, inputs, outputs = [], {}, {}
    modules = dict(denoiser.named_modules())

    def pre(path):
        def hook(module, args):
            if path not in inputs:
                if path in order_of:
                    order.append(path)
                inputs[path] = args[0] if args else None
        return hook

    def post(path):
        def hook(module, args, output):
            outputs.setdefault(path, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = []
    for path in paths:
        handles.append(modules[path].register_forward_pre_hook(pre(path)))
        handles.append(modules[path].register_forward_hook(post(path)))
    args, kwargs = forward_inputs(family, denoiser)
    try:
        with torch.no_grad():
            denoiser(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {"order": order, "inputs": inputs, "outputs": outputs, "kwargs": kwargs, "args": args}


# ---- roles ----------------------------------------------------------------------------------------

ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "out"}
CONTEXT = {"add_q_proj": "context_query", "add_k_proj": "context_key", "add_v_proj": "context_value",
           "to_add_out": "context_out"}


def expected_role(path: str, kind: str) -> str:
    """Hand-written path rules for the tiny models (the library reads owner classes instead)."""
    if kind == "norm":
        return "norm"
    leaf = path.rsplit(".", 1)[-1]
    if m := re.search(r"\.(attn[12]?)\.(to_q|to_k|to_v|to_out\.0|add_\w_proj|to_add_out)$", path):
        owner, attr = m.groups()
        if attr in CONTEXT:
            return CONTEXT[attr]
        return ("cross_attn_" if owner == "attn2" else "self_attn_") + ATTN[attr]
    if m := re.search(r"\.(ff|ff_context)\.net\.(0\.proj|2)$", path):
        prefix = "context_" if m.group(1) == "ff_context" else ""
        return prefix + ("ffn_in" if m.group(2) == "0.proj" else "ffn_out")
    if leaf in ("proj_in", "proj_out"):
        return leaf
    if kind == "conv":
        return "conv"
    if "time_embedding." in path or "timestep_embedder." in path:
        return "time_embed"
    if path.startswith(("caption_projection.", "context_embedder", "time_text_embed.text_embedder.")):
        return "text_embed"
    if leaf == "time_emb_proj" or re.search(r"(norm1|norm1_context|norm_out)\.linear$", path) \
            or path == "adaln_single.linear":
        return "modulation"
    return "linear"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_site_has_its_structural_role(graphs, family):
    graph = graphs[family]
    actual = {s.path: s.role.value for s in graph.sites}
    expected = {s.path: expected_role(s.path, s.kind) for s in graph.sites}
    assert actual == expected
    assert "linear" not in actual.values()  # every Linear of these families has a specific role


def test_unet_cross_attention_roles(graphs, denoisers):
    graph = graphs["unet"]
    keys = graph.select(roles=[Role.CROSS_ATTN_KEY])
    values = graph.select(roles=[Role.CROSS_ATTN_VALUE])
    # 2 down attentions + 1 mid + 2 up blocks x 2 attentions = 7 transformer blocks
    assert len(keys) == len(values) == 7
    assert all(s.path.endswith(".attn2.to_k") for s in keys)
    assert all(s.path.endswith(".attn2.to_v") for s in values)
    # keys/values read the text: their input width is the text width and they have no resolution
    assert {s.in_features for s in keys + values} == {denoisers["unet"].config.cross_attention_dim}
    assert {s.resolution for s in keys + values} == {None}
    assert all(s.role.value.startswith("self_attn_") for s in graph.sites if ".attn1." in s.path)


def test_pixart_cross_attention_has_bias(graphs):
    graph = graphs["dit"]
    kv = graph.select(roles=["cross_attn_key", "cross_attn_value"])
    assert [s.path for s in kv] == [f"transformer_blocks.{i}.attn2.{p}" for i in (0, 1) for p in ("to_k", "to_v")]
    assert all(s.bias for s in kv)
    assert [s.path for s in graph.select(roles=["text_embed"])] == \
        ["caption_projection.linear_1", "caption_projection.linear_2"]


def test_sd3_context_stream_roles(graphs):
    graph = graphs["mmdit"]
    by_role = lambda role: [s.path for s in graph.select(roles=[role])]  # noqa: E731
    assert by_role("context_key") == [f"transformer_blocks.{i}.attn.add_k_proj" for i in (0, 1)]
    assert by_role("context_value") == [f"transformer_blocks.{i}.attn.add_v_proj" for i in (0, 1)]
    # the last joint block is context_pre_only: no text-stream feed-forward there
    assert by_role("context_ffn_in") == ["transformer_blocks.0.ff_context.net.0.proj"]
    assert by_role("context_ffn_out") == ["transformer_blocks.0.ff_context.net.2"]
    assert by_role("ffn_in") == [f"transformer_blocks.{i}.ff.net.0.proj" for i in (0, 1)]
    assert {s.resolution for s in graph.sites if "_context" in s.path or ".add_" in s.path} == {None}


def test_unet_blocks_depths_and_resolutions(graphs, denoisers):
    side = denoisers["unet"].config.sample_size
    resolution = {"stem": side, "down.0": side, "down.1": side // 2, "mid": side // 2,
                  "up.0": side // 2, "up.1": side, "head": side}
    depth = {block: i for i, block in enumerate(resolution)}
    non_spatial = {"time_embed", "modulation", "cross_attn_key", "cross_attn_value"}
    for s in graphs["unet"].sites:
        m = re.match(r"(down|up)_blocks\.(\d+)\.|(mid)_block\.|(conv_norm_out|conv_out)$", s.path)
        block = "stem" if m is None else "mid" if m.group(3) else "head" if m.group(4) \
            else f"{m.group(1)}.{m.group(2)}"
        assert (s.block, s.depth) == (block, depth[block]), s.path
        assert s.resolution == (None if s.role.value in non_spatial else resolution[block]), s.path


# ---- execution order ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_site_order_is_real_execution_order(graphs, recorded, family):
    graph = graphs[family]
    paths = [s.path for s in graph.sites]
    assert graph.meta["order_source"] == "forward"
    assert recorded[family]["order"] == paths
    assert [s.order for s in graph.sites] == list(range(len(paths)))


def test_unet_mid_block_runs_before_up_blocks(graphs, denoisers):
    registered = [name for name, _ in denoisers["unet"].named_modules()]
    assert registered.index("up_blocks") < registered.index("mid_block")  # the trap this guards
    paths = [s.path for s in graphs["unet"].sites]
    last_mid = max(i for i, p in enumerate(paths) if p.startswith("mid_block."))
    first_up = min(i for i, p in enumerate(paths) if p.startswith("up_blocks."))
    last_down = max(i for i, p in enumerate(paths) if p.startswith("down_blocks."))
    assert last_down < last_mid < first_up


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_flow_edges_chain_the_execution_order(graphs, family):
    paths = [s.path for s in graphs[family].sites]
    expected = {("input:latent", paths[0]), (paths[-1], "output"), *zip(paths, paths[1:])}
    assert set(graphs[family].edges("flow")) == expected


def test_building_never_runs_or_changes_the_real_model(denoisers):
    denoiser = denoisers["unet"]
    calls = []
    handle = denoiser.register_forward_pre_hook(lambda *_: calls.append(1))
    before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    try:
        NeuronGraph.build(denoiser)
    finally:
        handle.remove()
    assert calls == []
    assert all(torch.equal(v, before[k]) for k, v in denoiser.state_dict().items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in denoiser.modules())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_graph_from_config_alone_equals_graph_of_real_model(graphs, denoisers, family):
    denoiser = denoisers[family]
    from_config = NeuronGraph.from_config(type(denoiser).__name__, dict(denoiser.config))
    assert from_config.to_json() == graphs[family].to_json()


def test_from_config_unknown_class():
    with pytest.raises(WorkbenchError) as err:
        NeuronGraph.from_config("NoSuchTransformer2DModel", {})
    assert "NoSuchTransformer2DModel" in str(err.value)


# ---- skip, text and residual edges ---------------------------------------------------------------


def test_unet_skip_edges_carry_the_down_path_outputs(graphs, denoisers, recorded):
    denoiser, graph = denoisers["unet"], graphs["unet"]
    skips = graph.edges("skip")
    assert len(skips) == sum(len(block.resnets) for block in denoiser.up_blocks)
    paths = [s.path for s in graph.sites]
    last_down = max((p for p in paths if p.startswith("down_blocks.")), key=paths.index)
    assert (last_down, "up_blocks.0.resnets.0.norm1") in skips  # first up resnet pops the last push

    def unit(producer: str) -> str:  # the module whose output the U-Net pushes on its skip stack
        m = SKIP_UNIT.match(producer)
        return m.group(0) if m else producer

    consumers = []
    for producer, consumer in skips:
        assert producer == "conv_in" or producer.startswith("down_blocks."), producer
        m = re.fullmatch(r"(up_blocks\.\d+\.resnets\.\d+)\.(.+)", consumer)
        assert m, consumer
        first_in_resnet = next(p for p in paths if p.startswith(m.group(1) + "."))
        assert consumer == first_in_resnet
        consumers.append(m.group(1))
    assert len(set(consumers)) == len(consumers)

    # real data flow: the consumer's input ends with exactly the producer unit's output channels
    for producer, consumer in skips:
        pushed = recorded["unet"]["outputs"][unit(producer)]
        received = recorded["unet"]["inputs"][consumer]
        assert torch.equal(received[:, -pushed.shape[1]:], pushed), (producer, consumer)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_text_edges_are_real_data_flow(graphs, recorded, family):
    edges = graphs[family].edges("text")
    assert edges
    recorded = recorded[family]
    text_inputs = [v for k, v in recorded["kwargs"].items() if k in ("encoder_hidden_states", "pooled_projections")]
    for source, target in edges:
        received = recorded["inputs"][target]
        if source == "input:text":
            assert any(received.shape == t.shape and torch.equal(received, t) for t in text_inputs), target
        else:
            assert torch.equal(received, recorded["outputs"][source]), (source, target)


def test_unet_text_enters_every_cross_attention_key_and_value(graphs):
    graph = graphs["unet"]
    kv = {s.path for s in graph.select(roles=["cross_attn_key", "cross_attn_value"])}
    assert set(graph.edges("text")) == {("input:text", p) for p in kv}


def test_pixart_text_enters_through_caption_projection(graphs):
    graph = graphs["dit"]
    kv = [s.path for s in graph.select(roles=["cross_attn_key", "cross_attn_value"])]
    assert set(graph.edges("text")) == {("input:text", "caption_projection.linear_1"),
                                        *{("caption_projection.linear_2", p) for p in kv}}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_residual_edges_stay_on_the_latent_stream(graphs, family):
    # a residual around a block connects the hidden states before and after it, never the text or
    # time-embedding paths that happen to run just before the block
    side_paths = {"text_embed", "time_embed", "modulation"}
    graph = graphs[family]
    residual = graph.edges("residual")
    assert residual
    bad = [(u, v) for u, v in residual if graph.site(u).role.value in side_paths
           or graph.site(v).role.value in side_paths]
    assert bad == []


# ---- select ---------------------------------------------------------------------------------------


def test_select_regex_must_match_the_whole_path(graphs):
    graph = graphs["unet"]
    values = graph.select(r".*\.attn2\.to_v")
    assert values == graph.select(roles=["cross_attn_value"]) and len(values) == 7
    assert graph.select("attn2.to_v") == []  # fullmatch, not search
    assert [s.path for s in graph.select(r"conv_(in|out)")] == ["conv_in", "conv_out"]


def test_select_list_matches_exact_paths_and_dotted_suffixes(graphs):
    graph = graphs["unet"]
    assert [s.path for s in graph.select(["conv_in"])] == ["conv_in"]
    assert [s.path for s in graph.select([CROSS_K])] == [CROSS_K]
    assert graph.select(["attn2.to_v"]) == graph.select(roles=["cross_attn_value"])
    to_v = graph.select(["to_v"])
    assert len(to_v) == 14 and {s.role for s in to_v} == {Role.SELF_ATTN_VALUE, Role.CROSS_ATTN_VALUE}
    assert graph.select(["n2.to_v"]) == []  # a suffix starts at a dot
    # "conv" matches the samplers' `.conv` but not conv_in, conv_out or resnets' conv1/conv2
    assert [s.path for s in graph.select(["conv"])] == \
        ["down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"]


def test_select_roles_accepts_strings_and_enums(graphs):
    graph = graphs["unet"]
    both = graph.select(roles=["cross_attn_key", Role.CROSS_ATTN_VALUE])
    assert {s.role for s in both} == {Role.CROSS_ATTN_KEY, Role.CROSS_ATTN_VALUE} and len(both) == 14
    assert graph.select(roles=[]) == []


def test_select_unknown_role_is_a_workbench_error(graphs):
    with pytest.raises(WorkbenchError):
        graphs["unet"].select(roles=["cross_attn_vlaue"])


def test_select_blocks_exact_or_prefix(graphs):
    graph = graphs["unet"]
    down = graph.select(blocks=["down"])
    assert {s.path for s in down} == {s.path for s in graph.sites if s.path.startswith("down_blocks.")}
    assert {s.block for s in down} == {"down.0", "down.1"}
    assert {s.path for s in graph.select(blocks=["down.1"])} == \
        {s.path for s in graph.sites if s.path.startswith("down_blocks.1.")}
    assert graph.select(blocks=["d"]) == [] and graph.select(blocks=["down.1.0"]) == []
    assert [s.path for s in graph.select(blocks=["head", "stem"], roles=["conv"])] == ["conv_in", "conv_out"]


def test_select_filters_combine_and_keep_execution_order(graphs):
    graph = graphs["unet"]
    order = {s.path: i for i, s in enumerate(graph.sites)}
    keys = graph.select(roles=["cross_attn_key"], exclude=r"up_blocks\..*")
    assert [s.path for s in keys] == [f"{p}.attentions.0.transformer_blocks.0.attn2.to_k"
                                      for p in ("down_blocks.0", "down_blocks.1", "mid_block")]
    assert graph.select(roles=["cross_attn_key"], exclude=[CROSS_K]) == \
        [s for s in graph.select(roles=["cross_attn_key"]) if s.path != CROSS_K]
    up_keys = graph.select(r".*to_k", roles=["cross_attn_key"], blocks=["up"])
    assert len(up_keys) == 4 and all(s.path.startswith("up_blocks.") for s in up_keys)
    everything = graph.select(exclude=r"(?!mid_block\.).*")
    assert [order[s.path] for s in everything] == sorted(order[s.path] for s in everything)
    assert everything and all(s.path.startswith("mid_block.") for s in everything)


def test_neurons_of_selected_sites(graphs):
    graph = graphs["dit"]
    sites = graph.select(roles=["cross_attn_value"])
    ns = graph.neurons_of(sites)
    assert ns.sites == tuple(s.path for s in sites)
    assert all(ns[s.path] == tuple(range(s.out_features)) for s in sites)
    assert ns.validate(graph) is ns


# ---- annotate / neurons ---------------------------------------------------------------------------

K = "transformer_blocks.0.attn2.to_k"
V = "transformer_blocks.1.attn2.to_v"


@pytest.fixture
def dit_graph(denoisers) -> NeuronGraph:
    return NeuronGraph.build(denoisers["dit"])


def neuron_nodes(graph: NeuronGraph) -> list:
    return [n for n, d in graph.nx.nodes(data=True) if d.get("node_type") == "neuron"]


def test_no_neuron_nodes_until_annotated(dit_graph):
    assert neuron_nodes(dit_graph) == []
    assert dit_graph.neurons() == NeuronSet()
    assert dit_graph.nx.number_of_nodes() == len(dit_graph.sites) + 4  # + 3 inputs and the output
    assert dit_graph.edges("has") == []


def test_annotate_values_align_with_sorted_indices(dit_graph):
    dit_graph.annotate(NeuronSet({K: [3, 1]}), "score", {K: [0.5, 0.25]})  # aligned with (1, 3)
    dit_graph.annotate(NeuronSet({V: [2, 0]}), "score", {V: torch.tensor([7.0, 9.0])})
    dit_graph.annotate(NeuronSet({K: [1], V: [5]}), "kept")
    assert dit_graph.neuron_attrs(K, 1) == {"score": 0.5, "kept": True}
    assert dit_graph.neuron_attrs(K, 3) == {"score": 0.25}
    assert dit_graph.neuron_attrs(V, 0) == {"score": 7.0} and dit_graph.neuron_attrs(V, 2) == {"score": 9.0}
    assert dit_graph.neuron_attrs(V, 4) == {}
    assert dit_graph.neurons() == NeuronSet({K: [1, 3], V: [0, 2, 5]})
    assert dit_graph.neurons("score") == NeuronSet({K: [1, 3], V: [0, 2]})
    assert dit_graph.neurons("kept") == NeuronSet({K: [1], V: [5]})
    assert dit_graph.neurons("absent") == NeuronSet()
    assert sorted(dit_graph.edges("has")) == sorted((s, (s, i)) for s, i in dit_graph.neurons())
    dit_graph.annotate(NeuronSet({K: [3]}), "score", -1.0)  # overwrite, no duplicate node
    assert dit_graph.neuron_attrs(K, 3) == {"score": -1.0} and len(neuron_nodes(dit_graph)) == 5


@pytest.mark.parametrize("values", [[0.1], [0.1, 0.2, 0.3]], ids=["too-few", "too-many"])
def test_annotate_wrong_number_of_values(dit_graph, values):
    with pytest.raises(WorkbenchError) as err:
        dit_graph.annotate(NeuronSet({K: [0, 1]}), "score", {K: values})
    assert K in str(err.value)


def test_annotate_out_of_range_creates_nothing(dit_graph):
    size = dit_graph.site(K).out_features
    with pytest.raises(WorkbenchError):
        dit_graph.annotate(NeuronSet({K: [0, size]}), "score", 1.0)
    with pytest.raises(WorkbenchError):
        dit_graph.annotate(NeuronSet({"no.such.site": [0]}), "score", 1.0)
    assert neuron_nodes(dit_graph) == []


# ---- serialization --------------------------------------------------------------------------------


def through_json(graph: NeuronGraph) -> NeuronGraph:
    return NeuronGraph.from_json(json.loads(json.dumps(graph.to_json())))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_json_round_trip(graphs, family):
    graph = graphs[family]
    loaded = through_json(graph)
    assert loaded.to_json() == graph.to_json()
    assert loaded.sites == graph.sites and [s.order for s in loaded.sites] == [s.order for s in graph.sites]
    for kind in ("flow", "skip", "text", "time", "residual"):
        assert loaded.edges(kind) == graph.edges(kind), kind
    assert loaded.family == family


def test_json_round_trip_keeps_annotated_neurons(dit_graph):
    dit_graph.annotate(NeuronSet({K: [4, 2]}), "score", {K: [0.5, -1.5]})
    dit_graph.annotate(NeuronSet({K: [2], V: [31]}), "concept", "cat")
    dit_graph.annotate(NeuronSet({V: [31]}), "steps", {V: [[1, 2, 3]]})
    loaded = through_json(dit_graph)
    assert loaded.to_json() == dit_graph.to_json()
    assert loaded.neurons() == NeuronSet({K: [2, 4], V: [31]})
    assert loaded.neurons("concept") == NeuronSet({K: [2], V: [31]})
    assert loaded.neuron_attrs(K, 2) == {"score": 0.5, "concept": "cat"}  # values follow sorted indices
    assert loaded.neuron_attrs(K, 4) == {"score": -1.5}
    assert loaded.neuron_attrs(V, 31) == {"concept": "cat", "steps": [1, 2, 3]}


def test_json_round_trip_of_dict_valued_attribute(dit_graph):
    dit_graph.annotate(NeuronSet({K: [1]}), "scores", {K: [{"cat": 0.5, "dog": 0.125}]})
    assert dit_graph.neuron_attrs(K, 1) == {"scores": {"cat": 0.5, "dog": 0.125}}
    loaded = through_json(dit_graph)
    assert loaded.neuron_attrs(K, 1) == {"scores": {"cat": 0.5, "dog": 0.125}}


def test_save_load_and_overwrite(dit_graph, tmp_path):
    dit_graph.annotate(NeuronSet({K: [0]}), "score", 2.0)
    path = tmp_path / "graph.json"
    dit_graph.save(path)
    assert NeuronGraph.load(path).to_json() == dit_graph.to_json()
    before = path.read_bytes()
    dit_graph.annotate(NeuronSet({K: [1]}), "score", 3.0)
    with pytest.raises(WorkbenchError) as err:
        dit_graph.save(path)
    assert "overwrite" in str(err.value)
    assert path.read_bytes() == before
    dit_graph.save(path, overwrite=True)
    assert NeuronGraph.load(path).neurons("score") == NeuronSet({K: [0, 1]})


@pytest.mark.parametrize("content", ["missing", '{"format": "workbench.neuron_graph/1", "sites": [',
                                     json.dumps(NeuronSet({K: [1]}).to_json()), "[]"],
                         ids=["missing", "truncated", "neuron-set", "list"])
def test_load_bad_file(tmp_path, content):
    path = tmp_path / "graph.json"
    if content != "missing":
        path.write_text(content)
    with pytest.raises(WorkbenchError) as err:
        NeuronGraph.load(path)
    message = str(err.value)
    assert "\n" not in message and (str(path) in message or "NeuronGraph.save" in message)


# ---- summary --------------------------------------------------------------------------------------


def test_summary_counts(graphs):
    graph = graphs["dit"]
    summary = graph.summary()
    width = graph.site(K).out_features
    assert summary["roles"]["cross_attn_key"] == {"sites": 2, "neurons": 2 * width}
    assert list(summary["blocks"]) == ["stem", "block.0", "block.1", "head"]
    assert summary["sites"] == len(graph.sites)
    assert summary["neurons"] == sum(s.out_features for s in graph.sites)
    assert sum(r["sites"] for r in summary["roles"].values()) == summary["sites"]
    assert sum(b["neurons"] for b in summary["blocks"].values()) == summary["neurons"]


# ---- families -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generic_family_has_only_structural_roles(graphs, denoisers, family):
    denoiser = denoisers[family]
    adapter = adapter_for(denoiser, "generic")
    graph = NeuronGraph.build(denoiser, adapter)
    assert graph.family == "generic" and graph.meta["order_source"] == "registration"
    assert all(s.role.value == s.kind for s in graph.sites)
    assert {s.role.value for s in graph.sites} == {"linear", "conv", "norm"}
    assert {s.path for s in graph.sites} == {s.path for s in graphs[family].sites}
    registered = [n for n, _ in denoiser.named_modules() if n in {s.path for s in graph.sites}]
    assert [s.path for s in graph.sites] == registered
    assert graph.edges("text") == [] and graph.edges("skip") == []


def test_generic_family_on_a_plain_module():
    module = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.LayerNorm(5), nn.Conv1d(5, 2, 1))
    graph = NeuronGraph.build(module, adapter_for(module, "generic"))
    assert [(s.path, s.role.value, s.out_features) for s in graph.sites] == \
        [("0", "linear", 5), ("2", "norm", 5), ("3", "conv", 2)]
    assert graph.meta["denoiser_class"] == "Sequential" and graph.meta["config"] is None
    assert set(graph.edges("flow")) == {("input:latent", "0"), ("0", "2"), ("2", "3"), ("3", "output")}


def test_unsupported_denoiser_names_the_supported_families():
    module = nn.Sequential(nn.Linear(2, 2))
    for call in (lambda: adapter_for(module), lambda: NeuronGraph.build(module)):
        with pytest.raises(WorkbenchError) as err:
            call()
        message = str(err.value)
        assert "Sequential" in message and "generic" in message
        for family, cls in (("unet", "UNet2DConditionModel"), ("dit", "PixArtTransformer2DModel"),
                            ("mmdit", "SD3Transformer2DModel")):
            assert family in message and cls in message


def test_unknown_family_name():
    with pytest.raises(WorkbenchError) as err:
        adapter_for(nn.Linear(2, 2), "unte")
    assert "'unte'" in str(err.value) and "unet" in str(err.value)
