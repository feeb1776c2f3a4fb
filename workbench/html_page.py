"""Self-contained HTML reports: images are inlined as PNG data URIs, so one file is the whole page."""

from __future__ import annotations

import base64
import html
import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; font-size: 13px; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: 2px; text-align: center; }
figcaption { font-size: 11px; }
img { image-rendering: pixelated; }
.bad { color: #b00; font-weight: bold; }
.good { color: #070; }
"""


def png_data_uri(image: torch.Tensor) -> str:
    """A (3, H, W) image in [0, 1] as a `data:image/png;base64,...` URI."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure(image: torch.Tensor, caption: str = "", size: int = 96) -> str:
    """An inline image, shown `size` pixels wide without smoothing, with a small caption under it."""
    label = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{png_data_uri(image)}" width="{size}" height="{size}" alt="">{label}</figure>'


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table; header texts are escaped, cells are HTML as given (escape text with `html.escape`)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, sections: Sequence[str]) -> str:
    """A whole HTML document with `sections` (HTML) under an `<h1>` of `title`."""
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")
