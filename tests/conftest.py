"""Session fixtures: seeded tiny checkpoints in the hub layout and their exported artifacts, each built once
per test run and shared by pytest-xdist's workers (a file lock per item: the first worker that needs it
builds it, the others wait and reuse it). Tests copy an artifact before changing it."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
from filelock import FileLock
from hypothesis import settings

from qwen2_export.export import export_checkpoint
from qwen2_export.synthetic import TINY_VARIANTS, write_tiny_checkpoint

VARIANTS = sorted(TINY_VARIANTS)

logging.getLogger("torch.onnx").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="torch")

# CI runs the property tests on the same examples every time (a red CI is then a change, not luck);
# elsewhere hypothesis explores new ones on each run and remembers failures in .hypothesis/
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(config, items) -> None:
    """`cuda` tests run on a machine with a CUDA GPU and onnxruntime-gpu (the lent device: pytest -m cuda);
    elsewhere they are skipped, and -ra lists them with this reason."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and onnxruntime-gpu: run on the device with pytest -m cuda")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_build(tmp_path_factory) -> Callable[[str, Callable[[Path], object]], Path]:
    """shared_build(name, build) -> the folder `build(folder)` made, once for all workers of this run."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base  # xdist workers' base folders share a parent
    (root / "shared").mkdir(exist_ok=True)

    def get(name: str, build: Callable[[Path], object]) -> Path:
        folder = root / "shared" / name
        done = folder.with_name(name + ".done")
        with FileLock(str(folder) + ".lock"):
            if not done.is_file():
                shutil.rmtree(folder, ignore_errors=True)  # a half-built one from a failed attempt
                build(folder)
                done.touch()
        return folder

    return get


@pytest.fixture(scope="session")
def tiny_checkpoint(shared_build) -> Callable[..., Path]:
    """tiny_checkpoint(variant, dtype=torch.float32) -> checkpoint folder."""
    def build(variant: str, dtype: torch.dtype = torch.float32) -> Path:
        name = f"checkpoint-{variant}-{str(dtype).split('.')[-1]}"
        return shared_build(name, lambda folder: write_tiny_checkpoint(folder, variant, seed=0, dtype=dtype))

    return build


@pytest.fixture(scope="session")
def tiny_artifact(shared_build, tiny_checkpoint) -> Callable[..., Path]:
    """tiny_artifact(variant, dtype="fp32") -> exported artifact folder."""
    def build(variant: str, dtype: str = "fp32") -> Path:
        return shared_build(f"artifact-{variant}-{dtype}",
                            lambda folder: export_checkpoint(tiny_checkpoint(variant), folder, dtype=dtype))

    return build


@pytest.fixture(scope="session")
def tiny_optimized(shared_build, tiny_artifact) -> Callable[..., Path]:
    """tiny_optimized(variant, target="cpu") -> a copy of the fp32 artifact with onnx/model_{target}.onnx."""
    from graphs.artifact import optimize_artifact

    def optimized(variant: str, target: str, folder: Path) -> None:
        shutil.copytree(tiny_artifact(variant), folder)
        optimize_artifact(folder, target)

    def build(variant: str, target: str = "cpu") -> Path:
        return shared_build(f"optimized-{variant}-{target}", lambda folder: optimized(variant, target, folder))

    return build


@pytest.fixture(scope="session", autouse=True)
def build_artifacts_in_parallel(request, tiny_optimized) -> None:
    """Under xdist, each worker first builds its share of the fp32 artifacts (their CPU-optimized copies
    include them), so no worker waits on a lock the other holds while a core sits idle. Only when the
    collected tests use the tiny artifacts at all."""
    worker, workers = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    uses = {"tiny_artifact", "tiny_optimized"}
    if worker is None or workers < 2 or not any(uses & set(item.fixturenames) for item in request.session.items):
        return
    index = int(worker.removeprefix("gw"))
    for variant in VARIANTS[index::workers]:
        tiny_optimized(variant)
