"""Cross-attention layer ablation and attention entropy, checked against exact identities."""

import math

import pytest
import torch

from localization.ablation import (attention_entropy, cross_attention_layers, layer_ablation, memorization_score,
                                   rank_layers)
from localization.detection import NemoConfig
from workbench.intervene import ablate
from workbench.neurons import NeuronSet
from workbench.sampling import predict


@pytest.mark.parametrize("family", ["unet", "dit"])
def test_every_layer_on_the_null_prompt_equals_the_null_prompt(tiny_folders, family):
    import workbench
    from contextlib import ExitStack

    model = workbench.load(tiny_folders[family])
    latents = torch.randn(2, model.denoiser.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    empty = predict(model, latents, 500, ["", ""])
    with ExitStack() as stack:
        for layer in cross_attention_layers(model):
            stack.enter_context(layer_ablation(model, layer, "null"))
        ablated = predict(model, latents, 500, ["a red circle", "a blue square"])
    assert torch.allclose(ablated, empty, atol=1e-5)
    assert not torch.allclose(predict(model, latents, 500, ["a red circle", "a blue square"]), empty, atol=1e-3)


def test_zero_mode_equals_zeroing_every_output_neuron_of_the_layer(unet_model):
    layer = cross_attention_layers(unet_model)[1]
    out = f"{layer.path}.to_out.0"  # the attention's output projection (bias included)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with ablate(unet_model, NeuronSet({out: range(unet_model.graph.site(out).out_features)})):
        expected = predict(unet_model, latents, 500, ["a red circle"])
    with layer_ablation(unet_model, layer, "zero"):
        got = predict(unet_model, latents, 500, ["a red circle"])
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, predict(unet_model, latents, 500, ["a red circle"]), atol=1e-4)


def test_rank_layers_sorts_by_drop(unet_model):
    ranking = rank_layers(unet_model, memorization_score(unet_model, ["a red circle"], NemoConfig(n_seeds=3)))
    assert len(ranking) == len(cross_attention_layers(unet_model))
    drops = [r["drop"] for r in ranking]
    assert drops == sorted(drops, reverse=True) and all(r["base"] == ranking[0]["base"] for r in ranking)


def test_entropy_is_log_tokens_when_keys_are_zero(unet_model):
    entropy = attention_entropy(unet_model, ["a red circle"], steps=2)
    tokens = unet_model.pipeline.tokenizer.model_max_length
    assert all(0 <= e <= math.log(tokens) + 1e-6 for e in entropy.values())
    keys = NeuronSet({layer.key: range(unet_model.graph.site(layer.key).out_features)
                      for layer in cross_attention_layers(unet_model)})
    with ablate(unet_model, keys):  # zero keys: uniform attention over every token
        uniform = attention_entropy(unet_model, ["a red circle"], steps=2)
    assert all(e == pytest.approx(math.log(tokens), abs=1e-5) for e in uniform.values())


def test_mmdit_null_mode_gives_the_layer_the_empty_prompts_text_keys_and_values(tiny_folders):
    import workbench

    model = workbench.load(tiny_folders["mmdit"])
    layer = cross_attention_layers(model)[1]
    assert layer.key.endswith("add_k_proj") and layer.value.endswith("add_v_proj") and layer.query.endswith("to_q")
    latents = torch.randn(2, model.denoiser.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts, record = ["a red circle", "a blue square"], {}

    def capture():  # registered last, a hook sees the outputs the attention goes on to use
        return [model.denoiser.get_submodule(path).register_forward_hook(
            lambda m, a, out, path=path: record.__setitem__(path, out)) for path in (layer.key, layer.value)]

    def run(texts):
        handles = capture()
        out = predict(model, latents, 500, texts)
        for handle in handles:
            handle.remove()
        return out, dict(record)
    _, empty = run(["", ""])
    plain, prompted = run(prompts)
    with layer_ablation(model, layer, "null"):
        ablated, used = run(prompts)
    for path in (layer.key, layer.value):
        assert torch.allclose(used[path], empty[path], atol=1e-6)
        assert not torch.allclose(prompted[path], empty[path], atol=1e-4)
    assert not torch.allclose(ablated, plain, atol=1e-5)
    with layer_ablation(model, layer, "zero"):
        assert not torch.allclose(predict(model, latents, 500, prompts), plain, atol=1e-5)


def test_mmdit_entropy_is_over_the_text_tokens(tiny_folders):
    import workbench
    from workbench.sampling import encode

    model = workbench.load(tiny_folders["mmdit"])
    layers = cross_attention_layers(model)
    tokens = encode(model, ["a red circle"], cfg=False).kwargs["encoder_hidden_states"].shape[1]
    entropy = attention_entropy(model, ["a red circle"], steps=2)
    assert set(entropy) == {layer.path for layer in layers}
    assert all(0 <= e < math.log(tokens) for e in entropy.values())
    keys = NeuronSet({layer.key: range(model.graph.site(layer.key).out_features) for layer in layers})
    with ablate(model, keys):  # zero text keys: uniform attention over the text tokens
        uniform = attention_entropy(model, ["a red circle"], steps=2)
    assert all(e == pytest.approx(math.log(tokens), abs=1e-5) for e in uniform.values())


def test_cli_localize_ablation_json(tiny_folders, tmp_path):
    import json

    from typer.testing import CliRunner

    from workbench.cli import app

    (tmp_path / "p.txt").write_text("a red circle\n")
    (tmp_path / "h.txt").write_text("a blue square\na cat\n")
    result = CliRunner().invoke(app, ["localize", "ablation", str(tiny_folders["unet"]), "--prompts",
                                      str(tmp_path / "p.txt"), "--holdout", str(tmp_path / "h.txt"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    layers = {r["layer"] for r in data["ranking"]}
    assert layers == set(data["entropy"]) and all(layer.endswith("attn2") for layer in layers)
    assert all(v["difference"] == pytest.approx(v["prompts"] - v["holdout"]) for v in data["entropy"].values())


def test_concept_ranking_is_the_drop_of_the_classifier_probability(unet_model, tmp_path):
    from localization.ablation import AblationConfig, concept_probability
    from localization.localize import localize
    from workbench.errors import WorkbenchError
    from workbench.testbed.classifier import ConceptClassifier, load_classifier, save_classifier

    torch.manual_seed(0)
    save_classifier(ConceptClassifier(), tmp_path / "classifier")
    config = AblationConfig(concept="subject=house", classifier=str(tmp_path / "classifier"), concept_seeds=2,
                            steps=2, entropy=False)
    result = localize(unet_model, "ablation", ["a red circle"], config=config)
    score = concept_probability(unet_model, load_classifier(tmp_path / "classifier"), "subject", "house",
                                ["a red circle"], seeds=2, steps=2, guidance_scale=config.guidance_scale)
    base, layer = score(), cross_attention_layers(unet_model)[0]
    with layer_ablation(unet_model, layer, "null"):
        ablated = score()
    ranking = result.extra["ranking"]
    row = next(r for r in ranking if r["layer"] == layer.path)
    assert result.extra["score"] == "probability of subject=house"
    assert row["base"] == pytest.approx(base) and row["drop"] == pytest.approx(base - ablated)
    assert [r["drop"] for r in ranking] == sorted((r["drop"] for r in ranking), reverse=True)
    assert any(r["drop"] != 0 for r in ranking)  # switching a layer to the empty prompt changes the images
    with pytest.raises(WorkbenchError, match="no concept subject=unicorn"):
        localize(unet_model, "ablation", ["a red circle"], config=AblationConfig(
            concept="subject=unicorn", classifier=str(tmp_path / "classifier"), steps=2, entropy=False))
