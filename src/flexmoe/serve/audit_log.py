"""Append-only, hash-chained log of governance actions (JSON lines).

Entry ``i`` carries ``prev`` (the hash of entry ``i-1``, 64 zeros for the first) and ``hash`` =
SHA-256 of its own canonical JSON without ``hash``. Changing, dropping, reordering or inserting any
entry breaks the chain from there on, which ``verify`` reports with the line number.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from flexmoe.errors import FlexmoeError

GENESIS = "0" * 64


def _digest(entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class AuditLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ok, n, last, problem = verify(self.path) if self.path.exists() else (True, 0, GENESIS, "")
        if not ok:
            raise FlexmoeError(f"Audit log {self.path} is broken: {problem}", "restore it from a backup.")
        self._seq, self._last = n, last

    def append(self, actor: str, action: str, target: str, **detail) -> dict:
        with self._lock:
            entry = {
                "seq": self._seq,
                "time": datetime.now(timezone.utc).isoformat(),
                "actor": actor,
                "action": action,
                "target": target,
                "detail": detail,
                "prev": self._last,
            }
            entry["hash"] = _digest(entry)
            # O_APPEND + fsync: an entry is on disk before the action is reported done.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._seq, self._last = self._seq + 1, entry["hash"]
            return entry


def verify(path: Path) -> tuple[bool, int, str, str]:
    """``(ok, entries, last_hash, problem)`` for the log at ``path``."""
    prev, n = GENESIS, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                return False, n, prev, f"line {lineno} is not JSON"
            if entry.get("seq") != n:
                return False, n, prev, f"line {lineno}: sequence number {entry.get('seq')} (expected {n})"
            if entry.get("prev") != prev:
                return False, n, prev, f"line {lineno}: does not chain to the entry before it"
            if entry.get("hash") != _digest(entry):
                return False, n, prev, f"line {lineno}: content does not match its hash (edited)"
            prev, n = entry["hash"], n + 1
    return True, n, prev, ""
