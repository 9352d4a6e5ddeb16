"""Where an export writes, and what it may replace.

An export is assembled in a hidden staging folder beside the output (`.NAME.partial-PID-XXXX`, with a
marker file naming the process) and renamed into place when complete. Only folders that are ours
are ever removed: an artifact (its manifest says so) when `--force` asks for it, and staging folders
whose process is gone (a killed export). Folders are created with the user's umask, as `mkdir` would.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from artifact import contract

from .errors import ExportError

MARKER = ".qwen2-onnx-staging"  # inside a staging folder: {"pid": ..., "host": ...}
SPACE_MARGIN = 1.02  # data file alignment and the graph file on top of the weights


def check_output(source: Path, target: Path, force: bool) -> None:
    """Refuse an output that would destroy the checkpoint or anything that is not an artifact of ours."""
    source_real, target_real = source.resolve(), target.resolve()
    if target_real == source_real or target_real in source_real.parents:
        raise ExportError(f"-o {target} is the checkpoint folder or contains it; choose a new folder for the artifact")
    blocking = next((p for p in [target, *target.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None and blocking != target:
        raise ExportError(f"-o {target}: {blocking} is a file, not a folder; choose another path")
    if not target.exists() and not target.is_symlink():
        return
    if not force:
        raise ExportError(f"{target} already exists; pass --force to replace it")
    if target.is_symlink() or not target.is_dir() or not is_ours(target):
        raise ExportError(f"--force replaces only an artifact folder written by qwen2-onnx, and {target} is not one "
                          "(no manifest.json of ours in it); choose another -o, or remove it yourself")


def is_ours(folder: Path) -> bool:
    """A complete artifact (a manifest of our format) or one of our staging folders."""
    if (folder / MARKER).is_file():
        return True
    try:
        return contract.read_json_object(folder / contract.MANIFEST_FILE).get("format") == contract.FORMAT
    except (OSError, ValueError):
        return False


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_staging(target: Path) -> Path:
    """A new staging folder beside `target`, marked with this process, with the umask's permissions."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700 whatever the umask
    (staging / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return staging


def move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished folder over `target`; an old artifact is removed only after the swap."""
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        target.rename(retired / "artifact")
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)
    (target / MARKER).unlink()


@dataclass(frozen=True)
class Freed:
    folders: int
    bytes: int


def remove_stale_staging(parent: Path) -> Freed:
    """Remove staging folders in `parent` left by exports on this host whose process has ended."""
    folders = size = 0
    if not parent.is_dir():
        return Freed(0, 0)
    for folder in parent.glob(".*.partial-*"):
        if folder.is_dir() and not folder.is_symlink() and abandoned(folder):
            size += folder_bytes(folder)
            shutil.rmtree(folder, ignore_errors=True)
            folders += 1
    return Freed(folders, size)


def abandoned(folder: Path) -> bool:
    try:
        owner = contract.read_json_object(folder / MARKER)
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not ours, or not yet marked
    return host == socket.gethostname() and not process_alive(pid)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def check_space(folder: Path, needed: int) -> None:
    """Refuse before any work when the file system cannot hold the artifact."""
    free = shutil.disk_usage(folder).free
    if free < needed * SPACE_MARGIN:
        raise ExportError(f"the artifact needs about {needed * SPACE_MARGIN / 1e9:.2f} GB but {folder} has "
                          f"{free / 1e9:.2f} GB free; free some space or choose another -o")


def report_freed(freed: Freed, say: Callable[[str], None]) -> None:
    if freed.folders:
        say(f"removed {freed.folders} staging folder(s) of interrupted exports, {freed.bytes / 1e9:.2f} GB freed")
