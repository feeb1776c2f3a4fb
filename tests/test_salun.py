"""SalUn saliency: the forgetting gradient by hand on a real (tiny) model, and the global top-p mask."""

import pytest
import torch
import torch.nn.functional as F

from localization.salun import SalUnConfig, encode_images, forget_gradients, saliency_mask, top_fraction
from localization.sharding import Shard
from workbench.errors import WorkbenchError
from workbench.noising import noised, sample_timesteps
from workbench.sampling import encode


def test_top_fraction_is_global_or_per_layer():
    scores = {"a": torch.tensor([[4.0, 1], [3, 0]]), "b": torch.tensor([[2.0, 5]])}
    mask = top_fraction(scores, 0.5)  # 3 of 6: 5, 4, 3
    assert mask["a"].tolist() == [[True, False], [True, False]] and mask["b"].tolist() == [[False, True]]
    per_layer = top_fraction(scores, 0.5, per_layer=True)  # a: 2 of 4 (4, 3); b: 1 of 2 (5)
    assert per_layer["a"].tolist() == [[True, False], [True, False]] and per_layer["b"].tolist() == [[False, True]]
    assert top_fraction(scores, 1.0).count() == 6


def _images(n):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_gradient_is_that_of_the_cfg_combined_forgetting_loss(unet_model, w):
    config = SalUnConfig(guidance_scale=w, batch_size=2, roles=("cross_attn_value",))
    images, captions = _images(2), ["a red circle", "a cat"]
    got = forget_gradients(unet_model, images, captions, config)
    # by hand, with the same draws: one batch of two
    generator = torch.Generator().manual_seed(config.seed)
    clean = encode_images(unet_model, images)
    noise = torch.randn(clean.shape, generator=generator)
    timestep = sample_timesteps(unet_model.pipeline.scheduler, 2, generator)
    noisy, target = noised(unet_model.pipeline.scheduler, clean, noise, timestep)
    text = encode(unet_model, captions, cfg=False).kwargs["encoder_hidden_states"]
    empty = encode(unet_model, ["", ""], cfg=False).kwargs["encoder_hidden_states"]
    weights = [unet_model.module(p).weight for p in got]
    for weight in weights:
        weight.requires_grad_(True)
    eps_c = unet_model.denoiser(noisy, timestep, encoder_hidden_states=text).sample
    eps_u = unet_model.denoiser(noisy, timestep, encoder_hidden_states=empty).sample
    loss = -F.mse_loss((1 + w) * eps_c - w * eps_u, target)
    expected = torch.autograd.grad(loss, weights)
    for (path, grad), want in zip(got.items(), expected):
        assert torch.allclose(grad, want, atol=1e-6, rtol=1e-4), path


def test_saliency_mask_keeps_the_fraction_and_leaves_the_model_alone(unet_model):
    before = {k: v.clone() for k, v in unet_model.denoiser.state_dict().items()}
    flags = [p.requires_grad for p in unet_model.denoiser.parameters()]
    config = SalUnConfig(fraction=0.25, batch_size=2, roles=("cross_attn_key", "cross_attn_value"))
    mask = saliency_mask(unet_model, _images(3), ["a red circle", "a cat", "a blue square"], config)
    total = sum(m.numel() for _, m in mask.items())
    assert mask.count() == int(0.25 * total)
    assert all(p.endswith(("to_k", "to_v")) for p in mask.sites)
    assert mask == saliency_mask(unet_model, _images(3), ["a red circle", "a cat", "a blue square"], config)
    assert all(torch.equal(v, before[k]) for k, v in unet_model.denoiser.state_dict().items())
    assert [p.requires_grad for p in unet_model.denoiser.parameters()] == flags


def test_two_shards_sum_to_the_single_process_gradient(unet_model):
    config = SalUnConfig(batch_size=1, repeats=2, roles=("cross_attn_value",))
    images, captions = _images(3), ["a red circle", "a cat", "a blue square"]
    other: list = []  # shard 1's sums, handed to shard 0's gather as accelerate would
    forget_gradients(unet_model, images, captions, config, Shard(1, 2, gather=lambda mine: other.extend(mine) or mine))
    sharded = forget_gradients(unet_model, images, captions, config, Shard(0, 2, gather=lambda mine: mine + other))
    whole = forget_gradients(unet_model, images, captions, config)
    assert len(other) == 1 and sharded.keys() == whole.keys()
    for path in whole:  # 6 batches: shard 0 takes 0, 2, 4 and shard 1 takes 1, 3, 5
        assert torch.allclose(sharded[path], whole[path], rtol=1e-5, atol=1e-7), path
        assert not torch.allclose(other[0][path], whole[path], rtol=1e-3)


def test_saliency_runs_on_every_family(tiny_model):
    mask = saliency_mask(tiny_model, _images(1)[:, :, :tiny_model.pipeline.vae.config.sample_size,
                                                    :tiny_model.pipeline.vae.config.sample_size],
                         ["a red circle"], SalUnConfig(fraction=0.1, batch_size=1))
    assert 0 < mask.density() <= 0.1 + 1e-9


def test_bad_salun_input_fails_in_one_line(unet_model):
    with pytest.raises(WorkbenchError, match="one caption per forget image"):
        forget_gradients(unet_model, _images(2), ["a cat"])
    with pytest.raises(WorkbenchError, match="fraction"):
        SalUnConfig(fraction=0)


def test_cli_localize_salun_with_images(tiny_folders, tmp_path):
    import json

    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from localization.localize import Localization
    from workbench.cli import app

    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "i.txt").write_text(f"{tmp_path / 'x.png'}\n")
    result = CliRunner().invoke(app, ["localize", "salun", str(tiny_folders["unet"]), "--prompts",
                                      str(tmp_path / "p.txt"), "--images", str(tmp_path / "i.txt"), "--fraction",
                                      "0.2", "--roles", "cross_attn_value", "--out", str(tmp_path / "s.json"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["density"] == pytest.approx(0.2, abs=0.01) and data["provenance"]["forget_images"] == "given"
    assert Localization.load(tmp_path / "s.json").mask.count() == data["weights"]
    (tmp_path / "i.txt").write_text("missing.png\n")
    bad = CliRunner().invoke(app, ["localize", "salun", str(tiny_folders["unet"]), "--prompts", str(tmp_path / "p.txt"),
                                   "--images", str(tmp_path / "i.txt"), "--out", str(tmp_path / "t.json")])
    assert bad.exit_code == 2 and "not found" in bad.stderr


def test_localize_salun_generates_the_forget_set_when_no_images_are_given(unet_model):
    from localization.localize import localize

    result = localize(unet_model, "salun", ["a red circle"], config=SalUnConfig(fraction=0.1, batch_size=1))
    assert result.provenance["forget_images"].startswith("generated") and 0 < result.mask.density() <= 0.1
