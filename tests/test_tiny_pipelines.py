"""Tests for workbench.testing: offline tokenizer and tiny pipelines, saved and reloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub are imported

import pytest
import torch
from diffusers import DiffusionPipeline

from workbench.testing import (
    DEFAULT_WORDS,
    TINY_FAMILIES,
    TINY_RESOLUTION,
    build_clip_tokenizer,
    call_kwargs,
    save_tiny_pipeline,
    tiny_pipeline,
)

# Components the saved folders deliberately lack, which from_pretrained must be told about.
LOAD_KWARGS = {
    "unet": {"safety_checker": None, "requires_safety_checker": False},
    "dit": {},
    "mmdit": {"text_encoder_3": None, "tokenizer_3": None},
}


def generate(pipe, family, prompt, seed=0, **overrides):
    kwargs = call_kwargs(family) | overrides
    return pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kwargs,
    ).images


def modules(pipe):
    return {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def state_dicts(pipe):
    return {name: module.state_dict() for name, module in modules(pipe).items()}


def assert_same_weights(a, b):
    sa, sb = state_dicts(a), state_dicts(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].keys() == sb[name].keys(), name
        for key, tensor in sa[name].items():
            assert torch.equal(tensor, sb[name][key]), f"{name}.{key}"


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_caption_words_are_single_tokens():
    tok = build_clip_tokenizer()
    ids = tok("a photo of a cat").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>",
    ]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.bos_token_id == len(tok) - 2 and tok.eos_token_id == len(tok) - 1
    assert tok.pad_token == "<|endoftext|>" and tok.model_max_length == 77
    for word in DEFAULT_WORDS:
        assert len(tok(word).input_ids) == 3, word


def test_tokenizer_custom_words_with_overlapping_merges():
    # "other" wants an "o t" merge that would split "photo" and "hot" if merges were naive chains.
    words = ["Other", "photo", "hot", "the", "photograph", "pho", "zebra"]
    tok = build_clip_tokenizer(words, model_max_length=16)
    for word in words:
        assert tok.convert_ids_to_tokens(tok(word).input_ids)[1:-1] == [word.lower() + "</w>"]
    assert tok.model_max_length == 16
    with pytest.raises(ValueError, match="letters only"):
        build_clip_tokenizer(["two words"])


def test_tokenizer_unknown_words_fall_back_to_pieces():
    tok = build_clip_tokenizer()
    text = "a zebra jumps over the Fences"
    ids = tok(text).input_ids
    inner = ids[1:-1]
    assert len(inner) > len(text.split())  # unknown words are split, not dropped
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()
    # Digits, punctuation and non-ASCII text tokenize too, byte by byte at worst; the unk token
    # (which is <|endoftext|>, as in CLIP) never appears inside.
    for odd in (text, "42 fences! ünïcode 猫"):
        inner = tok(odd).input_ids[1:-1]
        assert inner and tok.bos_token_id not in inner and tok.eos_token_id not in inner
    padded = tok(text, padding="max_length").input_ids
    assert len(padded) == 77 and padded[len(ids):] == [tok.eos_token_id] * (77 - len(ids))


# --- pipelines ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_saved_pipeline_reproduces_in_memory_one(family, tmp_path):
    pipe = tiny_pipeline(family)
    folder = tmp_path / family
    folder.mkdir()  # an existing empty folder is accepted
    assert save_tiny_pipeline(family, folder) == folder
    assert sorted(p.name for p in tmp_path.iterdir()) == [family]  # no staging leftovers
    assert list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))

    loaded = DiffusionPipeline.from_pretrained(
        folder, local_files_only=True, use_safetensors=True, **LOAD_KWARGS[family]
    )
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    assert_same_weights(pipe, loaded)

    # Two prompts: with a batch of one, SD3's pooled text projection is a matrix-vector product,
    # whose float rounding on CPU depends on the weights' memory alignment, which differs between
    # freshly allocated and memory-mapped safetensors weights (last-bit differences).
    prompts = ["a photo of a cat", "a red circle in the style of a painting"]
    expected = generate(pipe, family, prompts)
    images = generate(loaded, family, prompts)
    assert images.shape == (2, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    assert torch.isfinite(images).all()
    assert torch.equal(images, expected)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_generation_is_deterministic_and_seed_dependent(family):
    rng_state = torch.get_rng_state()
    pipe = tiny_pipeline(family)
    assert torch.equal(torch.get_rng_state(), rng_state)  # building does not touch global RNG
    assert not any(m.training for m in modules(pipe).values())

    first = generate(pipe, family, "a photo of a cat", seed=0)
    assert first.shape == (1, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    assert torch.isfinite(first).all()
    # The default height/width (from the configs) are TINY_RESOLUTION too.
    default_size = generate(pipe, family, "a photo of a cat", seed=0, height=None, width=None)
    assert torch.equal(default_size, first)
    assert not torch.equal(generate(pipe, family, "a photo of a cat", seed=1), first)

    assert_same_weights(tiny_pipeline(family, seed=0), pipe)
    other = state_dicts(tiny_pipeline(family, seed=1))
    assert any(
        not torch.equal(tensor, other[name][key])
        for name, sd in state_dicts(pipe).items()
        for key, tensor in sd.items()
        if tensor.is_floating_point() and tensor.numel() > 1
    )


def test_save_refuses_non_empty_folder(tmp_path):
    folder = tmp_path / "busy"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        save_tiny_pipeline("dit", folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError):
        save_tiny_pipeline("dit", a_file)
    assert a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "busy"]


def test_unknown_family_is_rejected(tmp_path):
    for make in (tiny_pipeline, call_kwargs, lambda f: save_tiny_pipeline(f, tmp_path / "x")):
        with pytest.raises(ValueError, match="unet, dit, mmdit"):
            make("sdxl")
    assert not (tmp_path / "x").exists()
