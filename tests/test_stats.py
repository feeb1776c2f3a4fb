"""RunningStats: streaming per-neuron statistics checked against a float64 numpy reference."""

import functools
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from workbench import WeightMask, WorkbenchError
from workbench.stats import RunningStats, load_stats, save_stats

RTOL = 1e-12


def data(rows: int, neurons: int = 6, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Columns with different scales and offsets, some entirely negative (so max < 0 there)."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 0.01, 100.0, 3.0, 0.5, 7.0][:neurons], dtype=torch.float64)
    offset = torch.tensor([0.0, 5.0, -300.0, -50.0, 1.0, 0.0][:neurons], dtype=torch.float64)
    return (torch.randn(rows, neurons, generator=generator, dtype=torch.float64) * scale + offset).to(dtype)


def reference(x: torch.Tensor) -> dict[str, np.ndarray]:
    a = x.double().numpy()
    return {"count": a.shape[0], "mean": a.mean(0), "variance": a.var(0, ddof=1),
            "mean_abs": np.abs(a).mean(0), "max": a.max(0)}


def assert_matches(stats: RunningStats, x: torch.Tensor, rtol: float = RTOL):
    ref = reference(x)
    assert float(stats.count) == ref["count"]
    for name in ("mean", "variance", "mean_abs", "max"):
        value = getattr(stats, name)
        assert value.dtype == torch.float64, name
        np.testing.assert_allclose(value.numpy(), ref[name], rtol=rtol, atol=0, err_msg=name)
    np.testing.assert_allclose(stats.std.numpy(), np.sqrt(ref["variance"]), rtol=rtol, atol=0)


def split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == x.shape[0]
    return list(torch.split(x, sizes))


def test_of_matches_reference():
    x = data(50)
    assert_matches(RunningStats.of(x), x)


@pytest.mark.parametrize("sizes", [[1] * 40, [7, 1, 13, 2, 17], [39, 1], [1, 39], [40]],
                         ids=["ones", "ragged", "big-then-one", "one-then-big", "single"])
def test_update_over_blocks_matches_one_pass(sizes):
    x = data(40, seed=1)
    stats = RunningStats.empty(x.shape[1])
    for block in split(x, sizes):
        stats.update(block)
    assert_matches(stats, x)


def test_update_with_empty_block_is_a_no_op():
    x = data(10)
    stats = RunningStats.of(x)
    stats.update(torch.empty(0, x.shape[1]))
    assert_matches(stats, x)


def test_merge_two_halves_equals_one_pass():
    x = data(31, seed=2)
    merged = RunningStats.of(x[:12]).merge(RunningStats.of(x[12:]))
    assert_matches(merged, x)


def test_merge_does_not_modify_operands_but_merge_in_place_does():
    x = data(20, seed=3)
    a, b = RunningStats.of(x[:8]), RunningStats.of(x[8:])
    a_mean = a.mean.clone()
    merged = a.merge(b)
    assert torch.equal(a.mean, a_mean) and float(a.count) == 8 and float(b.count) == 12
    assert a.merge_(b) is a
    assert torch.equal(a.mean, merged.mean) and float(a.count) == 20


def test_many_shards_in_any_order_equal_one_pass():
    x = data(60, seed=4)
    shards = [RunningStats.of(part) for part in split(x, [1, 9, 2, 20, 5, 1, 3, 19])]

    left = functools.reduce(lambda a, b: a.merge(b), shards)
    right = functools.reduce(lambda a, b: b.merge(a), reversed(shards))
    shuffled = shards[:]
    random.Random(0).shuffle(shuffled)
    permuted = functools.reduce(lambda a, b: a.merge(b), shuffled)

    def tree(parts):
        if len(parts) == 1:
            return parts[0]
        middle = len(parts) // 2
        return tree(parts[:middle]).merge(tree(parts[middle:]))

    for stats in (left, right, permuted, tree(shards)):
        assert_matches(stats, x)


def test_merging_empty_is_identity():
    x = data(15, seed=5)
    stats = RunningStats.of(x)
    empty = RunningStats.empty(x.shape[1])
    for merged in (stats.merge(empty), empty.merge(stats)):
        for field in ("count", "mean", "m2", "mean_abs", "max"):
            assert torch.equal(getattr(merged, field), getattr(stats, field)), field
    both = empty.merge(RunningStats.empty(x.shape[1]))
    assert float(both.count) == 0 and torch.equal(both.mean, torch.zeros(x.shape[1], dtype=torch.float64))
    assert not torch.isnan(both.variance).any()


def test_single_sample_has_zero_variance():
    stats = RunningStats.of(torch.tensor([[3.0, -2.0]]))
    assert torch.equal(stats.variance, torch.zeros(2, dtype=torch.float64))
    assert stats.max.tolist() == [3.0, -2.0] and stats.mean_abs.tolist() == [3.0, 2.0]


def test_shape_mismatch():
    a = RunningStats.of(torch.ones(3, 4))
    with pytest.raises(WorkbenchError) as err:
        a.merge(RunningStats.of(torch.ones(3, 5)))
    assert "\n" not in str(err.value)
    with pytest.raises(WorkbenchError):
        a.update(torch.ones(2, 5))
    with pytest.raises(WorkbenchError):
        RunningStats.empty(4).merge_(RunningStats.empty(3))


def test_float32_input_accumulates_in_float64():
    # large offset, small spread: float32 accumulation would lose the variance and drift the mean
    generator = torch.Generator().manual_seed(6)
    spread = torch.tensor([1.0, 0.1, 10.0], dtype=torch.float64)
    x32 = (1e4 + torch.randn(4000, 3, generator=generator, dtype=torch.float64) * spread).to(torch.float32)
    stats = RunningStats.empty(3)
    for block in torch.split(x32, 7):
        stats.update(block)
    for field in ("count", "mean", "m2", "mean_abs", "max"):
        assert getattr(stats, field).dtype == torch.float64, field
    assert_matches(stats, x32, rtol=1e-9)


def test_save_load_round_trip(tmp_path):
    stats = {"down_blocks.0.attn2.to_v": RunningStats.of(data(9, seed=7)),
             "conv_in": RunningStats.empty(6)}  # max is -inf before any data
    path = tmp_path / "stats.safetensors"
    save_stats(stats, path, metadata={"prompts": "cats"})
    loaded = load_stats(path)
    assert loaded.keys() == stats.keys()
    for site, s in stats.items():
        for field in ("count", "mean", "m2", "mean_abs", "max"):
            value = getattr(loaded[site], field)
            assert value.dtype == torch.float64
            assert torch.equal(value, getattr(s, field)), (site, field)
    # the loaded statistics keep accumulating
    loaded["conv_in"].update(data(4, seed=8))
    assert_matches(loaded["conv_in"], data(4, seed=8))


def test_save_refuses_overwrite(tmp_path):
    path = tmp_path / "stats.safetensors"
    save_stats({"a": RunningStats.of(torch.ones(2, 2))}, path)
    before = path.read_bytes()
    with pytest.raises(WorkbenchError):
        save_stats({"a": RunningStats.of(torch.zeros(2, 2))}, path)
    assert path.read_bytes() == before
    save_stats({"a": RunningStats.of(torch.zeros(2, 2))}, path, overwrite=True)
    assert float(load_stats(path)["a"].max[0]) == 0.0


def test_load_wrong_files(tmp_path):
    missing = tmp_path / "missing.safetensors"
    mask = tmp_path / "mask.safetensors"
    WeightMask({"a": torch.ones(2, dtype=torch.bool)}).save(mask)
    plain = tmp_path / "plain.safetensors"
    save_file({"a/mean": torch.zeros(2, dtype=torch.float64)}, str(plain))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x07" * 64)
    truncated = tmp_path / "truncated.safetensors"
    save_stats({"a": RunningStats.of(torch.ones(2, 2))}, tmp_path / "good.safetensors")
    truncated.write_bytes((tmp_path / "good.safetensors").read_bytes()[:-4])
    for path in (missing, mask, plain, junk, truncated):
        with pytest.raises(WorkbenchError) as err:
            load_stats(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("sizes", [[50], [1, 49], [7, 0, 13, 30], [10] * 5])
def test_combine_k_parts_equals_one_pass(sizes):
    x = data(sum(sizes), seed=3)
    parts = [RunningStats.of(p) if len(p) else RunningStats.empty(x.shape[1]) for p in split(x, sizes)]
    assert_matches(RunningStats.combine(parts), x, rtol=1e-11)
