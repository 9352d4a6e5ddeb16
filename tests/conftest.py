"""Session fixtures: seeded tiny checkpoints in the hub layout and their exported artifacts, built once."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch

from qwen2_export.export import export_checkpoint
from qwen2_export.synthetic import TINY_VARIANTS, write_tiny_checkpoint

VARIANTS = sorted(TINY_VARIANTS)

logging.getLogger("torch.onnx").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="torch")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """tiny_checkpoint(variant, dtype=torch.float32) -> checkpoint folder (cached per session)."""
    built: dict[tuple[str, torch.dtype], Path] = {}

    def build(variant: str, dtype: torch.dtype = torch.float32) -> Path:
        key = (variant, dtype)
        if key not in built:
            folder = tmp_path_factory.mktemp("checkpoints") / f"{variant}-{str(dtype).split('.')[-1]}"
            built[key] = write_tiny_checkpoint(folder, variant, seed=0, dtype=dtype)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_checkpoint) -> Callable[..., Path]:
    """tiny_artifact(variant, dtype="fp32") -> exported artifact folder (cached per session)."""
    built: dict[tuple[str, str], Path] = {}

    def build(variant: str, dtype: str = "fp32") -> Path:
        if (variant, dtype) not in built:
            out = tmp_path_factory.mktemp("artifacts") / f"{variant}-{dtype}"
            built[variant, dtype] = export_checkpoint(tiny_checkpoint(variant), out, dtype=dtype)
        return built[variant, dtype]

    return build


@pytest.fixture(scope="session")
def tiny_optimized(tmp_path_factory, tiny_artifact) -> Callable[..., Path]:
    """tiny_optimized(variant, target="cpu") -> a copy of the fp32 artifact with onnx/model_{target}.onnx."""
    import shutil

    from graphs.artifact import optimize_artifact

    built: dict[tuple[str, str], Path] = {}

    def build(variant: str, target: str = "cpu") -> Path:
        if (variant, target) not in built:
            folder = tmp_path_factory.mktemp("optimized") / f"{variant}-{target}"
            shutil.copytree(tiny_artifact(variant), folder)
            optimize_artifact(folder, target)
            built[variant, target] = folder
        return built[variant, target]

    return build
