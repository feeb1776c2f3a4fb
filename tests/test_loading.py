"""Opening pipelines: offline, safetensors only, and a one-line error for every kind of bad input."""

import json
import shutil

import pytest
import torch

import workbench
from workbench.errors import WorkbenchError
from workbench.models.adapter import adapter_for
from workbench.testing import tiny_pipeline


@pytest.fixture
def unet_copy(tiny_folders, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_folders["unet"], folder)
    return folder


def _one_line_error(call, match):
    with pytest.raises(WorkbenchError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_load_detects_each_family_from_the_folder(tiny_model):
    expected = {"StableDiffusionPipeline": "unet", "PixArtAlphaPipeline": "dit", "StableDiffusion3Pipeline": "mmdit"}
    assert tiny_model.family == expected[type(tiny_model.pipeline).__name__]
    assert tiny_model.device.type == "cpu" and tiny_model.dtype == torch.float32


def test_loading_leaves_the_folder_untouched(tiny_folders):
    folder = tiny_folders["mmdit"]
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    workbench.load(folder)
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_load_wraps_a_pipeline_object_without_moving_it():
    pipe = tiny_pipeline("dit")
    model = workbench.load(pipe)
    assert model.pipeline is pipe and model.family == "dit" and model.source is None
    half = workbench.load(tiny_pipeline("unet"), dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_missing_folder(tmp_path):
    message = _one_line_error(lambda: workbench.load(tmp_path / "nope"), "not found")
    assert "nope" in message


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _one_line_error(lambda: workbench.load(tmp_path), "no model_index.json")


def test_corrupt_model_index(unet_copy):
    (unet_copy / "model_index.json").write_text("{not json")
    _one_line_error(lambda: workbench.load(unet_copy), "not valid JSON")


def test_model_index_without_class(unet_copy):
    (unet_copy / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    _one_line_error(lambda: workbench.load(unet_copy), "_class_name")


def test_unsupported_denoiser_names_the_supported_families(unet_copy):
    index = json.loads((unet_copy / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (unet_copy / "model_index.json").write_text(json.dumps(index))
    message = _one_line_error(lambda: workbench.load(unet_copy), "unsupported denoiser UNet2DModel")
    for family in ("unet", "dit", "mmdit", "PixArtTransformer2DModel", "generic"):
        assert family in message


def test_missing_weights(unet_copy):
    (unet_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    _one_line_error(lambda: workbench.load(unet_copy), "could not load the pipeline")


def test_corrupt_weights(unet_copy):
    weights = unet_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _one_line_error(lambda: workbench.load(unet_copy), "could not load the pipeline")


def test_pickled_weights_are_never_loaded(unet_copy):
    weights = unet_copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({}, unet_copy / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    _one_line_error(lambda: workbench.load(unet_copy), "safetensors")


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "float8"}, "unknown dtype"),
    ({"device": "tpu:7"}, "device"),
    ({"device": "cuda"} if not torch.cuda.is_available() else {"device": "cuda:99"}, "cuda"),
    ({"family": "rnn"}, "unknown family"),
])
def test_bad_options(tiny_folders, kwargs, match):
    _one_line_error(lambda: workbench.load(tiny_folders["unet"], **kwargs), match)


def test_not_a_pipeline_object():
    _one_line_error(lambda: workbench.load(torch.nn.Linear(2, 2)), "pipeline folder")


def test_generic_family_lists_sites_without_roles(tiny_folders):
    model = workbench.load(tiny_folders["unet"], family="generic")
    assert {s.role.value for s in model.graph.sites} <= {"linear", "conv", "norm"}
    assert len(model.graph.sites) == len(workbench.load(tiny_folders["unet"]).graph.sites)


def test_adapter_for_rejects_unknown_denoiser():
    _one_line_error(lambda: adapter_for(torch.nn.Linear(2, 2)), "unsupported denoiser Linear")
