"""Memorization detection: NeMo noise consistency, Wen et al.'s magnitude, replication, `workbench detect`."""

import json
import math

import pytest
import torch
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim
from typer.testing import CliRunner

import workbench

from localization.detection import (
    NemoConfig,
    ReplicationConfig,
    WenConfig,
    calibrate_threshold,
    combined_verdict,
    consistency,
    gaussian_taps,
    initial_latents,
    minmax_per_channel,
    msssim_window,
    nearest_training_images,
    nemo_scores,
    noise_differences,
    pairwise_msssim,
    ssim_matrix,
    text_noise_magnitude,
)
from localization.similarity import learned_similarity
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.sampling import predict

FAST_NEMO = NemoConfig(n_seeds=3, steps=5)
FAST_WEN = WenConfig(generations=2, steps=3)


# ---- NeMo ---------------------------------------------------------------------------------------

def test_minmax_is_per_sample_and_per_channel():
    delta = torch.tensor([[[[1.0, 3.0], [5.0, 9.0]], [[-2.0, -2.0], [0.0, 2.0]]],
                          [[[4.0, 4.0], [4.0, 4.0]], [[0.0, 10.0], [20.0, 40.0]]]])
    expected = torch.tensor([[[[0.0, 0.25], [0.5, 1.0]], [[0.0, 0.0], [0.5, 1.0]]],
                             [[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.25], [0.5, 1.0]]]])  # constant plane -> 0
    assert torch.equal(minmax_per_channel(delta), expected)


def test_msssim_window_is_the_reference_on_sd_latents_and_shrinks_for_small_ones():
    assert msssim_window(64, 64) == (11, pytest.approx(1.5))  # SD 1.x: kernel 11, sigma 1.5
    for side, taps in ((16, 3), (32, 7)):
        size, sigma = msssim_window(side, side)
        assert size == taps and gaussian_taps(sigma) == taps  # the Gaussian really has `size` taps
    with pytest.raises(WorkbenchError, match="too small"):
        msssim_window(8, 8)


def test_score_is_the_max_over_pairs_and_identical_seeds_score_one():
    torch.manual_seed(0)
    deltas = minmax_per_channel(torch.randn(2, 4, 4, 16, 16))
    deltas[0, 2] = deltas[0, 0]  # prompt 0: seeds 0 and 2 identical
    kernel, sigma = msssim_window(16, 16)
    matrix = pairwise_msssim(deltas, kernel_size=kernel, sigma=sigma, betas=(0.33, 0.33, 0.33))
    direct = ms_ssim(deltas[1, 1:2], deltas[1, 3:4], kernel_size=kernel, sigma=sigma, betas=(0.33, 0.33, 0.33),
                     data_range=1.0)
    assert matrix[1, 1, 3] == pytest.approx(float(direct), abs=1e-6) and torch.equal(matrix, matrix.transpose(1, 2))
    score, per_seed = consistency(matrix)
    assert score[0] == pytest.approx(1.0, abs=1e-5) and per_seed[0, 0] == per_seed[0, 2] == score[0]
    assert per_seed[0, 1] < 0.9 and per_seed[0, 3] < 0.9
    off_diagonal = matrix[1][~torch.eye(4, dtype=torch.bool)]
    assert score[1] == off_diagonal.max() < 0.9
    assert torch.equal(per_seed[1], torch.stack([matrix[1, i][torch.arange(4) != i].max() for i in range(4)]))


def test_noise_difference_is_the_first_step_prediction_minus_latent(unet_model):
    config = FAST_NEMO
    deltas, timestep, _ = noise_differences(unet_model, ["a red circle"], config)
    x_t = initial_latents(unet_model, config)
    assert torch.equal(x_t, torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1)))  # one generator
    eps = predict(unet_model, x_t, timestep, ["a red circle"] * 3, guidance_scale=0.0)
    torch.testing.assert_close(deltas[0], minmax_per_channel(eps - x_t), atol=1e-5, rtol=1e-5)


