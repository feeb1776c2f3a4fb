"""Tiny, random-weight diffusers pipelines built entirely offline, for tests and demos.

Three families mirror the architectures the toolkit targets:

* ``"unet"``  -- Stable Diffusion 1.x style (``StableDiffusionPipeline``),
* ``"dit"``   -- PixArt-alpha style (``PixArtAlphaPipeline``),
* ``"mmdit"`` -- Stable Diffusion 3 style (``StableDiffusion3Pipeline``, no T5 encoder).

Every component is randomly initialised from a fixed seed, so a pipeline is fully determined by
``(family, seed)``.  Nothing is downloaded: the tokenizer is a small CLIP-style byte-level BPE whose
vocabulary is generated locally from a word list.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from workbench.io import save_pretrained_atomically

__all__ = [
    "DEFAULT_WORDS",
    "TINY_FAMILIES",
    "TINY_RESOLUTION",
    "build_clip_tokenizer",
    "call_kwargs",
    "save_tiny_pipeline",
    "tiny_pipeline",
]

TINY_FAMILIES: tuple[str, ...] = ("unet", "dit", "mmdit")
"""Valid ``family`` names for :func:`tiny_pipeline`."""

TINY_RESOLUTION: int = 32
"""Default (and tested) image height and width, in pixels, of every tiny pipeline."""

DEFAULT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "in", "on", "with", "and", "at", "by",
    "photo", "picture", "painting", "drawing", "sketch", "style", "portrait", "image", "oil",
    "red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink",
    "circle", "square", "triangle", "star",
    "cat", "dog", "horse", "bird", "car", "house", "tree", "flower",
    "man", "woman", "person", "astronaut", "face",
    "riding", "sitting", "standing",
    "beach", "city", "forest", "mountain", "sky", "sun", "night", "water", "field",
    "small", "large", "bright", "dark",
)
"""Caption words that :func:`build_clip_tokenizer` turns into single tokens by default."""

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_WORD_END = "</w>"
_MAX_SEQUENCE_LENGTH = 32  # text tokens per prompt for PixArt's T5 and SD3's (absent) T5 slot
_LATENT_SIZE = TINY_RESOLUTION // 2  # every tiny VAE downsamples by 2


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_values, code_points = list(printable), list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Greedy BPE as CLIP runs it: repeatedly merge every occurrence of the best-ranked pair."""
    while len(symbols) > 1:
        pairs = {pair for pair in zip(symbols, symbols[1:]) if pair in ranks}
        if not pairs:
            break
        first, second = min(pairs, key=ranks.__getitem__)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def _word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Ranked merges under which each word's BPE ends as a single ``word</w>`` token.

    For each word in turn, BPE is simulated with the merges so far; while the result still has
    several symbols, the first two are joined by a new (lowest-priority) merge.  Without conflicts
    this is the plain left-to-right chain (``c a``, ``ca t</w>``); merges shared by several words
    are added once.  A merge appended later never fires on an earlier word, because that word
    always had a better-ranked merge available until it became a single token.
    """
    byte_chars = _bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words):
        if not word.isalpha():
            raise ValueError(f"tokenizer words must be letters only, got {word!r}")
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += _WORD_END
        symbols = _apply_bpe(symbols, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _apply_bpe(symbols, ranks)
    return merges


def build_clip_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77
) -> CLIPTokenizer:
    """A tiny CLIP-style byte-level BPE tokenizer in which each of ``words`` is one token.

    Vocabulary: the 256 byte characters, their ``</w>`` variants, one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (also the padding token, as in Stable Diffusion).
    Any text tokenizes: words outside ``words`` fall back to smaller pieces, down to single bytes.
    """
    base = list(_bytes_to_unicode().values())
    merges = _word_merges(words)
    tokens = base + [t + _WORD_END for t in base] + [a + b for a, b in merges] + [_BOS, _EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp, model_max_length=model_max_length, pad_token=_EOS
        )
    tokenizer.name_or_path = ""  # the temporary directory is gone
    return tokenizer


def _check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Run ``build`` with the torch RNG seeded, leaving the caller's global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _vae(latent_channels: int, **sd3_options: Any) -> AutoencoderKL:
    """Two-level AutoencoderKL: images of TINY_RESOLUTION px map to latents of _LATENT_SIZE."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
        **sd3_options,
    )


def _ddim_scheduler(**betas: Any) -> DDIMScheduler:
    """DDIM as Stable Diffusion configures it (``steps_offset=1`` avoids a deprecation warning)."""
    return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **betas)


