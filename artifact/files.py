"""Reading an artifact's files safely: every path stays inside the folder, sizes and checksums match
the manifest.

An artifact may come from anywhere (a download, a shared drive), and the runtime that opens it may
serve requests, so nothing a manifest says is trusted: a path from it is resolved inside the artifact
or refused, a symbolic link that leaves the folder is refused, and a file whose size differs from
the manifest's record is reported as truncated or replaced before onnxruntime reads it. Checksums
cost a full read of every byte, so they are checked on request (`qwen2-onnx verify`, `verify=True`).
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Iterable

from .contract import ArtifactError, FileRecord, Manifest, sha256_of

REFETCH = "re-export the artifact or copy it again"


def inside(artifact: str | Path, relative: str) -> Path:
    """`relative` (a manifest path: forward slashes, relative) resolved inside `artifact`; ArtifactError
    for an absolute path, a `..` part or a link that leads out of the folder."""
    pure = PurePosixPath(relative)
    if not relative or pure.is_absolute() or ".." in pure.parts or "\\" in relative or ":" in relative:
        raise ArtifactError(f"the manifest names the path {relative!r}, which is not inside the artifact; "
                            f"an artifact only refers to its own files ({REFETCH})")
    root = Path(artifact).resolve()
    path = (root / pure).resolve()
    if not path.is_relative_to(root):
        raise ArtifactError(f"{root / pure} leads out of the artifact (to {path}); {REFETCH}")
    return path


def links_leaving(artifact: str | Path) -> list[Path]:
    """Symbolic links anywhere in the artifact whose targets lie outside it."""
    root = Path(artifact).resolve()
    leaving = []
    for folder, names, files in os.walk(root):
        for name in names + files:
            path = Path(folder) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                leaving.append(path)
    return leaving


def check_contained(artifact: str | Path) -> None:
    """Refuse an artifact that links to files outside itself (the runtime must read nothing else)."""
    leaving = links_leaving(artifact)
    if leaving:
        raise ArtifactError(f"{leaving[0]} is a link to {leaving[0].resolve()}, outside the artifact; "
                            f"an artifact must hold its own files ({REFETCH})")


def check_files(artifact: str | Path, records: dict[str, FileRecord], checksums: bool = False) -> None:
    """Every recorded file is inside the artifact, present and of the recorded size (and, with
    `checksums`, of the recorded sha256); ArtifactError naming the first that is not."""
    for relative, record in records.items():
        path = inside(artifact, relative)
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; {REFETCH}")
        size = path.stat().st_size
        if size != record.bytes:
            raise ArtifactError(f"{path} is {size:,} bytes but the manifest records {record.bytes:,} "
                                f"(truncated or replaced); {REFETCH}")
        if checksums and sha256_of(path) != record.sha256:
            raise ArtifactError(f"{path} does not match the manifest's sha256 (modified or corrupt); {REFETCH}")


def all_records(manifest: Manifest, graphs: Iterable[str] | None = None) -> dict[str, FileRecord]:
    """The records of the copied checkpoint files and of the named graphs' files (default: every graph)."""
    records = dict(manifest.files)
    for graph in manifest.graphs:
        if graphs is None or graph.name in graphs:
            records.update(graph.files)
    return records


def verify(artifact: str | Path, manifest: Manifest) -> int:
    """Check containment, sizes and every sha256 of the artifact; returns the bytes read."""
    check_contained(artifact)
    records = all_records(manifest)
    check_files(artifact, records, checksums=True)
    return sum(record.bytes for record in records.values())
