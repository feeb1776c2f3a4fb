"""NeMo localization: each step against hand-computed values, then on real (tiny) models."""

import math

import pytest
import torch

from localization.detection import NemoConfig
from localization.nemo import (MemorizationScorer, NemoLocalizationConfig, holdout_statistics, localize_prompt,
                               nemo_sites, value_activations)
from localization.nemo_search import (SelectionSchedule, candidates, greedy_removal, initial_selection, refine,
                                      z_scores)
from workbench.errors import WorkbenchError
from workbench.neurons import NeuronSet
from workbench.stats import RunningStats

# ---- the search, with hand-computed values --------------------------------------------------------------


def test_z_scores_are_two_sided_with_the_unbiased_std():
    holdout = {"s": RunningStats.of(torch.tensor([[0.0, 0.0], [2.0, 4.0]]))}  # mean (1, 2), std (√2, √8)
    z = z_scores({"s": torch.tensor([3.0, 0.0])}, holdout)["s"]
    assert z.tolist() == pytest.approx([2 / math.sqrt(2), 2 / math.sqrt(8)])


def test_a_neuron_constant_over_the_holdout_gets_z_zero_not_infinity():
    holdout = {"s": RunningStats.of(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))}  # σ = (0, √2)
    z = z_scores({"s": torch.tensor([5.0, 3.0])}, holdout)["s"]
    assert z.tolist() == pytest.approx([0.0, 2 / math.sqrt(2)])


def test_candidates_are_z_over_theta_plus_top_k_by_z_or_raw_activation():
    a, z = {"s": torch.tensor([10.0, 1.0, 2.0, 3.0])}, {"s": torch.tensor([0.5, 6.0, 2.0, 7.0])}
    assert candidates(a, z, theta=5.0, k=0)["s"] == (1, 3)
    assert candidates(a, z, theta=5.0, k=1, top_k_on="z")["s"] == (1, 3)  # top z is already in
    assert candidates(a, z, theta=5.0, k=1, top_k_on="raw")["s"] == (0, 1, 3)
    assert candidates(a, z, theta=1.0, k=2, top_k_on="z")["s"] == (1, 2, 3)


def test_selection_schedule_runs_theta_5_to_1_25_and_k_0_to_15():
    steps = SelectionSchedule().steps(max_k=1280)
    assert steps[0] == (5.0, 0) and steps[1] == (4.75, 1) and steps[-1] == (1.25, 15) and len(steps) == 16
    assert SelectionSchedule().steps(max_k=3)[-1] == (4.5, 2)  # k may not reach the layer width
    with pytest.raises(WorkbenchError, match="theta_step > 0"):
        SelectionSchedule(theta_step=0.0, k_step=0)  # would never end