def _clip_config(tokenizer: CLIPTokenizer, hidden_size: int, **extra: Any) -> CLIPTextConfig:
    """Two-layer CLIP text config sized to ``tokenizer`` (vocabulary, length, special ids)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _sd_pipeline(seed: int) -> StableDiffusionPipeline:
    tokenizer = build_clip_tokenizer()
    text_encoder = _seeded(seed, lambda: CLIPTextModel(_clip_config(tokenizer, 32)))
    unet = _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=_LATENT_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
    )
    vae = _seeded(seed, lambda: _vae(latent_channels=4))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim_scheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _pixart_pipeline(seed: int) -> PixArtAlphaPipeline:
    tokenizer = build_clip_tokenizer()
    text_encoder = _seeded(
        seed,
        lambda: T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        ),
    )
    transformer = _seeded(
        seed,
        lambda: PixArtTransformer2DModel(
            sample_size=_LATENT_SIZE,
            in_channels=4,
            out_channels=8,
            patch_size=2,
            num_layers=2,
            num_attention_heads=4,
            attention_head_dim=8,
            cross_attention_dim=32,
            caption_channels=32,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
    )
    vae = _seeded(seed, lambda: _vae(latent_channels=4))
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_ddim_scheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    )


def _sd3_pipeline(seed: int) -> StableDiffusion3Pipeline:
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    hidden_1, hidden_2 = 32, 48  # unequal on purpose, like SD3's CLIP-L and CLIP-G
    config_1 = _clip_config(tokenizer, hidden_1, projection_dim=hidden_1)
    config_2 = _clip_config(tokenizer_2, hidden_2, projection_dim=hidden_2)
    text_encoder = _seeded(seed, lambda: CLIPTextModelWithProjection(config_1))
    text_encoder_2 = _seeded(seed, lambda: CLIPTextModelWithProjection(config_2))
    transformer = _seeded(
        seed,
        lambda: SD3Transformer2DModel(
            sample_size=_LATENT_SIZE,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            num_attention_heads=4,
            attention_head_dim=8,
            joint_attention_dim=hidden_1 + hidden_2,
            caption_projection_dim=32,
            pooled_projection_dim=hidden_1 + hidden_2,
            pos_embed_max_size=_LATENT_SIZE // 2,
        ),
    )
    vae = _seeded(
        seed,
        lambda: _vae(
            latent_channels=16,
            shift_factor=0.0609,
            scaling_factor=1.5035,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "unet": _sd_pipeline,
    "dit": _pixart_pipeline,
    "mmdit": _sd3_pipeline,
}


def tiny_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """Build a tiny random-weight pipeline of ``family`` (one of :data:`TINY_FAMILIES`) on CPU.

    Weights depend only on ``seed``; the global torch RNG state is left as it was.  Models are in
    eval mode, as ``from_pretrained`` returns them.  Call the pipeline with
    ``**call_kwargs(family)`` to generate ``TINY_RESOLUTION``-pixel images.
    """
    _check_family(family)
    pipe = _BUILDERS[family](seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them; T5 has dropout
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(family: str, folder: str | os.PathLike, seed: int = 0) -> Path:
    """Build :func:`tiny_pipeline` and save it (safetensors) into ``folder``; return its path.

    ``folder`` must not exist or be empty.  The pipeline is written to a temporary sibling folder
    and renamed into place, so an interrupted save leaves nothing half-written at ``folder``.
    """
    _check_family(family)
    target = Path(folder)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder; not saving over it")
    pipe = tiny_pipeline(family, seed)
    return save_pretrained_atomically(pipe, target)


def call_kwargs(family: str) -> dict[str, Any]:
    """Keyword arguments a call of a ``family`` pipeline needs besides the prompt.

    Always ``height``/``width`` = :data:`TINY_RESOLUTION`; PixArt also gets no resolution binning,
    no caption cleaning and a short text length; SD3 gets the short text length.
    """
    _check_family(family)
    kwargs: dict[str, Any] = {"height": TINY_RESOLUTION, "width": TINY_RESOLUTION}
    if family == "dit":
        kwargs |= {
            "use_resolution_binning": False,
            "clean_caption": False,
            "max_sequence_length": _MAX_SEQUENCE_LENGTH,
        }
    elif family == "mmdit":
        kwargs["max_sequence_length"] = _MAX_SEQUENCE_LENGTH
    return kwargs
