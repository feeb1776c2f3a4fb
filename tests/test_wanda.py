"""Wanda / ConceptPrune: masks against hand-computed values, column norms on a real (tiny) model."""

import pytest
import torch

from localization.wanda import (WandaConfig, collect_norms, conceptprune_mask, localize_weights, top_per_row,
                                wanda_mask, wanda_sites)
from workbench.errors import WorkbenchError
from workbench.intervene import mask_weights
from workbench.neurons import WeightMask
from workbench.sampling import generate


def test_top_per_row_picks_k_per_output_row():
    scores = torch.tensor([[1.0, 5, 3, 2], [4, 0, 6, 1]])
    assert top_per_row(scores, 0.5).nonzero().tolist() == [[0, 1], [0, 2], [1, 0], [1, 2]]
    assert top_per_row(scores, 0.5, largest=False).nonzero().tolist() == [[0, 0], [0, 3], [1, 1], [1, 3]]
    assert not top_per_row(scores, 0.2).any()  # int(0.2 · 4) = 0


def test_conceptprune_mask_is_top_k_and_target_over_base_united_over_calls():
    weight = torch.tensor([[1.0, 1, 1, 1], [1, 2, 1, 1]])
    target = torch.tensor([[4.0, 3, 2, 1], [1, 2, 3, 4]])  # two calls
    base = torch.tensor([[5.0, 1, 1, 1], [0, 0, 0, 9]])
    config = WandaConfig(skill_ratio=0.5, calls=2, steps=2)
    # call 0: S = |W|·N → row 0 top-2 {0, 1}, row 1 top-2 {1 (6), 0 (4)}; N_tgt > N_base only for 1, 2, 3
    # call 1: row 0 top-2 {3, 2}, row 1 top-2 {1 (4), 3 (4)} → ties broken by topk; N_tgt > N_base for 0, 1, 2
    mask = conceptprune_mask(weight, target, base, config)
    expected0 = top_per_row(weight * target[0], 0.5) & (target[0] > base[0])
    expected1 = top_per_row(weight * target[1], 0.5) & (target[1] > base[1])
    assert torch.equal(mask, expected0 | expected1)
    assert mask[0].tolist() == [False, True, True, False]
    both = conceptprune_mask(weight, target, base, WandaConfig(skill_ratio=0.5, calls=2, steps=2, select_ratio=0.5))
    assert torch.equal(both, expected0 & expected1)


def test_pure_wanda_prunes_the_lowest_fraction_of_each_row():
    weight = torch.tensor([[1.0, -4, 2, 3]])
    norms = torch.tensor([[3.0, 0, 4, 1]])  # one call: ‖X‖ = (3, 0, 4, 1); S = (3, 0, 8, 3)
    mask = wanda_mask(weight, norms, WandaConfig(mode="wanda", sparsity=0.5))
    assert mask[0, 1] and mask.sum() == 2 and not mask[0, 2]


def test_column_norms_cover_exactly_tau_calls_of_unit_rows(unet_model):
    config = WandaConfig(calls=3, steps=5)
    calls = []
    handle = unet_model.denoiser.register_forward_hook(lambda *a: calls.append(1))  # completed calls
    try:
        norms = collect_norms(unet_model, ["a red circle", "a cat"], config)
    finally:
        handle.remove()
    assert len(calls) == 2 * 3  # sampling stopped after τ calls, per prompt
    for site in wanda_sites(unet_model):
        n = norms[site.path]
        assert n.shape == (3, site.in_features)
        tokens = site.resolution ** 2  # U-Net transformer tokens at this block
        # every row is unit-norm, so Σ_j N_j² = rows = prompts × CFG halves × tokens, per call
        assert torch.allclose(n.square().sum(dim=1), torch.full((3,), 2.0 * 2 * tokens), rtol=1e-4)


def test_value_projection_norms_are_the_texts_own_at_every_call(unet_model):
    """roles=cross_attn_value (the reference's `attn_val`): the inputs are the [uncond; cond] text embeddings."""
    from workbench.sampling import encode

    prompts = ["a red circle", "a cat"]
    config = WandaConfig(calls=2, steps=4, roles=("cross_attn_value",))
    norms = collect_norms(unet_model, prompts, config)
    sites = wanda_sites(unet_model, config.roles)
    assert set(norms) == {s.path for s in sites} and all(s.role == "cross_attn_value" for s in sites)
    squares = sum(torch.nn.functional.normalize(encode(unet_model, [p], cfg=True).kwargs["encoder_hidden_states"]
                                                .flatten(0, 1).float(), dim=1).square().sum(0) for p in prompts)
    for path, n in norms.items():
        assert torch.allclose(n, squares.sqrt().expand_as(n), rtol=1e-5)  # the same at both calls
    mask = localize_weights(unet_model, prompts, WandaConfig(calls=2, steps=4, skill_ratio=0.25, roles=config.roles))
    assert set(mask.sites) == {s.path for s in sites} and mask.count() > 0  # int(0.01 · 32 text dims) = 0 per row


