"""Background textures and paper grain, as continuous fields of pixel coordinates.

A texture returns a mix weight in [0, 1] between the two background tones, at any coordinates, so
that a warp (the artist style) can resample it; its period, phase and orientation are drawn from
the render's generator, and every edge is a ramp about one pixel wide (no aliasing at 32 px).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Field = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Maps pixel coordinates (x, y), any equal shapes, to a value per coordinate."""


def make_texture(texture: str, rng: np.random.Generator, extent: float) -> Field:
    """The mix-weight field of ``texture`` on an ``extent``-pixel square canvas, jittered by ``rng``."""
    if texture == "plain":
        return lambda x, y: np.zeros(np.broadcast(x, y).shape)
    if texture == "stripes":
        angle, period, phase = rng.uniform(0, np.pi), rng.uniform(5.0, 7.0), rng.uniform(0, 2 * np.pi)
        cos, sin = np.cos(angle), np.sin(angle)
        return lambda x, y: np.clip(0.5 + 1.5 * np.sin(2 * np.pi * (x * cos + y * sin) / period + phase), 0, 1)
    if texture == "dots":
        spacing, radius = rng.uniform(6.0, 8.0), rng.uniform(1.4, 1.9)
        ox, oy = rng.uniform(0, spacing, size=2)

        def dots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            dx = (x - ox) % spacing - spacing / 2
            dy = (y - oy) % spacing - spacing / 2
            return np.clip(radius - np.hypot(dx, dy) + 0.5, 0, 1)

        return dots
    if texture == "checker":
        cell = rng.uniform(4.0, 6.0)
        px, py = rng.uniform(0, 2 * np.pi, size=2)
        return lambda x, y: np.clip(0.5 + 3.0 * np.sin(np.pi * x / cell + px) * np.sin(np.pi * y / cell + py), 0, 1)
    if texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        cos, sin, centre = np.cos(angle), np.sin(angle), extent / 2
        return lambda x, y: np.clip(0.5 + ((x - centre) * cos + (y - centre) * sin) / (0.9 * extent), 0, 1)
    raise ValueError(f"unknown texture {texture!r}")


def make_grain(rng: np.random.Generator, strength: float, waves: int = 16) -> Field:
    """Paper grain: a sum of ``waves`` random plane waves 2.5-6 px long, standard deviation ``strength``.

    It gives flat areas a seed-specific fine structure, so that two renders of one caption are never
    near-identical under windowed similarity measures such as SSIM.
    """
    angles = rng.uniform(0, 2 * np.pi, size=waves)
    frequencies = 2 * np.pi / rng.uniform(2.5, 6.0, size=waves)
    kx, ky = frequencies * np.cos(angles), frequencies * np.sin(angles)
    phases = rng.uniform(0, 2 * np.pi, size=waves)
    amplitude = strength * np.sqrt(2.0 / waves)

    def grain(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        waves_at = np.sin(x[..., None] * kx + y[..., None] * ky + phases)
        return amplitude * waves_at.sum(axis=-1)

    return grain
