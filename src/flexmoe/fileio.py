"""Atomic outputs, hashing and JSON helpers shared by every command that writes to disk.

Every output directory is built in a temporary sibling and renamed into place, so an interrupted run
leaves either the previous state or the complete new one, never a half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def _publish_tree(root: Path) -> None:
    """Normal permissions for a whole output (safetensors writes weight files 0600): 0644 files and
    0755 directories under the usual umask 022, so a shared model store can read them."""
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            _publish_mode(p, is_dir=p.is_dir())


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless ``force`` is set."""
    if out.exists() and not force:
        raise FlexmoeError(
            f"Output {out} already exists.", "choose another --out, or pass --force to replace it."
        )


def _is_main_rank() -> bool:
    # Under torchrun only rank 0 writes outputs; the other ranks must not compete for the lock.
    return int(os.environ.get("RANK", "0")) == 0


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


_HELD: dict[str, list] = {}  # lock file -> [fd, depth]: re-entrant within one process


def _make_parent(out: Path) -> None:
    """Create ``out``'s parent and prove it writable, before any work starts."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FlexmoeError(
            f"Cannot create the output's parent directory {out.parent} ({e.strerror}).",
            "choose an --out in a directory you can write to.",
        ) from e
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise FlexmoeError(
            f"The output's parent {out.parent} is not a writable directory.",
            "choose an --out in a directory you can write to.",
        )


def _acquire(lock: Path, out: Path) -> int:
    """An exclusive, non-blocking flock on ``lock``; the inode is re-checked so that a lock file
    unlinked by a finishing holder is never shared with a newcomer."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise FlexmoeError(
                f"Cannot write beside {out} ({e.strerror}).", "choose an --out in a writable directory."
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FlexmoeError(
                f"Another flexmoe process (pid {holder or '?'}) is writing {out} right now.",
                "wait for it to finish, or choose another --out; nothing was written.",
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


def clean_stale(out: Path) -> list[Path]:
    """Remove temporary siblings of ``out`` left by killed runs (call only while holding its lock:
    then no live process owns them). A previous output moved aside by a run killed between its two
    renames is put back instead of deleted."""
    removed = []
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if olds and not out.exists():
        os.replace(olds.pop(), out)
    for p in sorted(out.parent.glob(f".{out.name}.tmp-*")) + olds:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive lock on output ``out`` (a sibling ``.<out>.lock`` file) for the block.

    A second process writing the same output is refused at once with a clear message; within one
    process the lock is re-entrant. Stale temporary directories of killed runs are cleaned on entry.
    """
    out = Path(out).absolute()
    if not _is_main_rank():
        yield
        return
    lock = _lock_path(out)
    held = _HELD.get(str(lock))
    if held is not None:
        held[1] += 1
        try:
            yield
        finally:
            held[1] -= 1
        return
    _make_parent(out)
    fd = _acquire(lock, out)
    _HELD[str(lock)] = [fd, 1]
    try:
        clean_stale(out)
        yield
    finally:
        del _HELD[str(lock)]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # still holding it: a waiting process re-checks the inode
        os.close(fd)


def claims_output(param: str = "out") -> Callable:
    """Decorator for a command's entry point: hold the lock on its output for the whole run (so the
    writability check, the lock and the stale clean-up happen before any training starts).

    With a ``resume`` argument set, an existing finished output is refused unless ``force`` is set:
    resuming never overwrites a finished result.
    """

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        var_kw = next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            out = Path(bound.arguments[param])
            # resume/force are arguments of their own or fields of the entry point's settings dataclass
            # (a keyword override of a settings field, in the entry point's **kwargs, wins over both)
            settings = bound.arguments.get("settings")
            extra = bound.arguments.get(var_kw, {}) if var_kw else {}
            resume = extra.get("resume", bound.arguments.get("resume", getattr(settings, "resume", None)))
            force = extra.get("force", bound.arguments.get("force", getattr(settings, "force", None)))
            with output_lock(out):
                if resume and not force and out.exists():
                    raise FlexmoeError(
                        f"{out} is already finished; --resume never overwrites a finished output.",
                        "use it as it is, choose another --out, or pass --force to train again.",
                    )
                work = out.parent / f".{out.name}.work"
                had_work = work.exists()
                try:
                    return fn(*args, **kwargs)
                except BaseException:
                    # A run that failed before its first checkpoint leaves nothing behind.
                    if not had_work and work.is_dir() and not any(work.rglob("state.json")):
                        shutil.rmtree(work, ignore_errors=True)
                    raise

        return run

    return wrap


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block finishes without error.

    The temporary directory lives next to ``out`` (same filesystem, so the final rename is atomic).
    The output's lock is held throughout, and ``out`` is checked again just before the rename.
    With ``force``, an existing ``out`` is moved aside first and deleted only after the new one is in
    place, so even a crash between the two renames loses nothing.
    """
    out = Path(out)
    with output_lock(out):
        check_output_dir(out, force)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            yield tmp
            _publish_tree(tmp)
            if out.exists() and not force:
                raise FlexmoeError(
                    f"{out} appeared while this run was writing it (written by another program).",
                    "nothing was replaced; choose another --out or pass --force.",
                )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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


def save_pretrained_atomic(model, tokenizer, out: Path, files: dict[str, Any] | None = None) -> None:
    """An HF model directory (safetensors weights + tokenizer, and ``files``: name -> JSON object) at
    ``out``, replacing it atomically."""
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        for name, obj in (files or {}).items():
            write_json(tmp / name, obj)


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
