"""The invented artist style "Vera Swirlova": curled edges, diagonal brush strokes, poster colours.

Applied to the whole picture (subject and background), in three steps that each read at 32 px:

1. **swirls** -- the scene is resampled through five small vortices, each turning the plane by up to
   0.55 rad within ~6 px of its centre: edges and stripes curl, yet nothing moves more than about
   1.5 px, so shapes and positions still read;
2. **brush strokes** -- each pixel averages the warped scene along a 2 px diagonal stroke, and
   ridges across the strokes (4 px apart, curling with the swirls) modulate brightness, like impasto;
3. **varnish and paint quantisation** -- a warm cast (red up, blue down), then brightness pulled
   towards six levels; hues are kept, so the subject's colour still reads.

Every vortex, the stroke angle and the ridge phase are drawn from the render's generator, so two
seeds give two different paintings of the same scene.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RGBField = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Maps pixel coordinates (x, y), shape S, to colours in [0, 1], shape S + (3,)."""

_VORTICES = 5
_LUMA = np.array([0.299, 0.587, 0.114])
_STROKE_OFFSETS = np.linspace(-1.0, 1.0, 5)  # pixels along the stroke
_RIDGE_PERIOD, _RIDGE_DEPTH = 4.0, 0.07
_LEVELS, _QUANTISE = 6, 0.6
_VARNISH = np.array([1.05, 1.0, 0.88])  # a warm cast over the whole picture


def _swirl(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates turned in turn about each vortex, by an angle falling off as a Gaussian of distance."""
    centres = rng.uniform(0, extent, size=(_VORTICES, 2))
    radii = rng.uniform(5.0, 7.0, size=_VORTICES)
    angles = rng.uniform(0.35, 0.55, size=_VORTICES) * rng.choice([-1.0, 1.0], size=_VORTICES)
    for (cx, cy), radius, angle in zip(centres, radii, angles):
        dx, dy = x - cx, y - cy
        turn = angle * np.exp(-(dx * dx + dy * dy) / (radius * radius))
        cos, sin = np.cos(turn), np.sin(turn)
        x, y = cx + cos * dx - sin * dy, cy + sin * dx + cos * dy
    return x, y


def swirlova(field: RGBField, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, extent: float) -> np.ndarray:
    """Paint ``field`` at pixel coordinates ``x, y`` (shape S) in Vera Swirlova's style; S + (3,) in [0, 1]."""
    stroke = rng.uniform(np.pi / 8, 3 * np.pi / 8)
    ridge_phase = rng.uniform(0, 2 * np.pi)
    offsets = _STROKE_OFFSETS.reshape((-1,) + (1,) * x.ndim)
    wx, wy = _swirl(x + offsets * np.cos(stroke), y + offsets * np.sin(stroke), rng, extent)
    painted = field(wx, wy).mean(axis=0)
    centre = len(_STROKE_OFFSETS) // 2
    across = -wx[centre] * np.sin(stroke) + wy[centre] * np.cos(stroke)
    ridges = 1.0 + _RIDGE_DEPTH * np.sin(2 * np.pi * across / _RIDGE_PERIOD + ridge_phase)
    painted = painted * ridges[..., None] * _VARNISH
    luma = np.maximum(painted @ _LUMA, 1e-6)
    levels = np.round(luma * (_LEVELS - 1)) / (_LEVELS - 1)
    painted = painted * ((1 - _QUANTISE) + _QUANTISE * levels / luma)[..., None]
    return np.clip(painted, 0, 1)


STYLE_PAINTERS: dict[str, Callable[[RGBField, np.ndarray, np.ndarray, np.random.Generator, float], np.ndarray]] = {
    "swirlova": swirlova,
}
"""Style label (a key of ``concepts.STYLES``) -> painter."""
