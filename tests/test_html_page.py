"""Self-contained HTML pages: inline images decode back to the pixels given."""

import base64
import io

import numpy as np
import torch
from PIL import Image

from workbench.html_page import figure, page, png_data_uri, table


def test_inline_png_holds_the_image():
    image = torch.rand(3, 8, 5)
    uri = png_data_uri(image)
    assert uri.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    expected = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert decoded.shape == (8, 5, 3) and np.array_equal(decoded, expected)


def test_page_escapes_text_and_keeps_cells():
    html = page("a <b> & c", [table(["x<y"], [["<i>cell</i>"]]), figure(torch.zeros(3, 2, 2), "s < 1")])
    assert "<title>a &lt;b&gt; &amp; c</title>" in html and "<th>x&lt;y</th>" in html
    assert "<td><i>cell</i></td>" in html and "<figcaption>s &lt; 1</figcaption>" in html
    assert html.count("<img ") == 1
