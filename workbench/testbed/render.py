"""``render(scene, seed)``: a 32×32 RGB picture of a scene, exact for a seed, different across seeds.

The seed jitters everything a caption does not pin down: the subject's exact centre (±1.5 px), size
(±10 %), tilt, colour (σ ≈ 10 of 255 per channel) and shading, the background's grey level, tint and
contrast, the texture's period, phase and orientation, and (in a separate stream, so that the
styled and plain renders of one seed share their geometry) the artist style's strokes and swirls.
The scene is a continuous field sampled at pixel centres, with one-pixel anti-aliasing ramps; a
faint paper grain (also seed-specific) lies over the finished picture.
"""

from __future__ import annotations

import numpy as np

from workbench.testbed.concepts import COLOURS, Scene
from workbench.testbed.shapes import subject_layers
from workbench.testbed.style import STYLE_PAINTERS, RGBField
from workbench.testbed.textures import make_grain, make_texture

RESOLUTION = 32
"""Image height and width in pixels."""

_RADIUS = {"small": 5.5, "large": 10.0}  # pixels, before the ±10 % jitter
_OFFSET = {"small": 8.5, "large": 6.0}  # pixels from the centre for left/right/top/bottom
_DIRECTION = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
_GRAIN = 0.02  # standard deviation of the paper grain, in [0, 1] intensity units
_MAX_TILT = {"circle": 0.0, "square": 0.2, "triangle": 0.2, "cross": 0.2, "house": 0.08}  # radians


def _scene_field(scene: Scene, rng: np.random.Generator) -> RGBField:
    """The scene as a colour field over pixel coordinates, its free parameters drawn from ``rng``."""
    radius = _RADIUS[scene.size] * rng.uniform(0.9, 1.1)
    dx, dy = _DIRECTION[scene.position]
    cx, cy = RESOLUTION / 2 + _OFFSET[scene.size] * np.array([dx, dy]) + rng.uniform(-1.5, 1.5, size=2)
    tilt = _MAX_TILT[scene.subject] * rng.uniform(-1, 1)
    colour = np.clip(np.array(COLOURS[scene.colour]) / 255 + rng.normal(0, 0.04, size=3), 0, 1)
    light_angle, light = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.12)
    grey = rng.uniform(0.38, 0.68)
    tone_a = np.clip(grey + rng.normal(0, 0.035, size=3), 0, 1)
    tone_b = np.clip(tone_a + np.sign(0.53 - grey) * rng.uniform(0.14, 0.22), 0, 1)
    texture = make_texture(scene.texture, rng, RESOLUTION)
    cos, sin = np.cos(tilt), np.sin(tilt)

    def field(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        mix = texture(x, y)[..., None]
        image = tone_a * (1 - mix) + tone_b * mix
        u = cos * (x - cx) + sin * (y - cy)
        v = -sin * (x - cx) + cos * (y - cy)
        shading = 1 + light * (u * np.cos(light_angle) + v * np.sin(light_angle)) / radius
        for distance, shade in subject_layers(scene.subject, u, v, radius):
            cover = np.clip(0.5 - distance, 0, 1)[..., None]
            paint = np.clip(colour * shade * shading[..., None], 0, 1)
            image = image * (1 - cover) + paint * cover
        return image

    return field


def render(scene: Scene, seed: int) -> np.ndarray:
    """The (32, 32, 3) uint8 picture of ``scene`` for ``seed`` (a non-negative integer)."""
    if seed < 0:
        raise ValueError(f"render seeds are non-negative integers, got {seed}")
    rng = np.random.default_rng([seed, 0])
    field = _scene_field(scene, rng)
    grain = make_grain(rng, _GRAIN)
    y, x = np.mgrid[0:RESOLUTION, 0:RESOLUTION] + 0.5
    if scene.style is None:
        image = field(x, y)
    else:
        image = STYLE_PAINTERS[scene.style](field, x, y, np.random.default_rng([seed, 1]), RESOLUTION)
    image = image + grain(x, y)[..., None]  # on the paper, so over any style
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