def test_v_prediction_delta_is_the_rescaled_noise_difference(tiny_folders):
    """δ of a v-prediction model: (ε̂ − x_t)/√ᾱ at ᾱ > 0 (same after min–max), v̂ at zero terminal SNR."""
    from diffusers import DDIMScheduler

    model = workbench.load(tiny_folders["unet"])
    model.pipeline.scheduler = DDIMScheduler.from_config(
        model.pipeline.scheduler.config, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing")
    alphas = model.pipeline.scheduler.alphas_cumprod
    for config in (FAST_NEMO, NemoConfig(n_seeds=3, steps=5, legacy=True)):
        deltas, timestep, _ = noise_differences(model, ["a red circle"], config)
        x_t = initial_latents(model, config)
        v = predict(model, x_t, torch.tensor(timestep), ["a red circle"] * 3, guidance_scale=0.0)
        alpha = alphas[int(timestep)]
        if alpha == 0:
            assert timestep == 999.0
            expected = v
        else:
            assert 0 < alpha < 0.5
            expected = alpha.sqrt() * v + (1 - alpha).sqrt() * x_t - x_t  # ε̂ − x_t, unscaled
        torch.testing.assert_close(deltas[0], minmax_per_channel(expected), atol=1e-4, rtol=1e-4)


def test_legacy_uses_the_second_timestep_on_the_same_latents(unet_model):
    paper = noise_differences(unet_model, ["a red circle"], FAST_NEMO)
    legacy = noise_differences(unet_model, ["a red circle"], NemoConfig(n_seeds=3, steps=5, legacy=True))
    assert paper[1] == 801.0 and legacy[1] == 601.0  # DDIM, 5 steps, steps_offset 1: 801, 601, ...
    assert not torch.allclose(paper[0], legacy[0], atol=1e-3)


def test_scores_do_not_depend_on_batching(tiny_model):
    prompts = ["a red circle", "a cat on the beach", "a blue square"]
    for config in (FAST_NEMO, NemoConfig(n_seeds=3, steps=5, guidance_scale=7.5)):  # with CFG rows too
        batched = nemo_scores(tiny_model, prompts, config, batch_size=64)
        one_by_one = nemo_scores(tiny_model, prompts, config, batch_size=1)
        for a, b in zip(batched, one_by_one):
            assert a.score == pytest.approx(b.score, abs=1e-5) and a.prompt == b.prompt
            assert max(a.per_seed) == a.score and len(a.per_seed) == 3 and a.kernel_size == 3
    assert len({s.score for s in batched}) == 3  # different prompts, different scores


def test_calibration_is_mean_plus_unbiased_std():
    assert calibrate_threshold([1.0, 2.0, 3.0, 4.0]) == pytest.approx(2.5 + math.sqrt(5 / 3))
    assert calibrate_threshold([1.0, 2.0, 3.0, 4.0], k=2.0) == pytest.approx(2.5 + 2 * math.sqrt(5 / 3))
    with pytest.raises(WorkbenchError, match="at least 2"):
        calibrate_threshold([0.3])


def test_verdicts_use_the_threshold(unet_model):
    [low] = nemo_scores(unet_model, ["a red circle"], FAST_NEMO, threshold=2.0)
    [high] = nemo_scores(unet_model, ["a red circle"], FAST_NEMO, threshold=-1.0)
    [none] = nemo_scores(unet_model, ["a red circle"], FAST_NEMO)
    assert (low.memorized, high.memorized, none.memorized) == (False, True, None)
    assert high.memorized_seeds == (0, 1, 2) and low.memorized_seeds == ()
    assert combined_verdict(True, False) and combined_verdict(None, True)
    assert combined_verdict(False, None) is False and combined_verdict(None, None) is None


# ---- Wen et al. ---------------------------------------------------------------------------------

def _capture_outputs(model, outputs):
    def hook(module, args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output.sample).detach().clone())
    return model.denoiser.register_forward_hook(hook)


def test_wen_magnitude_equals_manual_norms_of_captured_outputs(tiny_model):
    outputs = []
    handle = _capture_outputs(tiny_model, outputs)
    try:
        score = text_noise_magnitude(tiny_model, "a red circle", FAST_WEN)
    finally:
        handle.remove()
    channels = tiny_model.denoiser.config.in_channels  # PixArt's learned sigma: drop the variance half
    norms = torch.stack([(o[2:, :channels] - o[:2, :channels]).flatten(1).norm(dim=1) for o in outputs])
    assert len(outputs) == 3 and score.steps == (0, 1, 2) and score.seeds == (0, 1)
    assert score.magnitude == pytest.approx(float(norms.mean()), rel=1e-5) and score.magnitude > 0
    torch.testing.assert_close(torch.tensor(score.norms), norms)
    assert score.images.shape == (2, 3, 32, 32)


