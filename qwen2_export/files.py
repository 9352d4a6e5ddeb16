"""Facts about artifact files that the export stage and graphs/ both write: checksums and the data
file's alignment rule. No torch here, so graphs/ can import it without pulling the exporter in."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

# large tensors start on 64 KiB boundaries so onnxruntime can memory-map them on every OS; small ones on 64 bytes
LARGE_TENSOR_BYTES, LARGE_ALIGNMENT, SMALL_ALIGNMENT = 1 << 20, 1 << 16, 64


def aligned_offset(offset: int, nbytes: int) -> int:
    """Where a tensor of `nbytes` starts when the previous one ends at `offset`."""
    alignment = LARGE_ALIGNMENT if nbytes >= LARGE_TENSOR_BYTES else SMALL_ALIGNMENT
    return offset + -offset % alignment


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """The manifest's entry for one file of a graph: checksum and size."""
    return {"sha256": sha256_of(path), "bytes": path.stat().st_size}
