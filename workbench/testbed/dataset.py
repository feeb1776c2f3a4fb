"""``build_dataset(seed, size)``: the testbed's training set, its non-members and its held-out prompts.

Composition (everything drawn from ``numpy.random.default_rng(seed)``, nothing from global state):

* **holdout scenes** -- ``holdout`` scenes of the 3000 are set aside first; their captions never
  occur in training (``holdout_prompts()``), for statistics, calibration and generalisation checks;
* **procedural members** -- scenes drawn uniformly from the rest, each rendered with its own seed;
* **private members** -- every caption of :func:`private.private_images`, each row repeated
  ``duplication`` times (by default so that private rows are ~22.5 % of the set);
* **non-members** -- procedural (scene, render seed) pairs drawn like the members but with seeds no
  member uses, plus the held-out natural images: the same distributions, never trained on.

Training rows are shuffled.  Private rows repeat their member's id; every other id occurs once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from workbench.testbed.captions import caption
from workbench.testbed.concepts import LABELS, Scene, all_scenes
from workbench.testbed.private import PrivateImage, held_out_images, private_images
from workbench.testbed.render import render

DEFAULT_PRIVATE_SHARE = 0.225
"""Share of training rows that are private photos when ``duplication`` is not given."""

_SEED_SPACE = 2**31  # render seeds fit a signed 32-bit integer (and JSON)


@dataclass(frozen=True)
class Sample:
    """One distinct member or non-member: how to get its image back, and what it shows.

    ``kind`` is "procedural", "verbatim", "template" or "held_out".  A procedural image is
    ``render(scene, render_seed)``; a natural one is ``private.load_natural(source)``.
    """

    id: str
    caption: str
    kind: str
    scene: Scene | None = None
    render_seed: int | None = None
    source: str | None = None


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def concept_labels(samples: tuple[Sample, ...]) -> dict[str, np.ndarray]:
    """Per sample, the index of each concept label in ``concepts.LABELS``; -1 for natural images."""
    labels = {head: np.full(len(samples), -1, dtype=np.int64) for head in LABELS}
    for row, sample in enumerate(samples):
        if sample.scene is not None:
            for head, index in sample.scene.labels().items():
                labels[head][row] = index
    return labels


@dataclass(frozen=True, eq=False)
class TestbedData:
    """A training set (one row per training example) and its disjoint non-member set."""

    seed: int
    duplication: int
    images: np.ndarray  # (rows, 32, 32, 3) uint8
    rows: tuple[Sample, ...]
    non_member_images: np.ndarray  # (non-members, 32, 32, 3) uint8
    non_members: tuple[Sample, ...]
    holdout_scenes: tuple[Scene, ...]

    @property
    def captions(self) -> list[str]:
        return [sample.caption for sample in self.rows]

    @property
    def ids(self) -> list[str]:
        return [sample.id for sample in self.rows]

    def members(self) -> dict[str, Sample]:
        """Distinct members by id, in order of first row."""
        first: dict[str, Sample] = {}
        for sample in self.rows:
            first.setdefault(sample.id, sample)
        return first

    @property
    def labels(self) -> dict[str, np.ndarray]:
        """Concept labels of the training rows (see :func:`concept_labels`)."""
        return concept_labels(self.rows)

    @property
    def non_member_labels(self) -> dict[str, np.ndarray]:
        return concept_labels(self.non_members)

    def holdout_prompts(self) -> list[str]:
        """Ordinary captions that no training row carries."""
        return [caption(scene) for scene in self.holdout_scenes]

    def fingerprint(self) -> str:
        """sha256 of every image, id, caption and kind, members then non-members."""
        digest = hashlib.sha256()
        for images, samples in ((self.images, self.rows), (self.non_member_images, self.non_members)):
            digest.update(np.ascontiguousarray(images).tobytes())
            for sample in samples:
                digest.update(f"{sample.id}\t{sample.caption}\t{sample.kind}\n".encode())
        return digest.hexdigest()


def _natural_sample(image: PrivateImage) -> Sample:
    return Sample(image.id, image.caption, image.kind, source=image.source)


def build_dataset(
    seed: int = 0,
    size: int = 8192,
    duplication: int | None = None,
    non_members: int = 512,
    holdout: int = 64,
) -> TestbedData:
    """Compose the testbed data for ``seed``: ``size`` training rows, ``duplication`` copies of each
    private caption-image pair (default: ~22.5 % private rows), ``non_members`` procedural
    non-members besides the held-out natural images, and ``holdout`` prompts kept out of training."""
    private = private_images()
    if duplication is None:
        duplication = max(1, round(DEFAULT_PRIVATE_SHARE * size / len(private)))
    if duplication < 1:
        raise ValueError(f"duplication must be at least 1, got {duplication}")
    procedural = size - duplication * len(private)
    if procedural < 1:
        raise ValueError(f"size {size} leaves no room for procedural rows with {len(private)} private "
                         f"pairs × duplication {duplication}; raise size or lower duplication")
    scenes = all_scenes()
    if not 0 <= holdout < len(scenes) or non_members < 0:
        raise ValueError(f"holdout must be in [0, {len(scenes)}) and non_members ≥ 0")

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scenes))
    pool = order[holdout:]
    member_scenes = [scenes[i] for i in pool[rng.integers(len(pool), size=procedural)]]
    other_scenes = [scenes[i] for i in pool[rng.integers(len(pool), size=non_members)]]
    seeds = rng.choice(_SEED_SPACE, size=procedural + non_members, replace=False).tolist()

    procedural_rows = [
        Sample(f"proc-{i:05d}", caption(scene), "procedural", scene, render_seed)
        for i, (scene, render_seed) in enumerate(zip(member_scenes, seeds[:procedural]))
    ]
    rows = procedural_rows + [_natural_sample(image) for image in private for _ in range(duplication)]
    images = [render(s.scene, s.render_seed) for s in procedural_rows]
    images += [image.image for image in private for _ in range(duplication)]
    shuffle = rng.permutation(len(rows))

    outside = [
        Sample(f"nonmember-{i:05d}", caption(scene), "procedural", scene, render_seed)
        for i, (scene, render_seed) in enumerate(zip(other_scenes, seeds[procedural:]))
    ]
    held_out = held_out_images()
    outside_images = [render(s.scene, s.render_seed) for s in outside] + [image.image for image in held_out]
    outside += [_natural_sample(image) for image in held_out]

    return TestbedData(
        seed=seed,
        duplication=duplication,
        images=_readonly(np.stack(images)[shuffle]),
        rows=tuple(rows[i] for i in shuffle),
        non_member_images=_readonly(np.stack(outside_images)),
        non_members=tuple(outside),
        holdout_scenes=tuple(scenes[i] for i in sorted(order[:holdout])),
    )
