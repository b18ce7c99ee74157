"""Atomic outputs, hashing and JSON helpers shared by every command that writes to disk.

Every output directory is built in a temporary sibling and renamed into place, so an interrupted run
leaves either the previous state or the complete new one, never a half-written model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flexmoe.errors import FlexmoeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, is_dir: bool) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; outputs get normal permissions."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless ``force`` is set."""
    if out.exists() and not force:
        raise FlexmoeError(
            f"Output {out} already exists.", "choose another --out, or pass --force to replace it."
        )


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block finishes without error.

    The temporary directory lives next to ``out`` (same filesystem, so the final rename is atomic).
    With ``force``, an existing ``out`` is moved aside first and deleted only after the new one is in
    place, so even a crash between the two renames loses nothing.
    """
    out = Path(out)
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_mode(tmp, is_dir=True)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a single file atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish_mode(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_pretrained_atomic(model, tokenizer, out: Path) -> None:
    """An HF model directory (safetensors weights + tokenizer) at ``out``, replacing it atomically."""
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically, pretty-printed with sorted keys so that diffs and hashes are stable."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FlexmoeError(f"{path} does not exist.", "check the path.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FlexmoeError(f"{path} is not valid JSON ({e}).", "restore the file or re-create it.") from e


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, streamed so that large shards do not load into memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