def test_first_step_mode_stops_sampling_and_matches_the_full_run(unet_model):
    full = text_noise_magnitude(unet_model, "a red circle", FAST_WEN)
    outputs = []
    handle = _capture_outputs(unet_model, outputs)
    try:
        first = text_noise_magnitude(unet_model, "a red circle", WenConfig.first_step(generations=2, steps=3))
    finally:
        handle.remove()
    assert len(outputs) == 1 and first.images is None  # one denoiser call, no decoding
    assert first.magnitude == pytest.approx(full.per_step[0], rel=1e-5)


def test_wen_magnitude_is_zero_without_text_signal(unet_model):
    assert text_noise_magnitude(unet_model, "", FAST_WEN).magnitude == pytest.approx(0.0, abs=1e-6)

    def copy_uncond_rows(module, args, output):  # an intervention that erases the text's effect
        sample = output[0]
        half = sample.shape[0] // 2
        sample[half:] = sample[:half]

    handle = unet_model.denoiser.register_forward_hook(copy_uncond_rows)
    try:
        assert text_noise_magnitude(unet_model, "a red circle", FAST_WEN).magnitude == 0.0
    finally:
        handle.remove()


# ---- replication --------------------------------------------------------------------------------

def _smooth_images(n, seed):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def test_replication_finds_the_copied_training_image():
    training = _smooth_images(6, seed=0)
    copies = (training[[3, 0, 5]] + 0.03 * torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    unrelated = _smooth_images(2, seed=2)
    result = nearest_training_images(torch.cat([copies.clamp(0, 1), unrelated]), training)
    assert result.ssim_index[:3].tolist() == [3, 0, 5] and result.l2_index[:3].tolist() == [3, 0, 5]
    assert (result.ssim[:3] > 0.8).all() and (result.ssim[3:] < 0.5).all()
    assert result.l2[0] == pytest.approx(float((copies[0].clamp(0, 1) - training[3]).norm()), rel=1e-5)
    assert result.to_json()["ssim_window"] == {"sigma": 1.5, "kernel_size": 11}


def test_ssim_matrix_pairs_each_generation_with_each_training_image():
    generated, training = _smooth_images(3, seed=3), _smooth_images(5, seed=4)
    matrix = ssim_matrix(generated, training)
    chunked = ssim_matrix(generated, training, max_elements=generated[0].numel() * 3 * 2)  # 2 per call
    assert torch.allclose(matrix, chunked)
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    assert matrix[2, 1] == pytest.approx(float(ssim(generated[2:3], training[1:2], data_range=1.0)), abs=1e-6)


# ---- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("build, match", [
    (lambda: NemoConfig(n_seeds=1), "at least 2"),
    (lambda: NemoConfig(legacy=True, steps=1), "timesteps\\[1\\]"),
    (lambda: NemoConfig(steps=0), "steps must be >= 1"),
    (lambda: NemoConfig(betas=(1, 1)), "betas"),
    (lambda: NemoConfig(scheduler="euler"), "scheduler"),
    (lambda: WenConfig(guidance_scale=1.0), "unconditional"),
    (lambda: WenConfig(measure_steps=(50,)), "measure_steps"),
    (lambda: ReplicationConfig(learned=("clip",)), "needs local weights"),
    (lambda: ReplicationConfig(learned=("clip",), weights="/nonexistent"), "not a local CLIP folder"),
    (lambda: ReplicationConfig(learned=("sscd",), weights="x"), "TorchScript"),
    (lambda: ReplicationConfig(learned=("dino",), weights="x"), "unknown learned metric"),
    (lambda: learned_similarity(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), "lpips", "x"), "torchvision"),
    (lambda: nearest_training_images(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 16, 16)), "resize"),
    (lambda: nearest_training_images(torch.full((1, 3, 32, 32), 255.0), torch.zeros(1, 3, 32, 32)), "255"),
])
def test_bad_input_raises_one_line_workbench_error(build, match):
    with pytest.raises(WorkbenchError, match=match) as error:
        build()
    assert "\n" not in str(error.value)


