"""Signed distances (in pixels, negative inside) of the subjects, for anti-aliased rendering.

A subject is a list of layers painted in order, each a signed distance field and a shade that
multiplies the subject's colour (the house's roof is darker than its body, its door darker still).
Coverage of a pixel is ``clip(0.5 - distance, 0, 1)``: a one-pixel ramp across every edge.
"""

from __future__ import annotations

import numpy as np

Layer = tuple[np.ndarray, float]
"""(signed distance per sample, shade multiplying the subject colour)."""

_SQRT3 = float(np.sqrt(3.0))


def _rectangle(u: np.ndarray, v: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Exact signed distance to the axis-aligned rectangle [x0, x1] × [y0, y1]."""
    qx = np.abs(u - (x0 + x1) / 2) - (x1 - x0) / 2
    qy = np.abs(v - (y0 + y1) / 2) - (y1 - y0) / 2
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _convex_polygon(u: np.ndarray, v: np.ndarray, vertices: list[tuple[float, float]]) -> np.ndarray:
    """Largest signed distance to the edge lines of a convex polygon (vertices clockwise on screen).

    Exact inside and along the edges, which is all a one-pixel coverage ramp needs.
    """
    distance = np.full(np.broadcast(u, v).shape, -np.inf)
    for (ax, ay), (bx, by) in zip(vertices, vertices[1:] + vertices[:1]):
        ex, ey = bx - ax, by - ay
        length = np.hypot(ex, ey)
        # the outward normal of an edge of a clockwise (y-down) polygon is (ey, -ex) / length
        distance = np.maximum(distance, ((u - ax) * ey - (v - ay) * ex) / length)
    return distance


def subject_layers(subject: str, u: np.ndarray, v: np.ndarray, radius: float) -> list[Layer]:
    """Layers of ``subject`` at local coordinates ``u, v`` (pixels from its centre, y down)."""
    r = radius
    if subject == "circle":
        return [(np.hypot(u, v) - r, 1.0)]
    if subject == "square":
        side = 0.85 * r
        return [(_rectangle(u, v, -side, -side, side, side), 1.0)]
    if subject == "triangle":  # equilateral, pointing up, centroid at the centre
        c = 1.15 * r
        corners = [(0.0, -c), (c * _SQRT3 / 2, c / 2), (-c * _SQRT3 / 2, c / 2)]
        return [(_convex_polygon(u, v, corners), 1.0)]
    if subject == "cross":
        arm, half_width = r, 0.32 * r
        bars = np.minimum(
            _rectangle(u, v, -arm, -half_width, arm, half_width),
            _rectangle(u, v, -half_width, -arm, half_width, arm),
        )
        return [(bars, 1.0)]
    if subject == "house":
        roof = [(-r, -0.1 * r), (0.0, -0.95 * r), (r, -0.1 * r)]
        return [
            (_rectangle(u, v, -0.75 * r, -0.15 * r, 0.75 * r, 0.85 * r), 1.0),
            (_convex_polygon(u, v, roof), 0.55),
            (_rectangle(u, v, -0.2 * r, 0.35 * r, 0.2 * r, 0.85 * r), 0.2),
        ]
    raise ValueError(f"unknown subject {subject!r}")
