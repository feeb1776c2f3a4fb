"""The testbed trainer: deterministic, resumable, and it learns (short CPU runs on small data)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from workbench.errors import WorkbenchError
from workbench.models.loading import load
from workbench.noising import FLOW_SAMPLINGS, sample_timesteps
from workbench.testbed.build import BuildConfig, denoiser_state_name
from workbench.testbed.models import TEXT_TOKENS, UNET_CHANNELS, build_pipeline, build_vae
from workbench.testbed.train import (DenoiserConfig, VAEConfig, denoiser_loss, encode_latents, offset,
                                     train_denoiser, train_vae)
from workbench.testbed.training import LoopConfig, step_generator
from workbench.testing import build_clip_tokenizer

WORDS = ["a", "red", "circle", "blue", "square"]


def _images(n=8, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 32, 32, 3), np.uint8)
    for i in range(n):  # blocky images: learnable in a few steps
        images[i, :, :, i % 3] = 200
        images[i, 8 * (i % 4):8 * (i % 4) + 8] = rng.integers(0, 255, 3)
    return images


@pytest.fixture(scope="module")
def vae_and_latents(tmp_path_factory):
    vae = build_vae(0)
    train_vae(vae, _images(), VAEConfig(LoopConfig(steps=6, lr=1e-3, warmup=0), batch_size=8),
              tmp_path_factory.mktemp("vae"), show_progress=False)
    return vae, encode_latents(vae, _images())


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_vae_training_lowers_loss_and_is_deterministic(tmp_path):
    config = VAEConfig(LoopConfig(steps=12, lr=2e-3, warmup=0, save_every=100), batch_size=8)
    first, second = build_vae(0), build_vae(0)
    losses = train_vae(first, _images(), config, tmp_path / "a", show_progress=False)
    again = train_vae(second, _images(), config, tmp_path / "b", show_progress=False)
    assert losses == again
    assert all(torch.equal(v, _weights(second)[k]) for k, v in _weights(first).items())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    latents = encode_latents(first, _images())
    assert latents.shape == (8, 4, 16, 16) and abs(float(latents.std()) - 1) < 1e-4  # scaling factor applied


@pytest.mark.parametrize("family", ["unet", "mmdit"])
def test_denoiser_training_lowers_a_fixed_batch_loss(family, vae_and_latents, tmp_path):
    vae, latents = vae_and_latents
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=TEXT_TOKENS)
    pipe = build_pipeline(family, tokenizer, vae, seed=0)
    captions = ["a red circle", "a blue square"] * 4
    config = DenoiserConfig(LoopConfig(steps=12, lr=2e-3, warmup=0, save_every=100), batch_size=8)
    model = load(pipe)
    with torch.no_grad():
        before = denoiser_loss(model, latents, captions, config, step_generator(99, 0)).item()
    train_denoiser(pipe, latents, captions, config, tmp_path, show_progress=False)
    with torch.no_grad():
        after = denoiser_loss(model, latents, captions, config, step_generator(99, 0)).item()
    assert after < 0.8 * before


def test_interrupted_training_resumes_to_the_same_weights(vae_and_latents, tmp_path):
    vae, latents = vae_and_latents
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=TEXT_TOKENS)
    captions = ["a red circle"] * 8
    straight, resumed = (build_pipeline("dit", tokenizer, vae, seed=0) for _ in range(2))
    loop = dict(lr=1e-3, warmup=2, save_every=2)
    train_denoiser(straight, latents, captions, DenoiserConfig(LoopConfig(steps=4, **loop), batch_size=4),
                   tmp_path / "straight", show_progress=False)
    train_denoiser(resumed, latents, captions, DenoiserConfig(LoopConfig(steps=2, **loop), batch_size=4),
                   tmp_path / "resumed", show_progress=False)
    fresh = build_pipeline("dit", tokenizer, vae, seed=0)  # a new process would start from scratch weights
    train_denoiser(fresh, latents, captions, DenoiserConfig(LoopConfig(steps=4, **loop), batch_size=4),
                   tmp_path / "resumed", show_progress=False)
    for name in ("transformer", "text_encoder"):
        expected, got = _weights(getattr(straight, name)), _weights(getattr(fresh, name))
        assert all(torch.equal(v, got[k]) for k, v in expected.items()), name


def test_resuming_with_other_settings_is_refused(vae_and_latents, tmp_path):
    vae, latents = vae_and_latents
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=TEXT_TOKENS)
    pipe = build_pipeline("unet", tokenizer, vae, seed=0)
    captions = ["a red circle"] * 8
    train_denoiser(pipe, latents, captions, DenoiserConfig(LoopConfig(steps=1, lr=1e-3), batch_size=2), tmp_path,
                   show_progress=False)
    with pytest.raises(WorkbenchError, match="different lr"):
        train_denoiser(pipe, latents, captions, DenoiserConfig(LoopConfig(steps=2, lr=5e-4), batch_size=2), tmp_path,
                       show_progress=False)


def test_a_cosine_run_is_not_extended_to_more_steps(vae_and_latents, tmp_path):
    """Resuming a decayed run with more steps would restart the decay part-way: not a run of that length."""
    vae, latents = vae_and_latents
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=TEXT_TOKENS)
    pipe = build_pipeline("unet", tokenizer, vae, seed=0)
    captions = ["a red circle"] * 8
    cosine = dict(lr=1e-3, warmup=0, final_lr_fraction=0.1)
    train_denoiser(pipe, latents, captions, DenoiserConfig(LoopConfig(steps=1, **cosine), batch_size=2), tmp_path,
                   show_progress=False)
    with pytest.raises(WorkbenchError, match="different steps"):
        train_denoiser(pipe, latents, captions, DenoiserConfig(LoopConfig(steps=2, **cosine), batch_size=2),
                       tmp_path, show_progress=False)


def test_learning_rate_warms_up_then_decays_on_a_cosine_to_its_floor():
    config = LoopConfig(steps=110, lr=1.0, warmup=10, final_lr_fraction=0.1)
    assert [config.lr_at(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert config.lr_at(10) == pytest.approx(1.0)  # decay starts after warm-up
    assert config.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(π/2) = 0
    assert config.lr_at(110) == pytest.approx(0.1) and config.lr_at(500) == pytest.approx(0.1)
    constant = LoopConfig(steps=110, lr=1.0, warmup=10)
    assert {constant.lr_at(s) for s in range(10, 110)} == {1.0}
    with pytest.raises(WorkbenchError, match="final_lr_fraction"):
        LoopConfig(steps=1, final_lr_fraction=1.5)


def test_a_state_saved_before_a_setting_existed_resumes_with_its_default(vae_and_latents, tmp_path):
    vae, latents = vae_and_latents
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=TEXT_TOKENS)
    pipe = build_pipeline("unet", tokenizer, vae, seed=0)
    captions = ["a red circle"] * 8
    train_denoiser(pipe, latents, captions, DenoiserConfig(LoopConfig(steps=1), batch_size=2), tmp_path,
                   show_progress=False)
    state = json.loads((tmp_path / "state.json").read_text())
    del state["config"]["final_lr_fraction"]  # as written by the first trainer
    (tmp_path / "state.json").write_text(json.dumps(state))
    train_denoiser(pipe, latents, captions, DenoiserConfig(LoopConfig(steps=2), batch_size=2), tmp_path,
                   show_progress=False)
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 2
    with pytest.raises(WorkbenchError, match="different final_lr_fraction"):
        train_denoiser(pipe, latents, captions, DenoiserConfig(LoopConfig(steps=3, final_lr_fraction=0.5),
                                                               batch_size=2), tmp_path, show_progress=False)


def test_logit_normal_flow_timesteps_concentrate_in_the_middle():
    """SD3's logit-normal sampling (m = 0, s = 1): P(0.25 < σ < 0.75) = P(|n| < logit 0.75) ≈ 0.73, uniform 0.5."""
    flow, ddpm = FlowMatchEulerDiscreteScheduler(shift=1.0), DDIMScheduler()
    middle = {}
    for sampling in FLOW_SAMPLINGS:
        t = sample_timesteps(flow, 20_000, torch.Generator().manual_seed(0), sampling)
        assert 0 < t.min() and t.max() < 1000
        middle[sampling] = ((t > 250) & (t < 750)).float().mean().item()
    assert middle["uniform"] == pytest.approx(0.5, abs=0.02)
    assert middle["logit-normal"] == pytest.approx(0.728, abs=0.02)
    same = [sample_timesteps(ddpm, 8, torch.Generator().manual_seed(0), s) for s in FLOW_SAMPLINGS]
    assert torch.equal(*same)  # DDPM-type schedulers keep their uniform integers
    with pytest.raises(WorkbenchError, match="unknown flow timestep sampling"):
        sample_timesteps(flow, 2, torch.Generator(), "lognormal")


