"""The intervention layer on all three families: what a real bug in a hook would break."""

import pytest
import torch

from workbench import intervene, sampling
from workbench.errors import WorkbenchError
from workbench.neurons import NeuronSet

PROMPTS = ["a red circle", "a photo of a cat"]
TEXT_VALUE_ROLES = ["cross_attn_value", "context_value"]


def _latents(model, n=2, seed=0):
    side = model.denoiser.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.denoiser.config.in_channels, side, side, generator=generator)


def _predict(model, latents=None, prompts=PROMPTS, guidance=3.0):
    latents = _latents(model, len(prompts)) if latents is None else latents
    return sampling.predict(model, latents, 500, prompts, guidance_scale=guidance)


def _value_neurons(model, count=8):
    """The first `count` neurons of every text-value site."""
    return NeuronSet({s.path: range(count) for s in model.graph.select(roles=TEXT_VALUE_ROLES)})


def test_ablating_a_set_changes_output_and_empty_set_does_not(tiny_model):
    base = _predict(tiny_model)
    with intervene.ablate(tiny_model, _value_neurons(tiny_model)):
        ablated = _predict(tiny_model)
    with intervene.ablate(tiny_model, NeuronSet()):
        empty = _predict(tiny_model)
    assert (ablated - base).abs().max() > 1e-3
    assert torch.equal(empty, base)
    assert torch.equal(_predict(tiny_model), base), "hooks must be removed when the block exits"


def test_hook_ablation_equals_zeroing_weight_rows_and_bias(tiny_model):
    # PixArt's value projections have a bias: equality holds only if the bias entry is zeroed too
    neurons = _value_neurons(tiny_model, 5) | NeuronSet({tiny_model.graph.select(roles=["ffn_out"])[0].path: [0, 3]})
    with intervene.ablate(tiny_model, neurons):
        by_hook = _predict(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.denoiser.state_dict().items()}
    with intervene.ablate_weights(tiny_model, neurons):
        by_weights = _predict(tiny_model)
        module = tiny_model.module(neurons.sites[0])
        assert module.weight[list(neurons[neurons.sites[0]])].abs().sum() == 0
    torch.testing.assert_close(by_weights, by_hook, rtol=0, atol=1e-6)
    after = tiny_model.denoiser.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights must be restored"


def test_manual_weight_edit_equals_hook_ablation_on_a_biased_linear(unet_model):
    """Independent of ablate_weights: zero row i and bias i by hand on the U-Net's ffn_out (has bias)."""
    site = unet_model.graph.select(roles=["ffn_out"])[0]
    assert site.bias
    neurons = NeuronSet({site.path: [1, 7]})
    with intervene.ablate(unet_model, neurons):
        by_hook = _predict(unet_model)
    module = unet_model.module(site.path)
    weight, bias = module.weight.data.clone(), module.bias.data.clone()
    try:
        module.weight.data[[1, 7]] = 0
        module.bias.data[[1, 7]] = 0
        by_hand = _predict(unet_model)
    finally:
        module.weight.data.copy_(weight)
        module.bias.data.copy_(bias)
    torch.testing.assert_close(by_hand, by_hook, rtol=0, atol=1e-6)


def test_scale_one_is_identity_and_scale_zero_is_ablation(tiny_model):
    neurons = _value_neurons(tiny_model)
    base = _predict(tiny_model)
    with intervene.scale(tiny_model, neurons, 1.0):
        assert torch.equal(_predict(tiny_model), base)
    with intervene.scale(tiny_model, neurons, 0.0):
        scaled = _predict(tiny_model)
    with intervene.ablate(tiny_model, neurons):
        assert torch.equal(_predict(tiny_model), scaled)
    with intervene.scale(tiny_model, neurons, 2.0):
        assert not torch.allclose(_predict(tiny_model), base)


