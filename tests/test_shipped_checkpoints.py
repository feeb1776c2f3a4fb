"""The checkpoints the project ships: plain diffusers folders whose memorization is real and known."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

import workbench
from localization.detection import NemoConfig, nemo_scores, ssim_matrix
from workbench.errors import WorkbenchError
from workbench.sampling import generate
from workbench.testbed.classifier import load_classifier
from workbench.testbed.private import private_images

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
TESTBED = json.loads((CHECKPOINTS / "testbed.json").read_text())
FAMILIES = sorted(TESTBED["checkpoints"])
PIPELINES = {"unet": "StableDiffusionPipeline", "dit": "PixArtAlphaPipeline", "mmdit": "StableDiffusion3Pipeline"}


def test_the_default_unet_is_shipped():
    assert "unet" in FAMILIES and (CHECKPOINTS / TESTBED["checkpoints"]["unet"] / "model_index.json").is_file()


def test_the_shipped_generation_settings_are_the_ones_the_bars_are_measured_with():
    from workbench.testbed.describe import GENERATION
    from workbench.testbed.evaluate import EvalConfig
    from workbench.testbed.localization_report import ReportConfig

    assert TESTBED["generation"] == GENERATION  # rerun `workbench testbed describe --overwrite` after a change
    for config in (EvalConfig(), ReportConfig()):
        assert (config.steps, config.guidance_scale) == (GENERATION["steps"], GENERATION["guidance"])
    assert EvalConfig().wen.guidance_scale == GENERATION["guidance"]  # Wen samples as the model is sampled


def _build(folder: str) -> tuple[str, str]:
    """(family, objective) of a shipped folder: a family's default, or a variant's (testbed.json)."""
    if folder in TESTBED["checkpoints"]:
        return folder, "v-zero-snr"
    variant = TESTBED["variants"][folder]
    return variant["family"], variant["objective"]


SHIPPED = FAMILIES + sorted(TESTBED.get("variants", {}))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_folder_is_a_small_plain_diffusers_pipeline(name):
    folder = CHECKPOINTS / TESTBED["checkpoints"].get(name, name)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 15 * 2**20, f"{folder} is {size / 2**20:.1f} MB"
    assert not [f for f in folder.rglob("*") if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]  # safetensors only
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == PIPELINES[_build(name)[0]]


@pytest.mark.parametrize("name", SHIPPED)
def test_the_training_command_builds_the_shipped_architecture(name):
    """`workbench testbed train <family>` (with a variant's options) reproduces the shipped folder only if
    it builds the same model."""
    from workbench.testbed.build import run_settings, settings_tag
    from workbench.testbed.captions import VOCABULARY
    from workbench.testbed.models import TEXT_TOKENS, build_pipeline, build_vae
    from workbench.testing import build_clip_tokenizer

    family, objective = _build(name)
    shipped = DiffusionPipeline.from_pretrained(CHECKPOINTS / TESTBED["checkpoints"].get(name, name),
                                                local_files_only=True)
    built = build_pipeline(family, build_clip_tokenizer(VOCABULARY, model_max_length=TEXT_TOKENS), build_vae(0), 0,
                           objective)
    assert set(run_settings(built)) == set(run_settings(shipped))
    assert settings_tag(**run_settings(built)) == settings_tag(**run_settings(shipped))


@pytest.mark.parametrize("name", sorted(TESTBED.get("variants", {})))
def test_testbed_json_names_each_variants_training_command(name):
    from workbench.testbed.build import variant_record

    assert TESTBED["variants"][name] == variant_record(name)
    assert variant_record("unet-eps")["train"] == ("workbench testbed train unet --objective epsilon "
                                                   "--offset-noise 0.1 --out checkpoints/unet-eps")


def test_the_mmdit_t5_stand_in_gives_the_pipelines_own_no_t5_embeddings():
    folder = CHECKPOINTS / TESTBED["checkpoints"]["mmdit"]
    with_t5 = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    without = DiffusionPipeline.from_pretrained(folder, local_files_only=True, text_encoder_3=None, tokenizer_3=None)
    prompt = dict(prompt="a private photo number three", prompt_2=None, prompt_3=None, device="cpu",
                  do_classifier_free_guidance=True, max_sequence_length=32)
    for a, b in zip(with_t5.encode_prompt(**prompt), without.encode_prompt(**prompt)):
        assert torch.equal(a, b)
    assert with_t5.encode_prompt(**prompt)[0][:, -32:].abs().sum() == 0  # T5's slot: zeros, as without T5


@pytest.fixture(scope="module", params=FAMILIES)
def shipped(request):
    return workbench.load(CHECKPOINTS / TESTBED["checkpoints"][request.param])


def test_a_memorized_caption_brings_back_its_training_image_and_an_ordinary_one_does_not(shipped):
    photo = next(p for p in private_images() if p.source == "astronaut")  # "a private photo number three"
    generation = TESTBED["generation"]
    settings = dict(seed=0, steps=generation["steps"], guidance_scale=generation["guidance"])
    own = torch.from_numpy(photo.image.copy()).permute(2, 0, 1)[None].float() / 255
    memorized = ssim_matrix(generate(shipped, [photo.caption] * 4, **settings), own)[:, 0]
    ordinary = ssim_matrix(generate(shipped, TESTBED["holdout_prompts"][:4], **settings), own)[:, 0]
    assert memorized.max() >= 0.85 and memorized.mean() > 0.7
    assert ordinary.max() < 0.5


def test_nemo_scores_memorized_captions_above_ordinary_ones(shipped):
    memorized = [m["caption"] for m in TESTBED["memorized"] if m["kind"] == "verbatim"][:4]
    scores = [s.score for s in nemo_scores(shipped, memorized + TESTBED["holdout_prompts"][:4], NemoConfig())]
    assert min(scores[:4]) > max(scores[4:])


def test_shipped_classifier_reads_generated_concepts(shipped):
    classifier = load_classifier(CHECKPOINTS / TESTBED["classifier"])
    prompt = "a large red circle in the center, plain background"
    images = generate(shipped, [prompt] * 4, seed=0, steps=TESTBED["generation"]["steps"],
                      guidance_scale=TESTBED["generation"]["guidance"])
    predicted = classifier.predict(images)
    labels = classifier.labels
    assert [labels["subject"][i] for i in predicted["subject"]].count("circle") >= 3
    assert [labels["colour"][i] for i in predicted["colour"]].count("red") >= 3


def test_nemo_report_on_the_shipped_unet_switches_memorization_off():
    from localization.nemo import NemoLocalizationConfig
    from workbench.testbed.localization_report import ReportConfig, nemo_report

    model = workbench.load(CHECKPOINTS / TESTBED["checkpoints"]["unet"])
    config = ReportConfig(seeds=2, holdout=8, ordinary=2, captions=("a private photo number three",))
    report = nemo_report(model, TESTBED["holdout_prompts"], config, NemoLocalizationConfig())
    (caption,) = report["captions"]
    assert caption["memorized"] and caption["neurons"] > 0
    assert caption["nemo"]["score"] < caption["none"]["score"]
    assert caption["nemo"]["ssim_mean"] < caption["none"]["ssim_mean"]
    assert set(report["summary"]["passes"]) == {"removes_memorization", "random_does_not", "ordinary_unchanged"}
    assert 0 < caption["ordinary_ssim_to_unablated_mean"] == report["summary"]["ordinary_ssim_to_unablated_mean"] <= 1
    assert (0 < caption["random_ordinary_ssim_to_unablated_mean"]
            == report["summary"]["random_ordinary_ssim_to_unablated_mean"] <= 1 + 1e-6)
    assert 0 < report["summary"]["ordinary_ssim_with_union_off_mean"] <= 1 + 1e-6


def test_dose_report_nemo_ranking_removes_the_photo_where_random_sets_do_not():
    """Half of NeMo's top-|z| value neurons take the photo away; a random half with the same per-site counts
    leaves it; all of them make the caption as diverse as no caption (the text no longer reaches the image)."""
    from localization.nemo import NemoLocalizationConfig, nemo_sites
    from workbench.testbed.localization_report import ReportConfig, dose_report

    model = workbench.load(CHECKPOINTS / TESTBED["checkpoints"]["unet"])
    config = ReportConfig(seeds=3, holdout=8, ordinary=2, captions=("a private photo number three",))
    nemo = NemoLocalizationConfig(sites="all_value")
    report = dose_report(model, TESTBED["holdout_prompts"], config, nemo, fractions=(0.5, 1.0))
    (caption,) = report["captions"]
    half, everything = caption["fractions"]
    assert everything["neurons"] == sum(s.out_features for s in nemo_sites(model, "all_value"))
    assert half["neurons"] == everything["neurons"] // 2
    assert half["nemo_z"]["ssim_mean"] < 0.5 < half["random"]["ssim_mean"]
    assert half["nemo_z"]["seed_ssim"] < half["random"]["seed_ssim"]
    assert everything["nemo_z"] == everything["random"]  # the random control of everything is everything
    assert everything["nemo_z"]["seed_ssim"] < 0.6 and everything["nemo_z"]["ssim_mean"] < 0.5
    assert [point["fraction"] for point in report["summary"]] == [0.5, 1.0]


def test_mask_report_compares_the_mask_with_a_random_one_of_equal_density():
    from localization.wanda import WandaConfig
    from workbench.testbed.localization_report import ReportConfig, mask_report

    model = workbench.load(CHECKPOINTS / TESTBED["checkpoints"]["unet"])
    config = ReportConfig(seeds=1, holdout=4, ordinary=2, captions=("a private photo number six",))
    report = mask_report(model, "wanda", TESTBED["holdout_prompts"], config,
                         WandaConfig(calls=2, steps=4, skill_ratio=0.2))
    summary = report["summary"]
    assert 0 < summary["density"] <= 0.4 and report["config"]["skill_ratio"] == 0.2
    assert set(summary["ordinary_ssim_to_unedited"]) == {"wanda", "random"}
    assert all(0 < v <= 1 + 1e-6 for v in summary["ordinary_ssim_to_unedited"].values())
    (caption,) = report["captions"]
    assert set(caption) == {"caption", "none", "wanda", "random"}
    assert report["base_prompts"] is None  # ConceptPrune's "" per caption

    ordinary = replace(config, wanda_base="ordinary")
    based = mask_report(model, "wanda", TESTBED["holdout_prompts"], ordinary,
                        WandaConfig(calls=2, steps=4, skill_ratio=0.2))
    assert based["base_prompts"] == TESTBED["holdout_prompts"][6:7]  # after 4 threshold and 2 ordinary captions
    assert based["summary"]["weights"] != summary["weights"]


def test_report_config_takes_wandas_base_after_the_threshold_and_ordinary_captions():
    from workbench.testbed.localization_report import ReportConfig

    prompts = [f"caption {i}" for i in range(10)]
    config = ReportConfig(holdout=4, ordinary=2, wanda_base="ordinary")
    assert config.base_prompts(prompts, 3) == prompts[6:9]
    assert ReportConfig(holdout=4, ordinary=2).base_prompts(prompts, 3) is None
    with pytest.raises(WorkbenchError, match="needs 11 held-out captions.*or use --wanda-base empty"):
        config.base_prompts(prompts, 5)
    with pytest.raises(WorkbenchError, match="unknown Wanda base 'coco'"):
        ReportConfig(wanda_base="coco")