def test_flow_sampling_is_refused_for_noise_prediction_families_and_named_in_the_state(vae_and_latents):
    with pytest.raises(WorkbenchError, match="mmdit"):
        BuildConfig("unet", flow_sampling="logit-normal")
    pipe = build_pipeline("mmdit", build_clip_tokenizer(WORDS, model_max_length=TEXT_TOKENS), vae_and_latents[0], 0)
    uniform = denoiser_state_name(BuildConfig("mmdit"), "f" * 64, pipe)
    logit_normal = denoiser_state_name(BuildConfig("mmdit", flow_sampling="logit-normal"), "f" * 64, pipe)
    assert uniform.startswith(f"mmdit-{'f' * 12}-") and logit_normal == uniform + "-logit-normal"


def test_a_run_never_resumes_one_with_another_architecture_schedule_or_batch_size(vae_and_latents):
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=TEXT_TOKENS)
    name = lambda pipe, **build: denoiser_state_name(BuildConfig("unet", **build), "f" * 64, pipe)
    pipe, again = (build_pipeline("unet", tokenizer, vae_and_latents[0], seed) for seed in (0, 1))
    assert name(pipe) == name(again)  # other weights, same run settings: the seed is checked by LoopConfig
    assert name(pipe) != name(pipe, batch_size=16)
    changes = (lambda p: p.unet.register_to_config(attention_head_dim=4),
               lambda p: setattr(p.text_encoder.config, "num_hidden_layers", 3),
               lambda p: p.scheduler.register_to_config(prediction_type="epsilon"))
    names = {name(pipe)}
    for change in changes:
        changed = build_pipeline("unet", tokenizer, vae_and_latents[0], 0)
        change(changed)
        names.add(name(changed))
    assert len(names) == 4


