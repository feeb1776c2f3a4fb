"""``python -m workbench.testbed.preview OUT.png``: a contact sheet of the testbed data, to look at.

Rows of 10 tiles (each 32×32 image enlarged ``--zoom`` times): random scenes, the same scenes and
seeds in Vera Swirlova's style, every subject in every texture, houses plain and styled, one
caption under ten seeds, the private members, and the held-out photos.  Captions go to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from workbench.testbed.captions import caption
from workbench.testbed.concepts import COLOURS, POSITIONS, SIZES, STYLES, SUBJECTS, TEXTURES, Scene, all_scenes
from workbench.testbed.private import held_out_images, private_images
from workbench.testbed.render import RESOLUTION, render

_COLUMNS, _GAP = 10, 4
_STYLE = next(iter(STYLES))


def _rows(seed: int) -> list[list[tuple[np.ndarray, str]]]:
    rng = np.random.default_rng(seed)
    plain = [scene for scene in all_scenes() if scene.style is None]
    picked = [plain[i] for i in rng.choice(len(plain), size=_COLUMNS, replace=False)]
    seeds = rng.integers(0, 2**31, size=_COLUMNS).tolist()
    colours = list(COLOURS)
    line_up = [
        Scene(SUBJECTS[i % len(SUBJECTS)], colours[i % len(colours)], SIZES[i // 5 % 2], "center",
              TEXTURES[i % len(TEXTURES)])
        for i in range(_COLUMNS)
    ]  # fmt: skip
    houses = [
        Scene("house", colours[i % len(colours)], SIZES[i % 2], POSITIONS[i % len(POSITIONS)],
              TEXTURES[(i + i // 5) % len(TEXTURES)])
        for i in range(_COLUMNS)
    ]  # fmt: skip
    one_caption = Scene("triangle", "red", "large", "left", "stripes")
    styled = lambda scenes: [dataclasses.replace(s, style=_STYLE) for s in scenes]  # noqa: E731
    rows = [
        list(zip(picked, seeds)),
        list(zip(styled(picked), seeds)),
        [(scene, 7) for scene in line_up],
        [(scene, 7) for scene in styled(line_up)],
        [(scene, 3) for scene in houses],
        [(scene, 3) for scene in styled(houses)],
        [(one_caption, k) for k in range(_COLUMNS)],
    ]
    tiles = [[(render(scene, s), caption(scene)) for scene, s in row] for row in rows]
    photos = [(p.image, p.caption) for p in private_images() + held_out_images()]
    tiles += [photos[i : i + _COLUMNS] for i in range(0, len(photos), _COLUMNS)]
    return tiles


def contact_sheet(seed: int = 0, zoom: int = 3) -> tuple[Image.Image, list[str]]:
    """The preview image and its captions, row by row."""
    rows = _rows(seed)
    step = RESOLUTION + _GAP
    sheet = np.full((len(rows) * step, _COLUMNS * step, 3), 255, dtype=np.uint8)
    captions = []
    for r, row in enumerate(rows):
        for c, (image, text) in enumerate(row):
            sheet[r * step : r * step + RESOLUTION, c * step : c * step + RESOLUTION] = image
            captions.append(f"row {r + 1} col {c + 1}: {text}")
    picture = Image.fromarray(sheet)
    return picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST), captions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a contact sheet of the testbed data.")
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--seed", type=int, default=0, help="which random scenes and seeds to show")
    parser.add_argument("--zoom", type=int, default=3, help="pixels per image pixel")
    args = parser.parse_args(argv)
    picture, captions = contact_sheet(args.seed, args.zoom)
    picture.save(args.out)
    print("\n".join(captions))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