def test_per_sample_masks_equal_separate_runs(tiny_model):
    sites = tiny_model.graph.select(roles=TEXT_VALUE_ROLES)
    first = NeuronSet({sites[0].path: range(6)})
    second = NeuronSet({sites[-1].path: [0, 2, 4]}) | NeuronSet({sites[0].path: [1]})
    prompts = ["a red circle", "a red circle", "a photo of a cat"]
    latents = _latents(tiny_model, 3)
    with intervene.ablate_per_sample(tiny_model, [first, second, NeuronSet()]):
        batched = _predict(tiny_model, latents, prompts)
    for i, neurons in enumerate([first, second, NeuronSet()]):
        with intervene.ablate(tiny_model, neurons):
            alone = _predict(tiny_model, latents[i:i + 1], prompts[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_ablate_to_baseline_pins_the_neurons_and_per_sample_matches_it(tiny_model):
    sites = tiny_model.graph.select(roles=TEXT_VALUE_ROLES)
    baseline = {s.path: torch.linspace(-1.0, 1.0, s.out_features) for s in sites}
    first = NeuronSet({sites[0].path: [1, 4]})
    second = NeuronSet({sites[-1].path: [0, 3]})
    with intervene.ablate_to(tiny_model, first, baseline):
        with intervene.record(tiny_model, [sites[0]]) as rec:
            _predict(tiny_model)
    stats = rec.stats[sites[0].path]
    torch.testing.assert_close(stats.mean[[1, 4]], baseline[sites[0].path][[1, 4]].double(), rtol=0, atol=1e-6)
    assert stats.m2[[1, 4]].abs().max() < 1e-8 and stats.m2[[0, 2]].min() > 1e-6  # only the set is pinned
    prompts = ["a red circle", "a photo of a cat", "a red circle"]
    latents = _latents(tiny_model, 3)
    with intervene.ablate_per_sample(tiny_model, [first, second, NeuronSet()], baseline=baseline):
        batched = _predict(tiny_model, latents, prompts)
    for i, neurons in enumerate([first, second, NeuronSet()]):
        with intervene.ablate_to(tiny_model, neurons, baseline):
            alone = _predict(tiny_model, latents[i:i + 1], prompts[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-5)
    with intervene.ablate(tiny_model, first):
        zeroed = _predict(tiny_model, latents[:1], prompts[:1])
    assert not torch.allclose(batched[:1], zeroed)  # a baseline is not zero-ablation
    zeros = {path: torch.zeros_like(b) for path, b in baseline.items()}
    with intervene.ablate_per_sample(tiny_model, [first], 0.5, baseline=zeros):
        halfway = _predict(tiny_model, latents[:1], prompts[:1])
    with intervene.scale(tiny_model, first, 0.5):
        scaled = _predict(tiny_model, latents[:1], prompts[:1])
    torch.testing.assert_close(halfway, scaled, rtol=1e-4, atol=1e-5)


def test_baseline_needs_one_finite_value_per_neuron(tiny_model):
    site = tiny_model.graph.select(roles=TEXT_VALUE_ROLES)[0]
    neurons = NeuronSet({site.path: [0]})
    for baseline, match in (({}, "no baseline for site"), ({site.path: torch.zeros(3)}, "finite values"),
                            ({site.path: torch.full((site.out_features,), float("nan"))}, "finite values")):
        with pytest.raises(WorkbenchError, match=match):
            intervene.ablate_to(tiny_model, neurons, baseline)
        with pytest.raises(WorkbenchError, match=match):
            intervene.ablate_per_sample(tiny_model, [neurons], baseline=baseline)


def test_per_sample_mask_count_must_match_batch(unet_model):
    neurons = _value_neurons(unet_model, 2)
    with intervene.ablate_per_sample(unet_model, [neurons, neurons, NeuronSet()]):
        with pytest.raises(WorkbenchError, match="one neuron set per prompt"):
            _predict(unet_model)


def test_patch_with_recorded_mean_equals_constant_replacement(unet_model):
    site = unet_model.graph.select(roles=["cross_attn_value"])[2]
    neurons = NeuronSet({site.path: [0, 5]})
    values = torch.tensor([0.25, -1.5])
    seen = []
    with intervene.patch(unet_model, neurons, {site.path: values}):
        with intervene.record(unet_model, [site]) as rec:  # inner hooks see the patched output
            patched = _predict(unet_model)
    stats = rec.stats[site.path]
    torch.testing.assert_close(stats.mean[[0, 5]], values.double(), rtol=0, atol=1e-7)
    assert stats.m2[[0, 5]].abs().max() < 1e-10
    with intervene.patch(unet_model, neurons, {site.path: lambda selected, call: seen.append(call) or selected}):
        untouched = _predict(unet_model)
    assert seen == [0] and torch.equal(untouched, _predict(unet_model))
    assert not torch.allclose(patched, untouched)


def test_patch_needs_a_value_per_site(unet_model):
    site = unet_model.graph.select(roles=["cross_attn_value"])[0]
    with pytest.raises(WorkbenchError, match="no patch value"):
        intervene.patch(unet_model, NeuronSet({site.path: [0]}), {})


def test_record_counts_tokens_branches_and_steps(unet_model):
    site = unet_model.graph.select(roles=["cross_attn_value"])[0]
    tokens = unet_model.pipeline.tokenizer.model_max_length
    with intervene.record(unet_model, [site], per_step=True) as both:
        sampling.generate(unet_model, PROMPTS, steps=3, guidance_scale=3.0)
    with intervene.record(unet_model, [site], branch="cond", steps=[1]) as cond_step1:
        sampling.generate(unet_model, PROMPTS, steps=3, guidance_scale=3.0)
    assert int(both.stats[site.path].count) == 3 * 2 * len(PROMPTS) * tokens  # steps x CFG halves x prompts x tokens
    assert sorted(both.by_step) == [0, 1, 2]
    assert int(cond_step1.stats[site.path].count) == len(PROMPTS) * tokens
    # the conditional half of step 1 is a part of everything recorded at step 1: same max or smaller
    assert (cond_step1.stats[site.path].max <= both.by_step[1][site.path].max).all()
    # the per-step statistics merge back to the pooled ones
    merged = both.by_step[0][site.path].merge(both.by_step[1][site.path]).merge(both.by_step[2][site.path])
    torch.testing.assert_close(merged.mean, both.stats[site.path].mean, rtol=1e-12, atol=1e-12)


def test_record_by_branch_matches_manual_split(unet_model):
    """Recording the cond branch equals statistics of the second half of the CFG batch."""
    site = unet_model.graph.select(roles=["cross_attn_value"])[1]
    captured = []
    handle = unet_model.module(site.path).register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    try:
        with intervene.record(unet_model, [site], branch="cond") as cond, \
                intervene.record(unet_model, [site], branch="uncond") as uncond:
            _predict(unet_model)
    finally:
        handle.remove()
    (output,) = captured
    half = output.shape[0] // 2
    torch.testing.assert_close(cond.stats[site.path].mean, output[half:].double().mean(dim=(0, 1)))
    torch.testing.assert_close(uncond.stats[site.path].mean, output[:half].double().mean(dim=(0, 1)))


def test_branch_selection_without_a_known_layout_is_an_error(unet_model):
    site = unet_model.graph.select(roles=["cross_attn_value"])[0]
    latents = _latents(unet_model, 1)
    text = torch.zeros(1, 4, site.in_features)
    with intervene.record(unet_model, [site], branch="cond"):
        with pytest.raises(WorkbenchError, match="CFG layout"):
            unet_model.denoiser(latents, 10, encoder_hidden_states=text)


def test_ablating_only_the_conditional_branch(unet_model):
    neurons = _value_neurons(unet_model)
    base = _predict(unet_model)
    with intervene.ablate(unet_model, neurons, branch="uncond"):
        uncond_only = _predict(unet_model)
    with intervene.ablate(unet_model, neurons, branch="cond"):
        cond_only = _predict(unet_model)
    with intervene.ablate(unet_model, neurons):
        both = _predict(unet_model)
    for changed in (uncond_only, cond_only, both):
        assert not torch.allclose(changed, base)
    assert not torch.allclose(uncond_only, cond_only)


def test_step_selection_ablates_only_chosen_steps(unet_model):
    neurons = _value_neurons(unet_model)
    base = sampling.generate(unet_model, PROMPTS[:1], steps=3)
    with intervene.ablate(unet_model, neurons, steps=[5]):  # no such step: nothing changes
        assert torch.equal(sampling.generate(unet_model, PROMPTS[:1], steps=3), base)
    with intervene.ablate(unet_model, neurons, steps=[2]):
        last = sampling.generate(unet_model, PROMPTS[:1], steps=3)
    with intervene.ablate(unet_model, neurons):
        every = sampling.generate(unet_model, PROMPTS[:1], steps=3)
    assert not torch.equal(last, base)
    assert (last - base).abs().mean() < (every - base).abs().mean()


def test_out_of_range_neurons_are_rejected_before_any_hook(unet_model):
    site = unet_model.graph.select(roles=["cross_attn_value"])[0]
    with pytest.raises(WorkbenchError, match=r"out of range.*\[0, "):
        intervene.ablate(unet_model, NeuronSet({site.path: [site.out_features]}))
    with pytest.raises(WorkbenchError, match="unknown site"):
        intervene.ablate(unet_model, NeuronSet({"down_blocks.9.nothing": [0]}))


def test_nnsight_ablation_equals_hook_ablation(unet_model):
    """The user-facing nnsight API and the hook path agree (to_v has no bias in SD)."""
    sites = unet_model.graph.select(roles=["cross_attn_value"])[:3]
    neurons = NeuronSet({s.path: [0, 1, 2] for s in sites})
    latents = _latents(unet_model, 2)
    cond = sampling.encode(unet_model, PROMPTS, cfg=False)
    text = cond.kwargs["encoder_hidden_states"]
    traced = unet_model.tracer()
    with torch.no_grad():
        with traced.trace(latents, 500, encoder_hidden_states=text):
            for site in sites:  # graph order is execution order, as nnsight requires
                traced.get(site.path).output[..., [0, 1, 2]] = 0
            result = traced.output.save()
    with intervene.ablate(unet_model, neurons):
        by_hook = unet_model.denoiser(latents, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(result.sample, by_hook, rtol=0, atol=1e-6)



def test_nnsight_pipeline_trace_equals_hook_ablation(unet_model):
    """Tracing the whole denoising loop with nnsight edits every step like `intervene.ablate`."""
    site = unet_model.graph.select(roles=["cross_attn_value"])[0]
    traced = unet_model.pipeline_tracer()
    with torch.no_grad():
        with traced.trace(prompt=PROMPTS[:1], num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                          generator=[torch.Generator().manual_seed(0)]) as tracer:
            for step in tracer.iter[0:2]:
                traced.get(f"unet.{site.path}").output[..., :4] = 0
            result = traced.output.save()
    with intervene.ablate(unet_model, NeuronSet({site.path: range(4)})):
        by_hook = sampling.generate(unet_model, PROMPTS[:1], steps=2, guidance_scale=3.0, seed=0)
    torch.testing.assert_close(result.images, by_hook, rtol=0, atol=1e-6)
    assert not torch.allclose(by_hook, sampling.generate(unet_model, PROMPTS[:1], steps=2, guidance_scale=3.0))


def test_recorded_statistics_equal_one_pass_over_all_activations(unet_model, monkeypatch):
    """Across many calls (queued blocks folded in batches) the statistics equal a single pass."""
    monkeypatch.setattr(intervene.Recording, "FOLD_EVERY", 2)
    site = unet_model.graph.select(roles=["ffn_out"])[1]
    captured = []
    handle = unet_model.module(site.path).register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    try:
        with intervene.record(unet_model, [site]) as rec:
            sampling.generate(unet_model, PROMPTS, steps=5, guidance_scale=3.0)
    finally:
        handle.remove()
    values = torch.cat([c.reshape(-1, site.out_features) for c in captured]).double()
    stats = rec.stats[site.path]
    assert int(stats.count) == values.shape[0] and len(captured) == 5
    torch.testing.assert_close(stats.mean, values.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.variance, values.var(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.mean_abs, values.abs().mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.max, values.amax(0), rtol=0, atol=0)


def test_timestep_selection_equals_step_selection(tiny_model):
    sampling.generate(tiny_model, PROMPTS[:1], steps=3)
    timestep = float(tiny_model.pipeline.scheduler.timesteps[1])
    site = tiny_model.graph.select(roles=TEXT_VALUE_ROLES)[0]
    with intervene.record(tiny_model, [site], timesteps=[timestep]) as by_value, \
            intervene.record(tiny_model, [site], steps=[1]) as by_index:
        sampling.generate(tiny_model, PROMPTS[:1], steps=3)
    assert int(by_value.stats[site.path].count) == int(by_index.stats[site.path].count) > 0
    torch.testing.assert_close(by_value.stats[site.path].mean, by_index.stats[site.path].mean, rtol=0, atol=0)
