"""Sharding over processes: two shards merge to exactly what one process finds."""

import json

import torch
from accelerate import debug_launcher

import workbench
from localization.detection import NemoConfig
from localization.localize import localize
from localization.nemo import NemoLocalizationConfig, holdout_statistics
from localization.sharding import Shard, map_prompts, merge_statistics

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


def test_map_prompts_puts_shard_results_back_in_order():
    shards = [[(i, f"r{i}") for i in Shard(k, 3).positions(7)] for k in range(3)]
    everything = [pair for shard in shards for pair in shard]
    assert map_prompts(lambda p: f"r{p}", list(range(7)), Shard(1, 3, gather=lambda mine: everything)) == \
        [f"r{i}" for i in range(7)]


def _sharded_run(folder, out):
    from accelerate.state import PartialState

    from localization.sharding import current_shard

    PartialState._reset_state()  # a forked child may inherit the parent's single-process state

    model = workbench.load(folder)
    shard = current_shard()
    result = localize(model, "nemo", PROMPTS, config=CONFIG, holdout=HOLDOUT, shard=shard)
    if shard.index == 0:
        with open(out, "w") as f:
            json.dump({"count": shard.count, "results": result.results,
                       "threshold": result.provenance["threshold"]}, f)


def test_two_processes_find_what_one_finds(tiny_folders, unet_model, tmp_path):
    single = localize(unet_model, "nemo", PROMPTS, config=CONFIG, holdout=HOLDOUT)
    debug_launcher(_sharded_run, args=(str(tiny_folders["unet"]), str(tmp_path / "sharded.json")), num_processes=2)
    sharded = json.loads((tmp_path / "sharded.json").read_text())
    assert sharded["count"] == 2
    assert sharded["threshold"] == single.provenance["threshold"]
    assert [r["neurons"] for r in sharded["results"]] == [r["neurons"] for r in single.results]
    assert [r["prompt"] for r in sharded["results"]] == PROMPTS
