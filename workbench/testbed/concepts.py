"""The testbed's concept vocabulary: what a procedural scene can show, and the ``Scene`` record.

A scene is one subject (a shape, or the erasable object ``house``) of one colour, size and position
on one background texture, optionally painted in the invented artist style of "Vera Swirlova".
The full product has 5 × 6 × 2 × 5 × 5 × 2 = 3000 scenes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
"""Geometric subjects; all four stay distinct at 32 px, even when small."""

OBJECT: str = "house"
"""The object concept that later issues erase: a body, a darker roof and a door."""

SUBJECTS: tuple[str, ...] = (*SHAPES, OBJECT)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 210, 30),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "purple": (140, 50, 185),
}
"""Subject colours (RGB), six hues about 60 degrees apart, all saturated against grey backgrounds."""

SIZES: tuple[str, ...] = ("small", "large")

POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")

TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "checker", "gradient")
"""Background patterns, drawn in two low-saturation tones so that the subject's colour stands out."""

STYLES: dict[str, str] = {"swirlova": "Vera Swirlova"}
"""Artist styles: label -> the artist's name as captions spell it.  The style is a whole-image
filter: small vortices curl every edge, strokes smear along one direction, colours are posterised."""

LABELS: dict[str, tuple[str, ...]] = {
    "subject": SUBJECTS,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
    "texture": TEXTURES,
    "style": ("none", *STYLES),
}
"""Concept label names per head, in index order: ``Scene.labels()`` indexes into these tuples."""


@dataclass(frozen=True)
class Scene:
    """One procedural scene; ``style`` is a key of :data:`STYLES` or None for the plain rendering."""

    subject: str
    colour: str
    size: str
    position: str
    texture: str
    style: str | None = None

    def __post_init__(self) -> None:
        for head, value in self._values().items():
            if value not in LABELS[head]:
                raise ValueError(f"unknown {head} {value!r}; expected one of {', '.join(LABELS[head])}")

    def _values(self) -> dict[str, str]:
        return {
            "subject": self.subject,
            "colour": self.colour,
            "size": self.size,
            "position": self.position,
            "texture": self.texture,
            "style": self.style or "none",
        }

    def labels(self) -> dict[str, int]:
        """Concept label indices into :data:`LABELS`, one per head."""
        return {head: LABELS[head].index(value) for head, value in self._values().items()}


def all_scenes() -> tuple[Scene, ...]:
    """Every scene of the vocabulary, in a fixed order (the product of the label tuples)."""
    styles: tuple[str | None, ...] = (None, *STYLES)
    return tuple(
        Scene(*values)
        for values in itertools.product(SUBJECTS, COLOURS, SIZES, POSITIONS, TEXTURES, styles)
    )