# ---- CLI ----------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_detect_json_with_calibration(tiny_folders, tmp_path):
    prompts, holdout = tmp_path / "prompts.txt", tmp_path / "holdout.txt"
    prompts.write_text("a red circle\n\n  \nan astronaut riding a horse\n")
    holdout.write_text("a blue square\na cat in the city\na green tree\n")
    result = runner.invoke(app, ["detect", str(tiny_folders["unet"]), "--prompts", str(prompts), "--calibration",
                                 str(holdout), "--threshold-wen", "0", "--seeds", "3", "--steps", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["prompt"] for p in data["prompts"]] == ["a red circle", "an astronaut riding a horse"]
    assert data["thresholds"]["wen"] == 0.0 and isinstance(data["thresholds"]["nemo"], float)
    for item in data["prompts"]:
        nemo, wen = item["nemo"], item["wen"]
        assert nemo["memorized"] == (nemo["score"] > data["thresholds"]["nemo"]) and len(nemo["per_seed"]) == 3
        assert wen["memorized"] is True and len(wen["seeds"]) == 3 and wen["config"]["steps"] == 2
        assert item["memorized"] is True  # any detector flags it


def test_cli_detect_without_thresholds_has_null_verdicts(tiny_folders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    result = runner.invoke(app, ["detect", str(tiny_folders["unet"]), "--prompts", str(prompts), "--seeds", "2",
                                 "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert "no threshold" in result.stdout and "a red circle" in result.stdout


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_cli_detect_empty_prompts_file_exits_2(tiny_folders, tmp_path, content):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    result = runner.invoke(app, ["detect", str(tiny_folders["unet"]), "--prompts", str(prompts)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "has no prompts" in result.stderr


def test_cli_detect_wen_first_step_measures_one_step(tiny_folders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    result = runner.invoke(app, ["detect", str(tiny_folders["unet"]), "--prompts", str(prompts), "--seeds", "2",
                                 "--steps", "4", "--wen-first-step", "--json"])
    assert result.exit_code == 0, result.output
    wen = json.loads(result.stdout)["prompts"][0]["wen"]
    assert wen["steps"] == [0] and len(wen["per_step"]) == 1 and wen["config"]["measure_steps"] == [0]


def test_cli_detect_wen_guidance_sets_the_sampling_loop_and_changes_the_magnitude(tiny_folders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    common = ["detect", str(tiny_folders["unet"]), "--prompts", str(prompts), "--seeds", "2", "--steps", "3", "--json"]
    default, given = (runner.invoke(app, common + extra) for extra in ([], ["--wen-guidance", "3"]))
    assert default.exit_code == 0 and given.exit_code == 0, default.output + given.output
    wen = [json.loads(r.stdout)["prompts"][0]["wen"] for r in (default, given)]
    assert [w["config"]["guidance_scale"] for w in wen] == [7.5, 3.0]
    assert wen[0]["per_step"][0] == pytest.approx(wen[1]["per_step"][0])  # same x_T, same first prediction
    assert wen[0]["per_step"][1:] != pytest.approx(wen[1]["per_step"][1:])  # the loop follows another path
    refused = runner.invoke(app, common + ["--wen-guidance", "1"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1 and "guidance_scale must be > 1" in refused.stderr


def test_clip_replication_from_a_local_folder_finds_the_copy(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(tmp_path / "clip")
    training = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    generated = training[[3, 0]]
    config = ReplicationConfig(learned=("clip",), weights=str(tmp_path / "clip"))
    result = nearest_training_images(generated, training, config)
    index, similarity = result.learned["clip"]
    assert index.tolist() == [3, 0] and torch.allclose(similarity, torch.ones(2), atol=1e-5)
    assert result.to_json()["nearest_by_clip"] == [3, 0]
    assert learned_similarity(training, training, "clip", tmp_path / "clip").shape == (5, 5)


def test_ssim_on_l2_candidates_finds_the_exact_nearest_when_it_is_among_them():
    generator = torch.Generator().manual_seed(5)
    training = torch.rand(40, 3, 16, 16, generator=generator)
    generated = (training[[7, 21, 3]] + 0.05 * torch.randn(3, 3, 16, 16, generator=generator)).clamp(0, 1)
    exact = nearest_training_images(generated, training)
    fast = nearest_training_images(generated, training, ReplicationConfig(ssim_candidates=4))
    assert fast.ssim_index.tolist() == exact.ssim_index.tolist() == [7, 21, 3]
    assert torch.allclose(fast.ssim, exact.ssim, atol=1e-6) and torch.equal(fast.l2_index, exact.l2_index)
    everything = nearest_training_images(generated, training, ReplicationConfig(ssim_candidates=100))
    assert torch.equal(everything.ssim, exact.ssim)
    with pytest.raises(WorkbenchError, match="ssim_candidates"):
        ReplicationConfig(ssim_candidates=0)
