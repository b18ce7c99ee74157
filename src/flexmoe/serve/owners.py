"""The owner registry: who owns which expert, their API keys (only as salted scrypt hashes), and which
experts their owners have switched off.

A key is ``fmk_<id>_<secret>``: the id finds the record without trying every hash, the secret is checked
against ``scrypt(secret, salt)`` (hashlib, RFC 7914). The registry is one JSON file, rewritten atomically.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from flexmoe.errors import FlexmoeError
from flexmoe.fileio import read_json, write_json

SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_secret(secret: str, salt: bytes | None = None) -> dict:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, dklen=32, **SCRYPT)
    return {"kdf": "scrypt", **SCRYPT, "salt": salt.hex(), "hash": digest.hex()}


def check_secret(secret: str, record: dict) -> bool:
    params = {k: record[k] for k in ("n", "r", "p")}
    digest = hashlib.scrypt(secret.encode(), salt=bytes.fromhex(record["salt"]), dklen=32, **params)
    return hmac.compare_digest(digest.hex(), record["hash"])


def new_key() -> tuple[str, str, str]:
    """``(key, id, secret)`` for a fresh key."""
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
    return f"fmk_{key_id}_{secret}", key_id, secret


def split_key(key: str) -> tuple[str, str] | None:
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != "fmk" or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


@dataclass
class Owner:
    name: str
    expert: str
    key_id: str
    key_hash: dict
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


class Registry:
    """Owners and admin key in one JSON file; thread-safe; verified keys cached by their SHA-256."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._verified: dict[str, str] = {}  # sha256(key) -> owner name ("" for the admin)
        self.owners: dict[str, Owner] = {}
        self.admin: dict | None = None
        self.disabled: set[str] = set()
        if self.path and self.path.is_file():
            raw = read_json(self.path)
            self.owners = {n: Owner(**o) for n, o in raw.get("owners", {}).items()}
            self.admin = raw.get("admin")
            self.disabled = set(raw.get("disabled", []))

    def save(self) -> None:
        if self.path is None:
            return
        write_json(
            self.path,
            {
                "version": 1,
                "owners": {n: asdict(o) for n, o in sorted(self.owners.items())},
                "admin": self.admin,
                "disabled": sorted(self.disabled),
            },
        )

    def add(self, name: str, expert: str) -> str:
        """Register an owner of ``expert``; returns the new key (shown once, never stored)."""
        with self._lock:
            if name in self.owners:
                raise FlexmoeError(f"Owner {name!r} already exists.", "pick another name or remove it first.")
            if any(o.expert == expert for o in self.owners.values()):
                raise FlexmoeError(f"Expert {expert!r} already has an owner.", "one owner per expert.")
            key, key_id, secret = new_key()
            self.owners[name] = Owner(name, expert, key_id, hash_secret(secret))
            self.save()
            return key

    def set_admin(self) -> str:
        with self._lock:
            key, key_id, secret = new_key()
            self.admin = {"key_id": key_id, **hash_secret(secret)}
            self.save()
            return key

    def owner_of(self, expert: str) -> str | None:
        return next((o.name for o in self.owners.values() if o.expert == expert), None)

    def identify(self, key: str | None) -> str | None:
        """Owner name for a valid key, ``""`` for the admin key, None for no or a wrong key."""
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).hexdigest()
        if digest in self._verified:
            return self._verified[digest]
        parts = split_key(key)
        if parts is None:
            return None
        key_id, secret = parts
        who = None
        if (
            self.admin
            and hmac.compare_digest(self.admin["key_id"], key_id)
            and check_secret(secret, self.admin)
        ):
            who = ""
        for o in self.owners.values():
            if who is None and o.key_id == key_id and check_secret(secret, o.key_hash):
                who = o.name
        if who is not None:
            self._verified[digest] = who
        return who

    def set_enabled(self, expert: str, enabled: bool) -> None:
        with self._lock:
            (self.disabled.discard if enabled else self.disabled.add)(expert)
            self.save()
