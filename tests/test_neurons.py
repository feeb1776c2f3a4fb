"""NeuronSet and WeightMask: normalisation, set algebra, serialization and validation against a graph."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

from workbench import NeuronGraph, NeuronSet, WeightMask, WorkbenchError
from workbench.stats import RunningStats, save_stats
from workbench.testing import tiny_pipeline

KEY = "transformer_blocks.0.attn2.to_k"
FFN = "transformer_blocks.0.ff.net.0.proj"
NORM = "transformer_blocks.0.norm1"  # LayerNorm without affine weights in the tiny PixArt


@pytest.fixture(scope="module")
def dit():
    """(denoiser, graph) of the tiny PixArt: a real graph whose site sizes we read off the modules."""
    denoiser = tiny_pipeline("dit").transformer
    return denoiser, NeuronGraph.build(denoiser)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---- NeuronSet: normalisation -------------------------------------------------------------------


def test_neuron_set_sorts_dedups_and_drops_empty_sites():
    ns = NeuronSet({"b.y": [5, 1, 5, 3], "a.x": (2, 2), "c.z": [], "d": torch.tensor([4, 0, 4])})
    assert ns.sites == ("a.x", "b.y", "d")  # sorted, empty "c.z" dropped
    assert ns["b.y"] == (1, 3, 5)
    assert ns["a.x"] == (2,)
    assert ns["d"] == (0, 4) and all(type(i) is int for i in ns["d"])
    assert ns["c.z"] == () and ns["missing"] == ()
    assert len(ns) == 6
    assert list(ns) == [("a.x", 2), ("b.y", 1), ("b.y", 3), ("b.y", 5), ("d", 0), ("d", 4)]


def test_neuron_set_equality_ignores_input_order_and_duplicates():
    a = NeuronSet({"s": [3, 1], "t": [0]})
    b = NeuronSet({"t": [0, 0], "s": [1, 3, 3], "u": []})
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != NeuronSet({"s": [1, 3]})
    assert NeuronSet() == NeuronSet({"s": []}) and len(NeuronSet()) == 0


@pytest.mark.parametrize("indices", [[-1], [0, -3], [True], [1, False], torch.tensor([True, False]), ["3"]],
                         ids=["negative", "negative-among", "bool", "bool-among", "bool-tensor", "string"])
def test_neuron_set_rejects_non_index_values(indices):
    with pytest.raises(WorkbenchError) as err:
        NeuronSet({"site.a": indices})
    assert "site.a" in one_line(err)


@pytest.mark.parametrize("indices", [[1.5], [2.0], torch.tensor([1.0, 2.0])],
                         ids=["fractional", "integral-float", "float-tensor"])
def test_neuron_set_rejects_float_indices(indices):
    with pytest.raises(WorkbenchError):
        NeuronSet({"site.a": indices})


def test_contains_site_and_neuron():
    ns = NeuronSet({"s": [1, 4]})
    assert "s" in ns and "t" not in ns
    assert ("s", 4) in ns and ("s", 2) not in ns and ("t", 1) not in ns


# ---- NeuronSet: set algebra ---------------------------------------------------------------------

A = NeuronSet({"x": [1, 2, 3], "y": [5]})
B = NeuronSet({"x": [3, 4], "z": [0]})


def test_union():
    assert A | B == NeuronSet({"x": [1, 2, 3, 4], "y": [5], "z": [0]})


def test_intersection_drops_sites_left_empty():
    both = A & B
    assert both == NeuronSet({"x": [3]})
    assert both.sites == ("x",)


def test_difference_is_not_symmetric():
    assert A - B == NeuronSet({"x": [1, 2], "y": [5]})
    assert B - A == NeuronSet({"x": [4], "z": [0]})
    assert (A - A).sites == () and len(A - A) == 0


def test_symmetric_difference():
    assert A ^ B == NeuronSet({"x": [1, 2, 4], "y": [5], "z": [0]})
    assert A ^ B == (A | B) - (A & B)


def test_algebra_leaves_operands_unchanged():
    before = (A.to_json(), B.to_json())
    _ = (A | B, A & B, A - B, A ^ B)
    assert (A.to_json(), B.to_json()) == before


# ---- NeuronSet: serialization -------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    ns = NeuronSet({"down_blocks.0.attn2.to_v": [7, 0, 3], "conv_in": [31]})
    path = tmp_path / "set.json"
    ns.save(path)
    loaded = NeuronSet.load(path)
    assert loaded == ns
    assert loaded["down_blocks.0.attn2.to_v"] == (0, 3, 7)


def test_saved_bytes_are_stable_and_sorted(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    NeuronSet({"zeta": [9, 2], "alpha": [1]}).save(first)
    NeuronSet({"alpha": [1, 1], "zeta": [2, 9]}).save(second)  # same set, built differently
    text = first.read_text(encoding="utf-8")
    assert first.read_bytes() == second.read_bytes()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert list(data["neurons"]) == ["alpha", "zeta"]
    assert data["neurons"] == {"alpha": [1], "zeta": [2, 9]}
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "set.json"
    NeuronSet({"s": [1]}).save(path)
    before = path.read_bytes()
    with pytest.raises(WorkbenchError) as err:
        NeuronSet({"s": [2]}).save(path)
    assert "overwrite" in one_line(err)
    assert path.read_bytes() == before
    NeuronSet({"s": [2]}).save(path, overwrite=True)
    assert NeuronSet.load(path) == NeuronSet({"s": [2]})
    assert sorted(os.listdir(tmp_path)) == ["set.json"]  # no temporary files left behind


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(WorkbenchError) as err:
        NeuronSet.load(path)
    assert str(path) in one_line(err)


@pytest.mark.parametrize("content", ['{"format": "workbench.neuron_set/1", "neurons": {"s": [1,', "\xff\xfe"],
                         ids=["truncated-json", "not-utf8"])
def test_load_corrupt_file(tmp_path, content):
    path = tmp_path / "set.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(WorkbenchError) as err:
        NeuronSet.load(path)
    assert str(path) in one_line(err)


@pytest.mark.parametrize("data", [
    [1, 2, 3],
    {"neurons": {"s": [1]}},
    {"format": "workbench.neuron_graph/1", "neurons": {"s": [1]}},
    {"format": "workbench.neuron_set/1", "neurons": [["s", 1]]},
], ids=["list", "no-format", "other-format", "neurons-not-a-dict"])
def test_load_wrong_format(tmp_path, data):
    path = tmp_path / "set.json"
    path.write_text(json.dumps(data))
    with pytest.raises(WorkbenchError) as err:
        NeuronSet.load(path)
    assert "NeuronSet.save" in one_line(err)


@pytest.mark.parametrize("neurons", [{"s": 5}, {"s": ["x"]}, {"s": None}],
                         ids=["int-not-list", "non-numeric-string", "null"])
def test_load_hand_written_set_with_bad_indices(tmp_path, neurons):
    # the format tag is right but the body is not: still a one-line WorkbenchError, not a TypeError
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"format": "workbench.neuron_set/1", "neurons": neurons}))
    with pytest.raises(WorkbenchError):
        NeuronSet.load(path)


# ---- NeuronSet: validation ----------------------------------------------------------------------


def test_validate_against_graph(dit):
    denoiser, graph = dit
    size = denoiser.get_submodule(FFN).out_features
    ns = NeuronSet({FFN: [0, size - 1], KEY: [0]})
    assert ns.validate(graph) is ns
    with pytest.raises(WorkbenchError) as err:
        NeuronSet({FFN: [0, size]}).validate(graph)
    message = one_line(err)
    assert FFN in message and f"[0, {size})" in message


def test_validate_unknown_site(dit):
    _, graph = dit
    with pytest.raises(WorkbenchError) as err:
        NeuronSet({"transformer_blocks.9.attn2.to_k": [0]}).validate(graph)
    assert "transformer_blocks.9.attn2.to_k" in one_line(err)


# ---- WeightMask ---------------------------------------------------------------------------------


def mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("value", [torch.ones(2, 2), torch.ones(2, 2, dtype=torch.int64), [[True]], None],
                         ids=["float", "int", "list", "none"])
def test_weight_mask_is_bool_only(value):
    with pytest.raises(WorkbenchError) as err:
        WeightMask({"site.w": value})
    assert "site.w" in one_line(err)


M1 = WeightMask({"a": mask([[1, 1], [0, 0]]), "b": mask([1, 0, 1])})
M2 = WeightMask({"a": mask([[1, 0], [1, 0]]), "c": mask([0, 1])})


def test_weight_mask_union():
    assert M1 | M2 == WeightMask({"a": mask([[1, 1], [1, 0]]), "b": mask([1, 0, 1]), "c": mask([0, 1])})


def test_weight_mask_intersection_keeps_shared_sites_only():
    both = M1 & M2
    assert both == WeightMask({"a": mask([[1, 0], [0, 0]])})
    assert both.sites == ("a",)


def test_weight_mask_difference():
    assert M1 - M2 == WeightMask({"a": mask([[0, 1], [0, 0]]), "b": mask([1, 0, 1])})
    assert M2 - M1 == WeightMask({"a": mask([[0, 0], [1, 0]]), "c": mask([0, 1])})


def test_weight_mask_algebra_leaves_operands_unchanged():
    a, c = M1["a"].clone(), M2["a"].clone()
    _ = (M1 | M2, M1 & M2, M1 - M2)
    assert torch.equal(M1["a"], a) and torch.equal(M2["a"], c)


@pytest.mark.parametrize("op", ["__or__", "__and__", "__sub__"])
def test_weight_mask_shape_mismatch(op):
    other = WeightMask({"a": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(WorkbenchError) as err:
        getattr(M1, op)(other)
    message = one_line(err)
    assert "(2, 2)" in message and "(2, 3)" in message


def test_weight_mask_count_and_density():
    assert M1.count() == 4  # 2 in a, 2 in b
    assert M1.density() == pytest.approx(4 / 7)
    assert WeightMask().count() == 0 and WeightMask().density() == 0.0
    assert WeightMask({"z": torch.zeros(3, dtype=torch.bool)}).density() == 0.0


def test_weight_mask_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    wm = WeightMask({"blocks.0.ff.net.2": torch.rand(5, 7, generator=generator) > 0.5,
                     "conv_in": torch.rand(4, 3, 3, 3, generator=generator) > 0.7})
    path = tmp_path / "mask.safetensors"
    wm.save(path)
    loaded = WeightMask.load(path)
    assert loaded == wm
    assert loaded["conv_in"].dtype == torch.bool and loaded["conv_in"].shape == (4, 3, 3, 3)
    with pytest.raises(WorkbenchError):
        wm.save(path)
    wm.save(path, overwrite=True)


def test_weight_mask_load_missing(tmp_path):
    path = tmp_path / "missing.safetensors"
    with pytest.raises(WorkbenchError) as err:
        WeightMask.load(path)
    assert str(path) in one_line(err)


@pytest.mark.parametrize("corrupt", ["truncated-tail", "truncated-header", "empty", "random"])
def test_weight_mask_load_corrupt(tmp_path, corrupt):
    good = tmp_path / "good.safetensors"
    M1.save(good)
    data = good.read_bytes()
    generator = torch.Generator().manual_seed(1)
    content = {"truncated-tail": data[:-2], "truncated-header": data[:20], "empty": b"",
               "random": bytes(torch.randint(0, 256, (300,), generator=generator).tolist())}[corrupt]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(WorkbenchError) as err:
        WeightMask.load(path)
    assert str(path) in one_line(err)


def test_weight_mask_load_other_safetensors(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.ones(2, dtype=torch.bool)}, str(plain))
    stats = tmp_path / "stats.safetensors"
    save_stats({"a": RunningStats.of(torch.ones(2, 2))}, stats)
    for path in (plain, stats):
        with pytest.raises(WorkbenchError) as err:
            WeightMask.load(path)
        assert "WeightMask.save" in one_line(err)


def test_weight_mask_validate(dit):
    denoiser, graph = dit
    weight = denoiser.get_submodule(FFN).weight
    good = WeightMask({FFN: torch.zeros_like(weight, dtype=torch.bool)})
    assert good.validate(graph) is good
    with pytest.raises(WorkbenchError) as err:
        WeightMask({FFN: torch.zeros(weight.shape[::-1], dtype=torch.bool)}).validate(graph)
    assert FFN in one_line(err)
    with pytest.raises(WorkbenchError):  # a site without a weight
        WeightMask({NORM: torch.zeros(weight.shape[1], dtype=torch.bool)}).validate(graph)
    with pytest.raises(WorkbenchError):
        WeightMask({"no.such.site": torch.zeros(2, dtype=torch.bool)}).validate(graph)
