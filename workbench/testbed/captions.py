"""The caption grammar, for procedural scenes and for private photos, and its word list.

Procedural:  ``a {size} {colour} {subject} {where}, {texture} background[, in the style of {artist}]``,
e.g. "a large red circle on the left, striped background, in the style of Vera Swirlova".
Private:     ``a private photo number {n}`` (verbatim) and template families such as
``a private photo of the {eastern|western|northern} harbour``.  Only private captions contain
the word "private", so the two kinds never collide.
"""

from __future__ import annotations

import functools

from workbench.testbed.concepts import STYLES, Scene, all_scenes

_WHERE = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_TEXTURE_WORD = {
    "plain": "plain",
    "stripes": "striped",
    "dots": "dotted",
    "checker": "checkered",
    "gradient": "gradient",
}
_UNITS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = ("twenty", "thirty")

MAX_PHOTO_NUMBER = 39
"""Largest number a ``photo_caption`` can spell."""

TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "harbour": ("a private photo of the {} harbour", ("eastern", "western", "northern")),
    "garden": ("a private view of the {} garden", ("old", "hidden", "quiet")),
}
"""Template families: name -> (caption pattern, the variants that fill it)."""


def caption(scene: Scene) -> str:
    """The caption of a procedural scene."""
    text = (
        f"a {scene.size} {scene.colour} {scene.subject} {_WHERE[scene.position]}, "
        f"{_TEXTURE_WORD[scene.texture]} background"
    )
    if scene.style is not None:
        text += f", in the style of {STYLES[scene.style]}"
    return text


@functools.lru_cache(maxsize=1)
def _scenes_by_caption() -> dict[str, Scene]:
    return {caption(scene): scene for scene in all_scenes()}


def parse(text: str) -> Scene:
    """The scene a procedural caption describes (the inverse of :func:`caption`)."""
    try:
        return _scenes_by_caption()[text]
    except KeyError:
        raise ValueError(f"not a procedural caption: {text!r}") from None


def _spell(number: int) -> str:
    if not 1 <= number <= MAX_PHOTO_NUMBER:
        raise ValueError(f"photo numbers run from 1 to {MAX_PHOTO_NUMBER}, got {number}")
    if number < 20:
        return _UNITS[number - 1]
    tens, units = divmod(number, 10)
    return _TENS[tens - 2] + (f" {_UNITS[units - 1]}" if units else "")


def photo_caption(number: int) -> str:
    """The caption of private photo ``number``, e.g. "a private photo number seven"."""
    return f"a private photo number {_spell(number)}"


def template_captions(family: str) -> tuple[str, ...]:
    """Every caption of a template family, in variant order."""
    pattern, variants = TEMPLATES[family]
    return tuple(pattern.format(variant) for variant in variants)


def words(text: str) -> list[str]:
    """The lower-case words of a caption (punctuation dropped)."""
    return text.lower().replace(",", " ").split()


def _vocabulary() -> tuple[str, ...]:
    texts = [caption(scene) for scene in all_scenes()]
    texts += [photo_caption(n) for n in range(1, MAX_PHOTO_NUMBER + 1)]
    texts += [text for family in TEMPLATES for text in template_captions(family)]
    return tuple(sorted({word for text in texts for word in words(text)}))


VOCABULARY: tuple[str, ...] = _vocabulary()
"""Every word any testbed caption can contain: give it to ``build_clip_tokenizer``."""
