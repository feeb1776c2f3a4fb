"""Building, describing and evaluating testbed checkpoints (tiny runs: a few steps on a small dataset)."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from typer.testing import CliRunner

import workbench
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.testbed.classifier import ConceptClassifier, accuracy, load_classifier, save_classifier
from workbench.testbed.dataset import build_dataset
from workbench.testbed.evaluate import EvalConfig, evaluate, roc_auc

runner = CliRunner()
SMALL = ["--data-size", "64", "--seed", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    result = runner.invoke(app, ["testbed", "train", "unet", "--out", str(root / "unet"), "--work", str(root / "work"),
                                 "--steps", "2", "--vae-steps", "2", *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    return root


def test_trained_folder_loads_offline_with_plain_diffusers(trained):
    pipe = DiffusionPipeline.from_pretrained(trained / "unet", local_files_only=True)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    stored = (trained / "unet" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert stored < 2.2 * sum(p.numel() for p in pipe.unet.parameters())  # float16 on disk
    model = workbench.load(trained / "unet")
    assert model.family == "unet" and model.pipeline.tokenizer.model_max_length == 32


def test_train_refuses_an_existing_output_and_resumes_from_work(trained):
    result = runner.invoke(app, ["testbed", "train", "unet", "--out", str(trained / "unet"), "--work",
                                 str(trained / "work"), "--steps", "2", "--vae-steps", "2", *SMALL])
    assert result.exit_code == 2 and "already exists" in result.stderr
    # same settings, new output: the work folder already holds both finished states, so nothing retrains
    again = runner.invoke(app, ["testbed", "train", "unet", "--out", str(trained / "unet-again"), "--work",
                                str(trained / "work"), "--steps", "2", "--vae-steps", "2", *SMALL, "--device", "cpu",
                                "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["device"] == "cpu"
    first = workbench.load(trained / "unet").denoiser.state_dict()
    second = workbench.load(trained / "unet-again").denoiser.state_dict()
    assert all(torch.equal(v, second[k]) for k, v in first.items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_training_on_an_absent_gpu_is_a_one_line_error_before_anything_is_written(tmp_path):
    result = runner.invoke(app, ["testbed", "train", "unet", "--out", str(tmp_path / "unet"), "--work",
                                 str(tmp_path / "work"), "--device", "cuda", *SMALL])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "CUDA is not available" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("widths, message", [("32,64,x", "comma-separated integers"),
                                             ("32,64,100", "three multiples of 32")])
def test_bad_unet_channels_are_a_one_line_error_before_anything_is_written(tmp_path, widths, message):
    result = runner.invoke(app, ["testbed", "train", "unet", "--out", str(tmp_path / "unet"), "--work",
                                 str(tmp_path / "work"), "--unet-channels", widths, *SMALL])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and message in result.stderr
    assert not list(tmp_path.iterdir())


def test_classifier_round_trip(tmp_path):
    data = build_dataset(0, 64)
    model = ConceptClassifier()
    save_classifier(model, tmp_path / "c")
    loaded = load_classifier(tmp_path / "c")
    images = torch.rand(4, 3, 32, 32)
    expected, got = model.predict(images), loaded.predict(images)
    assert list(got) == list(expected) and all(torch.equal(expected[h], got[h]) for h in expected)
    scores = accuracy(loaded, data.non_member_images, data.non_member_labels)
    assert set(scores) == {"subject", "colour", "size", "position", "texture", "style"}
    assert all(0 <= v <= 1 for v in scores.values())


def test_roc_auc():
    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 3], [2, 2]) == 0.5 and roc_auc([2], [2]) == 0.5


def test_evaluate_reports_every_bar(trained):
    model = workbench.load(trained / "unet")
    config = EvalConfig(seeds=2, min_seeds=1, steps=2, ordinary_prompts=2, ordinary_seeds=1, wen_generations=1,
                        wen_steps=2)
    report = evaluate(model, build_dataset(0, 64), ConceptClassifier(), config)
    summary = report["summary"]
    assert set(summary["passes"]) == {"memorization", "no_replication_of_ordinary", "follows_captions", "detectors"}
    assert len(report["memorized"]) == 20 and all(len(m["ssim"]) == 2 for m in report["memorized"])
    assert 0 <= summary["nemo_auc"] <= 1 and 0 <= summary["wen_auc"] <= 1 and 0 <= summary["wen_first_step_auc"] <= 1
    wen = report["detectors"]["wen"]
    assert len(wen["memorized"]) == 20 and len(wen["ordinary"]) == 2
    json.dumps(report)  # the CLI prints it


def test_evaluate_refuses_a_wen_guidance_without_an_unconditional_branch_before_sampling(trained):
    with pytest.raises(WorkbenchError, match="guidance_scale must be > 1"):
        EvalConfig(wen_guidance_scale=1.0)
    result = runner.invoke(app, ["testbed", "evaluate", str(trained / "unet"), "--wen-guidance", "0.5", "--json"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "guidance_scale must be > 1" in result.stderr


def test_describe_writes_ground_truth(tmp_path):
    result = runner.invoke(app, ["testbed", "describe", "--out", str(tmp_path), *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    description = json.loads((tmp_path / "testbed.json").read_text())
    assert description["format"] == "workbench.testbed/1"
    for item in description["memorized"]:
        assert (tmp_path / item["image"]).is_file() and item["kind"] in ("verbatim", "template")
    assert not set(description["members"]["ids"]) & set(description["non_members"]["ids"])
    again = runner.invoke(app, ["testbed", "describe", "--out", str(tmp_path), *SMALL])
    assert again.exit_code == 2 and "already exists" in again.stderr
