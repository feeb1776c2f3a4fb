"""Sharding over processes: two shards merge to exactly what one process finds."""

import json

import torch

from localization.detection import NemoConfig
from localization.nemo import NemoLocalizationConfig, holdout_statistics
from localization.sharding import Shard, map_prompts, merge_statistics
from localization.wanda import WandaConfig, collect_norms

CONFIG = NemoLocalizationConfig(detection=NemoConfig(n_seeds=3, steps=5))
PROMPTS = ["a red circle", "a red square", "a cat in the city"]
HOLDOUT = ["a blue square", "a green tree", "a cat", "a dog", "a house"]


def test_merged_shard_statistics_equal_one_pass(unet_model):
    whole = holdout_statistics(unet_model, HOLDOUT, CONFIG)
    parts = [holdout_statistics(unet_model, [HOLDOUT[i] for i in Shard(k, 2).positions(len(HOLDOUT))], CONFIG)
             for k in range(2)]
    merged = merge_statistics(parts)
    for site, stats in whole.items():
        assert merged[site].count == stats.count
        assert torch.allclose(merged[site].mean, stats.mean, rtol=1e-12, atol=1e-12)
        assert torch.allclose(merged[site].std, stats.std, rtol=1e-9, atol=1e-12)


def test_sharded_wanda_norms_equal_one_process_bit_for_bit(unet_model):
    config = WandaConfig(calls=2, steps=4)
    other: list = []  # shard 1's per-prompt sums, handed to shard 0's gather as accelerate would
    collect_norms(unet_model, PROMPTS, config, Shard(1, 2, gather=lambda mine: other.extend(mine) or mine))
    sharded = collect_norms(unet_model, PROMPTS, config, Shard(0, 2, gather=lambda mine: mine + other))
    whole = collect_norms(unet_model, PROMPTS, config)
    assert len(other) == 1 and sharded.keys() == whole.keys()
    assert all(torch.equal(sharded[path], whole[path]) for path in whole)


def test_map_prompts_puts_shard_results_back_in_order():
    shards = [[(i, f"r{i}") for i in Shard(k, 3).positions(7)] for k in range(3)]
    everything = [pair for shard in shards for pair in shard]
    assert map_prompts(lambda p: f"r{p}", list(range(7)), Shard(1, 3, gather=lambda mine: everything)) == \
        [f"r{i}" for i in range(7)]


def test_accelerate_launch_runs_the_same_command_over_two_processes(tiny_folders, tmp_path):
    """`accelerate launch` (two fresh CPU processes, gloo) finds what one process finds."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "h.txt").write_text("\n".join(HOLDOUT) + "\n")
    options = ["localize", "nemo", str(tiny_folders["unet"]), "--prompts", str(tmp_path / "p.txt"), "--holdout",
               str(tmp_path / "h.txt"), "--seeds", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process
    single = subprocess.run([sys.executable, "-m", "workbench.cli", *options, "--out", str(tmp_path / "single.json")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = Path(sys.executable).with_name("accelerate")
    launched = subprocess.run([str(launcher), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
                               "-m", "workbench.cli", *options, "--out", str(tmp_path / "sharded.json")],
                              capture_output=True, text=True, env=env, timeout=600)
    assert launched.returncode == 0, launched.stderr[-2000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("single.json", "sharded.json"))
    assert [r["neurons"] for r in two["results"]] == [r["neurons"] for r in one["results"]]
    assert two["provenance"]["threshold"] == one["provenance"]["threshold"]
    assert [r["prompt"] for r in two["results"]] == PROMPTS
