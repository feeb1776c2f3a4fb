"""Sampling helpers reproduce what the pipeline itself does, deterministically."""

import numpy as np
import pytest
import torch
from PIL import Image

from workbench import sampling
from workbench.errors import WorkbenchError

PROMPTS = ["a red circle", "a photo of a cat"]


def test_predict_matches_the_pipelines_own_denoiser_call(tiny_model):
    """Capture the denoiser call inside a real pipeline run; `predict` must reproduce its CFG output."""
    calls = []

    def capture(module, args, kwargs, output):
        calls.append((args, kwargs, output.sample if hasattr(output, "sample") else output[0]))

    handle = tiny_model.denoiser.register_forward_hook(capture, with_kwargs=True)
    try:
        sampling.generate(tiny_model, PROMPTS, steps=1, guidance_scale=4.0)
    finally:
        handle.remove()
    (args, kwargs, output), = calls
    latents = (args[0] if args else kwargs.get("hidden_states", kwargs.get("sample")))
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    timestep = timestep.reshape(-1)[0]
    half = latents.shape[0] // 2
    if output.shape[1] == 2 * latents.shape[1]:  # PixArt's learned sigma
        output = output.chunk(2, dim=1)[0]
    expected = output[:half] + 4.0 * (output[half:] - output[:half])
    predicted = sampling.predict(tiny_model, latents[half:], timestep, PROMPTS, guidance_scale=4.0)
    torch.testing.assert_close(predicted, expected, rtol=1e-4, atol=1e-5)


def test_generation_is_seeded_and_independent_of_batch_company(unet_model):
    pair = sampling.generate(unet_model, PROMPTS, seed=3, steps=2)
    again = sampling.generate(unet_model, PROMPTS, seed=3, steps=2)
    second_alone = sampling.generate(unet_model, PROMPTS[1:], seed=4, steps=2)
    assert torch.equal(pair, again)
    torch.testing.assert_close(pair[1:], second_alone, rtol=0, atol=1e-5)
    assert not torch.equal(sampling.generate(unet_model, PROMPTS, seed=5, steps=2), pair)
    assert pair.shape[1] == 3 and 0 <= pair.min() and pair.max() <= 1


def test_generation_takes_one_seed_per_prompt(unet_model):
    chosen = sampling.generate(unet_model, [PROMPTS[0]] * 3, seeds=[7, 3, 7], steps=2)
    torch.testing.assert_close(chosen[0], chosen[2], rtol=0, atol=1e-5)
    torch.testing.assert_close(chosen[1:2], sampling.generate(unet_model, PROMPTS[0], seed=3, steps=2),
                               rtol=0, atol=1e-5)
    with pytest.raises(WorkbenchError, match="one seed per prompt"):
        sampling.generate(unet_model, PROMPTS, seeds=[1], steps=2)


def test_predict_without_guidance_is_the_conditional_prediction(unet_model):
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = sampling.predict(unet_model, latents, 300, PROMPTS)
    direct = unet_model.denoiser(latents, 300, encoder_hidden_states=sampling.encode(
        unet_model, PROMPTS, cfg=False).kwargs["encoder_hidden_states"]).sample
    torch.testing.assert_close(plain, direct)


@pytest.mark.parametrize("call, match", [
    (lambda m: sampling.generate(m, []), "no prompts"),
    (lambda m: sampling.generate(m, ["a cat"], steps=0), "steps must be at least 1"),
    (lambda m: sampling.predict(m, torch.full((1, 4, 16, 16), float("nan")), 10, ["a cat"]), "NaN"),
    (lambda m: sampling.predict(m, torch.zeros(3, 4, 16, 16), 10, ["a cat"]), "one latent per prompt"),
    (lambda m: sampling.predict(m, torch.zeros(1, 4, 16, 16), 10, sampling.encode(m, ["a"], cfg=False),
                                guidance_scale=3.0), "encode again"),
])
def test_bad_sampling_input(unet_model, call, match):
    with pytest.raises(WorkbenchError, match=match):
        call(unet_model)


def test_save_image_is_atomic_and_never_overwrites(tmp_path):
    image = torch.rand(3, 8, 8)
    path = tmp_path / "a.png"
    sampling.save_image(image, path)
    saved = path.read_bytes()
    with pytest.raises(WorkbenchError, match="already exists"):
        sampling.save_image(torch.zeros(3, 8, 8), path)
    assert path.read_bytes() == saved
    assert list(tmp_path.iterdir()) == [path], "no temporary files left behind"
    pixels = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(pixels, image, rtol=0, atol=1 / 255)
    with pytest.raises(WorkbenchError, match="does not exist"):
        sampling.save_image(image, tmp_path / "missing" / "b.png")
