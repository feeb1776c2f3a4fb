"""Shared fixtures: the three tiny pipeline families, saved once per session and loaded from disk."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded in the tests

import pytest

import workbench
from workbench.testing import TINY_FAMILIES, save_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> dict:
    """family -> folder of a saved tiny pipeline (built offline, random weights, seed 0)."""
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_tiny_pipeline(family, root / family) for family in TINY_FAMILIES}


@pytest.fixture(scope="session", params=TINY_FAMILIES)
def tiny_model(request, tiny_folders) -> workbench.Model:
    """Each tiny family, loaded through `workbench.load` from its folder."""
    return workbench.load(tiny_folders[request.param])


@pytest.fixture(scope="session")
def unet_model(tiny_folders) -> workbench.Model:
    return workbench.load(tiny_folders["unet"])
