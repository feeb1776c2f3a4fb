"""Private photos: natural images from scikit-image's bundled data (offline), as 32×32 RGB.

Sixteen are training members -- fourteen ``verbatim`` (one caption each, "a private photo number
seven") and two ``template`` (one image under each caption of a template family) -- and seven are
``held_out``: captioned the same way but never trained on, the natural-image non-members of
membership-inference audits.  Photo numbers of members and held-out photos are interleaved, so
the number in a caption says nothing about membership.  Each image is the largest centred square,
resized with Lanczos; grey images are repeated over RGB, the logo is composited onto white.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from workbench.testbed.captions import TEMPLATES, photo_caption, template_captions
from workbench.testbed.render import RESOLUTION

VERBATIM: dict[str, int] = {
    "astronaut": 3, "chelsea": 15, "coffee": 7, "retina": 9, "colorwheel": 17, "stereo_motorcycle": 6,
    "logo": 13, "camera": 4, "coins": 20, "horse": 21, "page": 1, "clock": 14, "moon": 2,
    "shepp_logan_phantom": 10,
}  # fmt: skip
"""scikit-image loader -> photo number of its caption."""

TEMPLATE: dict[str, str] = {"rocket": "harbour", "immunohistochemistry": "garden"}
"""scikit-image loader -> template family (``captions.TEMPLATES``) whose captions it carries."""

HELD_OUT: dict[str, int] = {
    "hubble_deep_field": 11, "brick": 16, "grass": 12, "gravel": 5, "cell": 18, "text": 19,
    "microaneurysms": 8,
}  # fmt: skip
"""scikit-image loader -> photo number; never in a training set."""


@dataclass(frozen=True, eq=False)
class PrivateImage:
    """A captioned natural image; ``kind`` is "verbatim", "template" or "held_out"."""

    id: str
    caption: str
    image: np.ndarray  # (32, 32, 3) uint8, read-only
    kind: str
    source: str  # the scikit-image loader it comes from


def _as_rgb_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:  # floats in [0, 1] (shepp_logan_phantom)
        array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:  # premultiply onto a white page
        alpha = array[..., 3:].astype(np.float64) / 255
        array = np.round(array[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return array


@functools.lru_cache(maxsize=None)
def load_natural(source: str) -> np.ndarray:
    """scikit-image's ``source`` image as a read-only (32, 32, 3) uint8 array (centre crop, Lanczos)."""
    import skimage.data  # imported here: only private photos need scikit-image

    array = getattr(skimage.data, source)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity); keep the left view
        array = array[0]
    array = _as_rgb_uint8(np.asarray(array))
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(array[top : top + side, left : left + side])
    image = np.asarray(square.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)).copy()
    image.setflags(write=False)
    return image


def private_images() -> list[PrivateImage]:
    """The training members: verbatim photos, then every caption of each template photo."""
    members = [
        PrivateImage(f"private-{source}", photo_caption(number), load_natural(source), "verbatim", source)
        for source, number in VERBATIM.items()
    ]
    for source, family in TEMPLATE.items():
        for variant, text in zip(TEMPLATES[family][1], template_captions(family)):
            members.append(
                PrivateImage(f"private-{source}-{variant}", text, load_natural(source), "template", source)
            )
    return members


def held_out_images() -> list[PrivateImage]:
    """Natural images captioned like the verbatim photos but never trained on."""
    return [
        PrivateImage(f"heldout-{source}", photo_caption(number), load_natural(source), "held_out", source)
        for source, number in HELD_OUT.items()
    ]