def test_offset_noise_shifts_each_image_and_channel_by_one_constant():
    noise = torch.zeros(3, 4, 5, 5)
    shifted = offset(noise, 0.1, torch.Generator().manual_seed(0))
    expected = 0.1 * torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(shifted, expected.expand(3, 4, 5, 5))
    generator = torch.Generator().manual_seed(0)
    assert offset(noise, 0.0, generator) is noise and torch.equal(generator.get_state(),
                                                                 torch.Generator().manual_seed(0).get_state())
    with pytest.raises(WorkbenchError, match="offset noise"):
        BuildConfig("unet", offset_noise=-0.1)


def test_epsilon_objective_is_sd1s_schedule_and_named_in_the_state(vae_and_latents):
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=TEXT_TOKENS)
    pipe = build_pipeline("unet", tokenizer, vae_and_latents[0], 0, objective="epsilon")
    config = pipe.scheduler.config
    assert config.prediction_type == "epsilon" and not config.rescale_betas_zero_snr
    assert config.beta_schedule == "scaled_linear" and config.beta_end == 0.012
    shipped = build_pipeline("unet", tokenizer, vae_and_latents[0], 0)
    default = shipped.scheduler.config
    assert default.prediction_type == "v_prediction" and default.rescale_betas_zero_snr
    plain = denoiser_state_name(BuildConfig("unet", objective="epsilon"), "f" * 64, pipe)
    shifted = denoiser_state_name(BuildConfig("unet", objective="epsilon", offset_noise=0.1), "f" * 64, pipe)
    assert shifted == plain + "-offset0.1" and plain != denoiser_state_name(BuildConfig("unet"), "f" * 64, shipped)
    for bad, match in ((dict(family="mmdit", objective="epsilon"), "rectified flow"),
                       (dict(family="unet", objective="x0"), "unknown objective")):
        with pytest.raises(WorkbenchError, match=match):
            BuildConfig(**bad)


def test_offset_noise_training_is_deterministic_and_lowers_the_loss(vae_and_latents, tmp_path):
    vae, latents = vae_and_latents
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=TEXT_TOKENS)
    captions = ["a red circle", "a blue square"] * 4
    config = DenoiserConfig(LoopConfig(steps=12, lr=2e-3, warmup=0, save_every=100), batch_size=8, offset_noise=0.1)
    first, second = (build_pipeline("unet", tokenizer, vae, 0, objective="epsilon") for _ in range(2))
    with torch.no_grad():
        before = denoiser_loss(load(first), latents, captions, config, step_generator(99, 0)).item()
    losses = train_denoiser(first, latents, captions, config, tmp_path / "a", show_progress=False)
    assert losses == train_denoiser(second, latents, captions, config, tmp_path / "b", show_progress=False)
    with torch.no_grad():
        assert denoiser_loss(load(first), latents, captions, config, step_generator(99, 0)).item() < 0.8 * before


def test_unet_channels_widen_the_value_sites_and_name_their_own_run(vae_and_latents):
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=TEXT_TOKENS)
    wide = build_pipeline("unet", tokenizer, vae_and_latents[0], 0, unet_channels=(32, 96, 192))
    values = {name: module.out_features for name, module in wide.unet.named_modules() if name.endswith("attn2.to_v")}
    assert values["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"] == 96
    assert values["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"] == 192
    shipped = build_pipeline("unet", tokenizer, vae_and_latents[0], 0)
    assert shipped.unet.config.block_out_channels == UNET_CHANNELS == (32, 64, 128)
    assert (denoiser_state_name(BuildConfig("unet", unet_channels=(32, 96, 192)), "f" * 64, wide)
            != denoiser_state_name(BuildConfig("unet"), "f" * 64, shipped))
    for bad, match in ((dict(family="unet", unet_channels=(32, 96, 190)), "three multiples of 32"),
                       (dict(family="unet", unet_channels=(32, 64)), "three multiples of 32"),
                       (dict(family="dit", unet_channels=(32, 96, 192)), "unet family only")):
        with pytest.raises(WorkbenchError, match=match):
            BuildConfig(**bad)