def test_masks_at_defaults_have_the_expected_density(unet_model):
    config = WandaConfig(calls=2, steps=4, skill_ratio=0.25)
    mask = localize_weights(unet_model, ["a red circle"], config)
    sites = wanda_sites(unet_model)
    assert set(mask.sites) == {s.path for s in sites}
    assert 0 < mask.density() <= 2 * 0.25  # at most τ × skill_ratio of each row
    pure = localize_weights(unet_model, ["a red circle"], WandaConfig(mode="wanda", calls=2, steps=4))
    assert pure.density() == pytest.approx(sum(int(0.5 * s.in_features) * s.out_features for s in sites)
                                           / sum(s.in_features * s.out_features for s in sites))


def test_masked_weights_change_the_output_and_are_restored(unet_model):
    site = wanda_sites(unet_model)[0]
    weight = unet_model.module(site.path).weight
    before = weight.detach().clone()
    mask = WeightMask({site.path: torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5})
    plain = generate(unet_model, ["a red circle"], seed=0, steps=2)
    with mask_weights(unet_model, mask):
        assert (weight[mask[site.path]] == 0).all()
        pruned = generate(unet_model, ["a red circle"], seed=0, steps=2)
    assert torch.equal(weight, before) and not torch.equal(plain, pruned)


def test_bad_wanda_settings_fail_in_one_line(unet_model):
    for build, match in ((lambda: WandaConfig(mode="sparsegpt"), "unknown Wanda mode"),
                         (lambda: WandaConfig(skill_ratio=0), "skill_ratio"),
                         (lambda: WandaConfig(calls=60), "calls"),
                         (lambda: WandaConfig(roles=("attn_val",)), "unknown role 'attn_val'"),
                         (lambda: WandaConfig(roles=()), "at least one role"),
                         (lambda: wanda_sites(unet_model, ("context_value",)), "no Linear sites of role context_value"),
                         (lambda: collect_norms(unet_model, [], WandaConfig()), "at least one prompt")):
        with pytest.raises(WorkbenchError, match=match):
            build()


def test_wanda_localization_saves_its_mask_beside_the_json(unet_model, tmp_path):
    from localization.localize import Localization, localize

    config = WandaConfig(calls=2, steps=4, skill_ratio=0.25)
    result = localize(unet_model, "wanda", ["a red circle", "a cat"], config=config)
    assert result.mask is not None and result.extra["density"] == result.mask.density()
    assert result.mask == localize_weights(unet_model, ["a red circle", "a cat"], config)
    result.save(tmp_path / "w.json")
    assert (tmp_path / "w.mask.safetensors").is_file()
    again = Localization.load(tmp_path / "w.json")
    assert again.mask == result.mask and again.config["skill_ratio"] == 0.25
    assert "base_sha256" in result.provenance  # ConceptPrune compares against base prompts
    pure = localize(unet_model, "wanda", ["a red circle"], config=WandaConfig(mode="wanda", calls=2, steps=4))
    assert "base_sha256" not in pure.provenance  # pure Wanda reads none


def test_cli_localize_wanda_json(tiny_folders, tmp_path):
    import json

    from typer.testing import CliRunner

    from workbench.cli import app

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    result = CliRunner().invoke(app, ["localize", "wanda", str(tiny_folders["unet"]), "--prompts", str(prompts),
                                      "--calls", "2", "--skill-ratio", "0.1", "--out", str(tmp_path / "w.json"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mask"] == str(tmp_path / "w.mask.safetensors") and 0 < data["density"] <= 0.2
    assert sum(data["per_site"].values()) == data["weights"]
    assert all(site.endswith("ff.net.2") for site in data["per_site"])
    result = CliRunner().invoke(app, ["localize", "wanda", str(tiny_folders["unet"]), "--prompts", str(prompts),
                                      "--calls", "2", "--skill-ratio", "0.1", "--roles",
                                      "cross_attn_key,cross_attn_value", "--out", str(tmp_path / "kv.json"), "--json"])
    assert result.exit_code == 0, result.output
    sites = json.loads(result.stdout)["per_site"]
    assert sites and all(site.endswith(("attn2.to_k", "attn2.to_v")) for site in sites)
