"""Fixtures: GPT-2 checkpoints built locally (seeded random init), never downloaded."""

from __future__ import annotations

import pytest
from helpers import SHAPES, make_checkpoint

from gpt2_onnx import Engine
from gpt2_onnx.export import export_model


@pytest.fixture(scope="session", params=sorted(SHAPES))
def exported(request, tmp_path_factory):
    """(torch model, Engine) for each test shape."""
    root = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(root / "hf", seed=len(request.param), **SHAPES[request.param])
    export_model(str(root / "hf"), root / "onnx")
    return model, Engine.load(root / "onnx", provider="cpu")


@pytest.fixture(scope="session")
def bundled_onnx(tmp_path_factory):
    """The bundled Tiny Shakespeare model exported into a temporary folder (not the user's cache)."""
    from gpt2_onnx.models import BUNDLED

    return export_model(str(BUNDLED), tmp_path_factory.mktemp("bundled-onnx") / "onnx")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(torch model, Engine, checkpoint folder, export folder) of the tiny shape."""
    root = tmp_path_factory.mktemp("tiny_shared")
    model = make_checkpoint(root / "hf", seed=1, **SHAPES["tiny"])
    export_model(str(root / "hf"), root / "onnx")
    return model, Engine.load(root / "onnx", provider="cpu"), root / "hf", root / "onnx"