def _count_scorer(log):
    """Score = 1 − (blocked neurons)/10, recording every set scored and every call."""
    def score(sets):
        log.append(list(sets))
        return [1 - len(s) / 10 for s in sets]
    return score


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_initial_selection_takes_the_first_configuration_under_the_threshold(batch):
    a = {"s": torch.arange(10.0)}
    z = {"s": torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 4.6, 5.5])}
    log = []
    result = initial_selection(a, z, threshold=0.75, score=_count_scorer(log), batch=batch)
    # θ 5.0 → {9} (0.9); θ 4.75 & k 1 → {9} (0.9); θ 4.5, k 2 → {8, 9} (0.8); θ 4.25, k 3 → {7,8,9} (0.7 ≤ 0.75)
    assert result.success and (result.theta, result.k) == (4.25, 3) and result.neurons["s"] == (7, 8, 9)
    assert result.score == pytest.approx(0.7) and result.tried == 4
    assert sum(len(call) for call in log) == min(10, -(-4 // batch) * batch)  # k stops at the layer width, 10


def test_initial_selection_failure_keeps_the_last_configuration():
    a, z = {"s": torch.arange(40.0)}, {"s": torch.zeros(40)}
    result = initial_selection(a, z, threshold=-1.0, score=_count_scorer([]))
    assert not result.success and (result.theta, result.k) == (1.25, 15) and len(result.neurons) == 15
    assert result.score == pytest.approx(1 - 15 / 10)


def _needs(required):
    """Memorization stays removed (score 0) only while every required neuron is blocked."""
    log = []

    def score(sets):
        log.append(list(sets))
        return [0.0 if all(n in s for n in required) else 1.0 for s in sets]
    return score, log


def test_refinement_drops_layers_then_neurons_in_reverse_order():
    blocked = NeuronSet({"a": [0, 1, 2], "b": [0, 1]})
    score, log = _needs([("a", 2), ("b", 0)])
    refined, scored = refine(blocked, ["a", "b"], threshold=0.5, score=score, batch=1)
    assert refined == NeuronSet({"a": [2], "b": [0]})
    trials = [call[0] for call in log]
    assert trials[:2] == [NeuronSet({"a": [0, 1, 2]}), NeuronSet({"b": [0, 1]})]  # layers: b first, then a
    # then single neurons, b before a: unblock b0 (needed), b1 (dropped), a0, a1 (dropped), a2 (needed)
    assert trials[2:] == [NeuronSet({"a": [0, 1, 2], "b": [1]}), NeuronSet({"a": [0, 1, 2], "b": [0]}),
                          NeuronSet({"a": [1, 2], "b": [0]}), NeuronSet({"a": [2], "b": [0]}),
                          NeuronSet({"b": [0]})]
    assert scored == 7


def test_refinement_drops_a_whole_layer_when_it_is_not_needed():
    score, _ = _needs([("a", 1)])
    refined, _ = refine(NeuronSet({"a": [0, 1], "b": [0, 1, 2]}), ["a", "b"], 0.5, score, batch=1)
    assert refined == NeuronSet({"a": [1]})


@pytest.mark.parametrize("batch", [2, 3, 8])
def test_batched_refinement_makes_the_sequential_decisions(batch):
    blocked = NeuronSet({"a": list(range(6)), "b": list(range(5)), "c": [0, 3]})
    required = [("a", 4), ("b", 1), ("b", 3)]
    sequential, _ = refine(blocked, ["a", "b", "c"], 0.5, _needs(required)[0], batch=1)
    batched, _ = refine(blocked, ["a", "b", "c"], 0.5, _needs(required)[0], batch=batch)
    assert batched == sequential == NeuronSet({"a": [4], "b": [1, 3]})


def test_speculation_learns_alternating_decisions():
    """Drop, keep, drop, ...: the tree follows the pattern once seen, far beyond one decision per call."""
    blocked = NeuronSet({"a": range(24)})
    score, log = _needs([("a", i) for i in range(1, 24, 2)])
    remaining, scored = greedy_removal(blocked, [NeuronSet({"a": [i]}) for i in range(24)], 0.5, score, batch=8)
    assert remaining == NeuronSet({"a": range(1, 24, 2)})
    assert len(log) <= 6 and scored == sum(len(call) for call in log)
    sequential_log = _needs([("a", i) for i in range(1, 24, 2)])
    greedy_removal(blocked, [NeuronSet({"a": [i]}) for i in range(24)], 0.5, sequential_log[0], batch=1)
    assert len(sequential_log[1]) == 24


def test_tie_margin_keeps_a_part_whose_removal_stays_within_it():
    """Fallback ties: removing a0 lowers the score by 2e-7 (float noise), a1 by 1e-3, a2 raises it."""
    effect = {0: -2e-7, 1: -1e-3, 2: +1e-2}
    threshold = 0.9

    def score(sets):
        return [threshold + sum(d for i, d in effect.items() if i not in s["a"]) for s in sets]

    parts = [NeuronSet({"a": [i]}) for i in range(3)]
    paper, _ = greedy_removal(NeuronSet({"a": [0, 1, 2]}), parts, threshold, score, batch=1)
    assert paper == NeuronSet({"a": [2]})  # strict <: the 2e-7 tie is dropped too
    for batch in (1, 4):
        margin, _ = greedy_removal(NeuronSet({"a": [0, 1, 2]}), parts, threshold, score, batch=batch, margin=1e-5)
        assert margin == NeuronSet({"a": [0, 2]})  # 0.9 - 2e-7 is not below 0.9 - 1e-5: a0 stays
    with pytest.raises(WorkbenchError, match="tie_margin"):
        NemoLocalizationConfig(tie_margin=-1e-5)


def test_greedy_removal_skips_parts_already_gone():
    score, log = _needs([])
    remaining, scored = greedy_removal(NeuronSet({"a": [0]}), [NeuronSet({"a": [0]}), NeuronSet({"a": [0]})],
                                       0.5, score, batch=2)
    assert remaining == NeuronSet() and scored == 2 and len(log) == 1


# ---- on tiny models --------------------------------------------------------------------------------------


def test_official_sites_are_the_first_block_values_of_down_and_mid(unet_model):
    sites = nemo_sites(unet_model, "official")
    assert sites and all((s.block.startswith("down") or s.block == "mid") for s in sites)
    assert all(".transformer_blocks.0.attn2.to_v" in s.path for s in sites)
    assert len(nemo_sites(unet_model, "all_value")) > len(sites)


def test_named_blocks_select_their_value_sites_in_execution_order(unet_model):
    every = nemo_sites(unet_model, "all_value")
    blocks = sorted({s.block for s in every})
    first, last = blocks[0], blocks[-1]
    chosen = nemo_sites(unet_model, f"{last}, {first}")
    assert chosen == [s for s in every if s.block in (first, last)]
    assert {s.block for s in chosen} == {first, last}
    with pytest.raises(WorkbenchError, match="no value site in block 'down.9'; use official, all_value or blocks"):
        nemo_sites(unet_model, "down.9")
    assert NemoLocalizationConfig(sites=f" {first} , {last}").sites == f"{first},{last}"


def test_a_named_block_selects_its_value_sites_in_every_family(tiny_model):
    every = nemo_sites(tiny_model, "all_value")
    first = every[0].block
    assert nemo_sites(tiny_model, first) == [s for s in every if s.block == first]
    assert len(nemo_sites(tiny_model, first)) < len(every)


def test_value_activations_equal_the_outputs_inside_a_denoiser_forward(tiny_model):
    from localization.detection import first_timesteps, initial_latents
    from workbench.intervene import record
    from workbench.sampling import predict

    sites = nemo_sites(tiny_model, "all_value")
    config = NemoLocalizationConfig(sites="all_value")
    prompts = ["a red circle", "a blue square"]
    fast = value_activations(tiny_model, prompts, sites, config)
    assert all(fast[s.path].shape == (2, s.out_features) for s in sites)
    timestep, _ = first_timesteps(tiny_model, config.detection)
    latents = initial_latents(tiny_model, config.detection)[:1]
    for k, prompt in enumerate(prompts):
        with record(tiny_model, sites) as rec:  # batch 1: the recorded mean is the token mean
            predict(tiny_model, latents, timestep, [prompt], guidance_scale=1.0)
        for site in sites:
            assert torch.allclose(fast[site.path][k], rec.stats[site.path].mean, atol=1e-5), site.path
    absolute = value_activations(tiny_model, prompts, sites, NemoLocalizationConfig(sites="all_value",
                                                                                    token_mean="abs"))
    assert all((absolute[s.path] >= fast[s.path].abs() - 1e-9).all() for s in sites)


def test_scorer_is_one_unblocked_and_batched_scores_equal_single_ones(unet_model):
    config = NemoLocalizationConfig(detection=NemoConfig(n_seeds=3, steps=5))
    scorer = MemorizationScorer(unet_model, "a red circle", (0, 2), config)
    sites = nemo_sites(unet_model)
    everything = NeuronSet({s.path: range(s.out_features) for s in sites})
    sets = [NeuronSet(), everything, NeuronSet({sites[0].path: [0, 1]})]
    together = scorer(sets)
    alone = [scorer([s])[0] for s in sets]
    assert together == pytest.approx(alone, abs=1e-5)
    assert together[0] == pytest.approx(1.0, abs=1e-5) and together[1] < together[0] - 1e-3


def test_consistency_search_score_is_the_detectors_score_of_the_blocked_model(unet_model):
    from localization.detection import nemo_scores
    from workbench.intervene import ablate

    config = NemoLocalizationConfig(detection=NemoConfig(n_seeds=3, steps=5), search_score="consistency")
    scorer = MemorizationScorer(unet_model, "a red circle", (1,), config)
    sites = nemo_sites(unet_model)
    some = NeuronSet({sites[0].path: [0, 1, 2], sites[-1].path: [3]})
    expected = []
    for blocked in (NeuronSet(), some):
        with ablate(unet_model, blocked):
            expected.append(nemo_scores(unet_model, ["a red circle"], config.detection)[0].score)
    assert scorer([NeuronSet(), some]) == pytest.approx(expected, abs=1e-5)
    assert expected[0] != pytest.approx(expected[1], abs=1e-4)  # the blocked set changes the score
    with pytest.raises(WorkbenchError, match="search score"):
        NemoLocalizationConfig(search_score="sideways")


def test_localize_prompt_returns_a_refined_subset(unet_model):
    config = NemoLocalizationConfig(detection=NemoConfig(n_seeds=3, steps=5))
    holdout = holdout_statistics(unet_model, ["a blue square", "a green tree", "a cat"], config)
    result = localize_prompt(unet_model, "a red circle", holdout, threshold=0.0, config=config)
    assert result.memorized and set(result.refined) <= set(result.initial)
    assert result.forwards > 1 and result.to_json()["count"] == len(result.refined)
    nothing = localize_prompt(unet_model, "a red circle", holdout, threshold=1.0, config=config)
    assert not nothing.memorized and len(nothing.refined) == 0


def test_bad_nemo_settings_fail_in_one_line(unet_model):
    with pytest.raises(WorkbenchError, match="site set"):
        NemoLocalizationConfig(sites="down.1,")
    with pytest.raises(WorkbenchError, match="no value site in block 'keys'"):
        nemo_sites(unet_model, NemoLocalizationConfig(sites="keys").sites)
    with pytest.raises(WorkbenchError, match="need prompts"):
        holdout_statistics(unet_model, [])
    from localization.localize import localize
    with pytest.raises(WorkbenchError, match="at least 2 holdout prompts"):
        localize(unet_model, "nemo", ["a red circle"], holdout=["a cat"])
    legacy = NemoLocalizationConfig(legacy=True)
    assert (legacy.top_k_on, legacy.token_mean, legacy.detection.timestep_index) == ("raw", "abs", 1)


def test_mean_deactivation_scores_sets_at_their_holdout_mean(unet_model):
    from localization.nemo import deactivation_baseline

    config = NemoLocalizationConfig(detection=NemoConfig(n_seeds=3, steps=5), deactivation="mean")
    holdout = holdout_statistics(unet_model, ["a blue square", "a green tree", "a cat"], config)
    baseline = deactivation_baseline(config, holdout)
    assert set(baseline) == set(holdout) and all(torch.equal(baseline[p], holdout[p].mean) for p in holdout)
    assert deactivation_baseline(NemoLocalizationConfig(), holdout) is None
    sites = nemo_sites(unet_model)
    everything = NeuronSet({s.path: range(s.out_features) for s in sites})
    zeros = {path: torch.zeros_like(values) for path, values in baseline.items()}
    scores = [MemorizationScorer(unet_model, "a red circle", (0, 2), config, b)([everything])[0]
              for b in (baseline, zeros, None)]
    assert scores[1] == pytest.approx(scores[2], abs=1e-6)  # a zero baseline is zero-ablation
    assert abs(scores[0] - scores[2]) > 1e-3  # the holdout mean is not
    mean_scorer = MemorizationScorer(unet_model, "a red circle", (0, 2), config, baseline)
    assert mean_scorer([NeuronSet()])[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(WorkbenchError, match="signed token mean"):
        NemoLocalizationConfig(deactivation="mean", legacy=True)
    with pytest.raises(WorkbenchError, match="deactivation"):
        NemoLocalizationConfig(deactivation="half")


def test_a_mean_deactivated_localization_keeps_its_baseline_and_applies_it(unet_model, tmp_path):
    from localization.localize import Localization, localize
    from workbench import intervene
    from workbench.sampling import generate

    holdout = ["a blue square", "a green tree", "a cat"]
    config = NemoLocalizationConfig(detection=NemoConfig(n_seeds=3, steps=5), deactivation="mean")
    result = localize(unet_model, "nemo", ["a red circle"], config=config, holdout=holdout, threshold=0.0)
    means = holdout_statistics(unet_model, holdout, config)
    assert result.config["deactivation"] == "mean"
    assert set(result.extra["baseline"]) == set(means)
    assert all(torch.equal(torch.tensor(result.extra["baseline"][p], dtype=torch.float64), means[p].mean)
               for p in means)
    result.save(tmp_path / "loc.json")
    again = Localization.load(tmp_path / "loc.json")
    site = nemo_sites(unet_model)[0]
    pinned = NeuronSet({site.path: [2, 7]})
    with again.deactivate(unet_model, pinned):
        with intervene.record(unet_model, [site]) as rec:
            generate(unet_model, ["a red circle"], steps=2, guidance_scale=3.0)
    torch.testing.assert_close(rec.stats[site.path].mean[[2, 7]], means[site.path].mean[[2, 7]], rtol=0, atol=1e-6)
    zero = Localization("nemo", [{"neurons": pinned.to_json()["neurons"]}], {}, {})
    with zero.deactivate(unet_model):
        with intervene.record(unet_model, [site]) as rec_zero:
            generate(unet_model, ["a red circle"], steps=2, guidance_scale=3.0)
    assert rec_zero.stats[site.path].mean_abs[[2, 7]].max() == 0


# ---- entry point, aggregation, CLI -----------------------------------------------------------------------


def test_localization_round_trips_and_is_written_onto_the_graph(unet_model, tmp_path):
    from localization.aggregate import most_frequent, random_like
    from localization.localize import Localization, localize

    config = NemoLocalizationConfig(detection=NemoConfig(n_seeds=3, steps=5))
    result = localize(unet_model, "nemo", ["a red circle", "a red square"], config=config,
                      holdout=["a blue square", "a green tree", "a cat"], threshold=0.0)
    assert [r["prompt"] for r in result.results] == ["a red circle", "a red square"]
    assert result.provenance["model_tensor_sha256"] and result.provenance["threshold"] == 0.0
    result.save(tmp_path / "loc.json")
    again = Localization.load(tmp_path / "loc.json")
    assert again.to_json() == result.to_json() and again.neurons == result.neurons
    again.check_model(unet_model)
    graph = unet_model.graph.__class__.from_json(unet_model.graph.to_json())
    result.write_onto(graph)
    assert graph.neurons("nemo_prompts") == result.neurons
    counts = result.frequency()
    assert all(graph.neuron_attrs(s, i)["nemo_prompts"] == counts[(s, i)] for s, i in result.neurons)
    top = most_frequent(result, 2)
    assert len(top) == min(2, len(result.neurons)) and set(top) <= set(result.neurons)
    control = random_like(result.neurons, unet_model.graph, seed=1)
    assert [len(control[s]) for s in result.neurons.sites] == [len(result.neurons[s]) for s in result.neurons.sites]


def test_frequency_counts_prompts_per_neuron():
    from localization.aggregate import most_frequent
    from localization.localize import Localization

    results = [{"neurons": {"a": [1, 2]}}, {"neurons": {"a": [2], "b": [0]}}, {"neurons": {"a": [2], "b": [0]}}]
    loc = Localization("nemo", results, {}, {})
    assert loc.frequency() == {("a", 2): 3, ("b", 0): 2, ("a", 1): 1}
    assert most_frequent(loc, 1) == NeuronSet({"a": [2]})
    assert most_frequent(loc, 2) == NeuronSet({"a": [2], "b": [0]})
    assert most_frequent(loc, 1, per_layer=True) == NeuronSet({"a": [2], "b": [0]})


def test_cli_localize_nemo_json(tiny_folders, tmp_path):
    import json

    from typer.testing import CliRunner

    from workbench.cli import app

    prompts, holdout = tmp_path / "p.txt", tmp_path / "h.txt"
    prompts.write_text("a red circle\n")
    holdout.write_text("a blue square\na green tree\na cat\n")
    result = CliRunner().invoke(app, ["localize", "nemo", str(tiny_folders["unet"]), "--prompts", str(prompts),
                                      "--holdout", str(holdout), "--threshold", "0", "--seeds", "3", "--out",
                                      str(tmp_path / "loc.json"), "--graph", str(tmp_path / "g.json"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    entry = data["results"][0]
    assert entry["prompt"] == "a red circle" and isinstance(entry["neurons"], dict)
    assert all(site.endswith("attn2.to_v") for site in entry["neurons"])
    assert (tmp_path / "loc.json").is_file() and (tmp_path / "g.json").is_file()
    mean = CliRunner().invoke(app, ["localize", "nemo", str(tiny_folders["unet"]), "--prompts", str(prompts),
                                    "--holdout", str(holdout), "--threshold", "0", "--seeds", "3",
                                    "--deactivation", "mean", "--json"])
    assert mean.exit_code == 0, mean.output
    data = json.loads(mean.stdout)
    assert data["config"]["deactivation"] == "mean" and set(data["results"][0]["neurons"]) <= set(data["baseline"])
    assert data["baseline"] and all(site.endswith("attn2.to_v") for site in data["baseline"])
    bad = CliRunner().invoke(app, ["localize", "nemo", str(tiny_folders["unet"]), "--prompts", str(prompts),
                                   "--holdout", str(holdout), "--deactivation", "mean", "--legacy"])
    assert bad.exit_code != 0 and "signed token mean" in bad.output + bad.stderr
    again = CliRunner().invoke(app, ["localize", "nemo", str(tiny_folders["unet"]), "--prompts", str(prompts),
                                     "--holdout", str(holdout), "--out", str(tmp_path / "loc.json")])
    assert again.exit_code == 2 and "exists" in again.stderr


@pytest.mark.parametrize("seed", range(6))
def test_batched_refinement_equals_sequential_on_random_cases(seed):
    generator = torch.Generator().manual_seed(seed)
    sites = ["a", "b", "c"]
    blocked = NeuronSet({s: torch.randperm(12, generator=generator)[:8].tolist() for s in sites})
    pairs = list(blocked)
    required = [pairs[i] for i in torch.randperm(len(pairs), generator=generator)[:4].tolist()]
    sequential, _ = refine(blocked, sites, 0.5, _needs(required)[0], batch=1)
    for batch in (2, 5, 16):
        assert refine(blocked, sites, 0.5, _needs(required)[0], batch=batch)[0] == sequential
    assert set(sequential) == set(required)  # every unneeded neuron goes, every needed one stays


# ---- image check on the stop rule (ours) -------------------------------------------------------------------


def test_image_check_offsets_sets_that_keep_the_image_and_generates_only_under_the_threshold(unet_model):
    from localization.nemo_image import IMAGE_KEPT_OFFSET, ImageCheck, ImageCheckedScorer

    sites = nemo_sites(unet_model, "all_value")
    everything = NeuronSet({s.path: range(s.out_features) for s in sites})
    some = NeuronSet({sites[0].path: [0]})
    probe = ImageCheckedScorer(unet_model, "a red circle", lambda sets: [0.0] * len(sets), 0.5,
                               ImageCheck(seeds=2, steps=2), rows_per_call=8)
    unblocked, blocked = probe.image_ssim([NeuronSet(), everything])
    assert unblocked == pytest.approx(1.0) and blocked < 0.999  # the reference is the un-blocked generation
    base = {0: 0.1, len(everything): 0.2, 1: 0.9}  # by set size: empty, everything, one neuron
    check = ImageCheck(max_ssim=(1 + blocked) / 2, seeds=2, steps=2)
    scorer = ImageCheckedScorer(unet_model, "a red circle", lambda sets: [base[len(s)] for s in sets], 0.5, check,
                                rows_per_call=8)
    assert scorer([NeuronSet(), everything, some]) == pytest.approx([0.1 + IMAGE_KEPT_OFFSET, 0.2,
                                                                      0.9 + IMAGE_KEPT_OFFSET])
    assert scorer.images_generated == 2 + 2 * 2  # the reference, then only the two sets under the threshold
    with pytest.raises(WorkbenchError, match="SSIM bound"):
        ImageCheck(max_ssim=1.5)


def test_refinement_with_an_image_check_keeps_what_the_image_needs(unet_model):
    from localization.nemo_image import ImageCheck, ImageCheckedScorer

    sites = nemo_sites(unet_model, "all_value")
    order = [s.path for s in sites]
    start = NeuronSet({sites[1].path: range(8), sites[4].path: range(8)})
    always_under = lambda sets: [0.1] * len(sets)  # noqa: E731 - a score that never objects
    probe = ImageCheckedScorer(unet_model, "a red circle", always_under, 0.5, ImageCheck(seeds=2, steps=2), 8)
    bound = (1 + probe.image_ssim([start])[0]) / 2
    checked = ImageCheckedScorer(unet_model, "a red circle", always_under, 0.5,
                                 ImageCheck(max_ssim=bound, seeds=2, steps=2), 8)
    kept, _ = refine(start, order, 0.5, checked)
    assert 0 < len(kept) < len(start) and set(kept) <= set(start)
    assert probe.image_ssim([kept])[0] < bound
    assert len(refine(start, order, 0.5, always_under)[0]) == 0  # the score alone lets every neuron go


def test_cli_localize_nemo_with_an_image_check(tiny_folders, tmp_path):
    import json

    from typer.testing import CliRunner

    from workbench.cli import app

    prompts, holdout = tmp_path / "p.txt", tmp_path / "h.txt"
    prompts.write_text("a red circle\n")
    holdout.write_text("a blue square\na green tree\na cat\n")
    common = ["localize", "nemo", str(tiny_folders["unet"]), "--prompts", str(prompts), "--holdout", str(holdout),
              "--threshold", "0", "--seeds", "3", "--image-seeds", "1", "--image-steps", "1"]
    result = CliRunner().invoke(app, common + ["--image-check", "0.9", "--out", str(tmp_path / "loc.json")])
    assert result.exit_code == 0, result.output
    assert "image" in result.stdout  # the summary table's image SSIM column
    data = json.loads((tmp_path / "loc.json").read_text())
    assert data["config"]["image_check"] == {"max_ssim": 0.9, "seeds": 1, "seed": 100, "steps": 1,
                                             "guidance_scale": None}
    entry = data["results"][0]
    assert 0 <= entry["refined_image_ssim"] <= 1 and entry["images_generated"] >= 2
    bad = CliRunner().invoke(app, common + ["--image-check", "0"])
    assert bad.exit_code != 0 and "SSIM bound" in bad.output


def test_a_failed_initial_selection_with_an_image_check_also_holds_the_initial_sets_image(unet_model):
    from dataclasses import replace

    from localization.nemo_image import ImageCheck, ImageCheckedScorer

    short = SelectionSchedule(initial_theta=2.5, theta_step=0.5, min_theta=1.5)  # a small last set: a quick test
    config = NemoLocalizationConfig(detection=NemoConfig(n_seeds=3, steps=5), schedule=short)
    holdout = holdout_statistics(unet_model, ["a blue square", "a green tree", "a cat"], config)
    plain = localize_prompt(unet_model, "a red circle", holdout, threshold=0.0, config=config)
    assert plain.memorized and not plain.initial_success  # no set scores 0: NeMo holds the last score
    probe = ImageCheckedScorer(unet_model, "a red circle", lambda sets: [0.0] * len(sets), 0.5,
                               ImageCheck(seeds=2, steps=2), 8)
    initial_ssim, plain_ssim = probe.image_ssim([plain.initial, plain.refined])
    assert initial_ssim < plain_ssim  # the paper's refinement gave some of the image back
    bound = (initial_ssim + plain_ssim) / 2
    checked = localize_prompt(unet_model, "a red circle", holdout, threshold=0.0,
                              config=replace(config, image_check=ImageCheck(max_ssim=bound, seeds=2, steps=2)))
    assert checked.initial == plain.initial and set(checked.refined) <= set(checked.initial)
    assert checked.refined_image_ssim < bound and checked.refined_score < plain.initial_score
    assert checked.refined_image_ssim == pytest.approx(probe.image_ssim([checked.refined])[0], abs=1e-6)
    strict = replace(config, image_check=ImageCheck(max_ssim=initial_ssim / 2, seeds=2, steps=2))
    kept_image = localize_prompt(unet_model, "a red circle", holdout, threshold=0.0, config=strict)
    assert kept_image.refined == plain.refined  # the last set keeps its image: the paper's refinement
    assert kept_image.images_generated == 3 * 2  # the reference, the last set's test and the result's
