"""Each family end to end: build tiny pipeline -> save -> load -> graph -> record -> ablate -> generate."""

import pytest
import torch

import workbench
from workbench import intervene, sampling
from workbench.testing import TINY_FAMILIES, save_tiny_pipeline

TEXT_VALUES = {"unet": "cross_attn_value", "dit": "cross_attn_value", "mmdit": "context_value"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_end_to_end(family, tmp_path):
    folder = save_tiny_pipeline(family, tmp_path / "model")
    model = workbench.load(folder)
    assert model.family == family

    model.graph.save(tmp_path / "graph.json")
    graph = workbench.NeuronGraph.load(tmp_path / "graph.json")
    values = graph.select(roles=[TEXT_VALUES[family]])
    assert values and [s.path for s in values] == [s.path for s in model.graph.select(roles=[TEXT_VALUES[family]])]

    prompts = ["a red circle", "a photo of a cat"]
    with intervene.record(model, values, branch="cond") as recording:
        base = sampling.generate(model, prompts, steps=2, guidance_scale=3.0)
    stats = recording.stats[values[0].path]
    assert stats.mean.shape == (values[0].out_features,) and int(stats.count) > 0

    top = workbench.NeuronSet({s.path: torch.topk(recording.stats[s.path].mean_abs, 4).indices for s in values})
    graph.annotate(top, "mean_abs", {p: recording.stats[p].mean_abs[list(i)] for p, i in top.items()})
    assert graph.neurons("mean_abs") == top
    with intervene.ablate(model, top):
        ablated = sampling.generate(model, prompts, steps=2, guidance_scale=3.0)
    assert (ablated - base).abs().max() > 1e-4
    assert torch.equal(sampling.generate(model, prompts, steps=2, guidance_scale=3.0), base)

    sampling.save_image(ablated[0], tmp_path / "ablated.png")
    assert (tmp_path / "ablated.png").stat().st_size > 0
