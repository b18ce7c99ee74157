"""Ed25519 signatures over whole directories (expert packages and composed models).

A signature covers a canonical JSON document listing the SHA-256 of every file in the directory
(manifest included, so every field of it is covered, and every tensor file), so changing, adding,
removing or renaming anything after signing breaks it. ``signature.json`` beside the files holds the
signer's public key, its key id and the signature; *which* keys a verifier accepts is its own choice
(``Trust``): a pinned set of owners' public keys (``--trust``), or trust on first use, where the key
that signed an expert is recorded in the composed model and must sign every later update of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flexmoe.errors import FlexmoeError
from flexmoe.fileio import atomic_write_bytes, sha256_file

SIGNATURE = "signature.json"
SCHEMA_VERSION = 1
# What a signature signs (part of the signed bytes: a package's signature cannot pass for a model's).
PACKAGE_KIND = "flexmoe expert package"
MODEL_KIND = "flexmoe composed model"


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Ed25519PublicKey) -> str:
    """A short, stable name of a public key (what manifests and messages show)."""
    return "ed25519:" + hashlib.sha256(_raw(pub)).hexdigest()[:32]


def generate_keys(out: Path, force: bool = False) -> tuple[Path, Path, str]:
    """A new key pair: the private key at ``out`` (PEM, mode 600), the public key at ``out.pub``."""
    out = Path(out)
    pub_path = out.with_name(out.name + ".pub")
    for p in (out, pub_path):
        if p.exists() and not force:
            raise FlexmoeError(f"{p} already exists.", "choose another --out (never overwrite a key).")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    os.chmod(out, 0o600)
    atomic_write_bytes(pub_path, public)
    return out, pub_path, key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    if not path.is_file():
        raise FlexmoeError(f"Signing key {path} does not exist.", "create one with 'flexmoe keys generate'.")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise FlexmoeError(
            f"{path} is not an unencrypted PEM private key.", "pass the file 'flexmoe keys generate' wrote."
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise FlexmoeError(f"{path} is not an Ed25519 key.", "create one with 'flexmoe keys generate'.")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (ValueError, TypeError, OSError) as e:
        raise FlexmoeError(
            f"{path} is not a PEM public key.", "pass a KEY.pub from 'flexmoe keys generate'."
        ) from e
    if not isinstance(key, Ed25519PublicKey):
        raise FlexmoeError(
            f"{path} is not an Ed25519 public key.", "pass a KEY.pub from 'flexmoe keys generate'."
        )
    return key


@dataclass(frozen=True)
class Trust:
    """What a verifier accepts. ``keys`` (key id -> public key): only these signers; None = any valid
    signature (trust on first use, pinned by the caller). ``allow_unsigned``: accept unsigned input.
    The default, ``Trust()``, is what every user-facing load and compose does: signed by anyone."""

    allow_unsigned: bool = False
    keys: dict[str, Ed25519PublicKey] | None = field(default=None)

    @classmethod
    def from_paths(cls, paths, allow_unsigned: bool = False) -> Trust:
        """Public keys from files and directories (every ``*.pub`` inside); none given: TOFU."""
        if not paths:
            return cls(allow_unsigned=allow_unsigned)
        keys = {}
        for p in map(Path, paths):
            files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
            if not files or not all(f.is_file() for f in files):
                raise FlexmoeError(
                    f"--trust {p}: no public key file(s) found.", "pass KEY.pub files or a directory of them."
                )
            for f in files:
                k = load_public_key(f)
                keys[key_id(k)] = k
        return cls(allow_unsigned=allow_unsigned, keys=keys)

    def __reduce__(self):
        # Key objects do not pickle; their raw bytes do (a Trust travels to worker processes).
        raw = None if self.keys is None else {k: _raw(v) for k, v in self.keys.items()}
        return (_trust_from_raw, (self.allow_unsigned, raw))


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _trust_from_raw(allow_unsigned: bool, raw: dict[str, bytes] | None) -> Trust:
    keys = None if raw is None else {k: Ed25519PublicKey.from_public_bytes(v) for k, v in raw.items()}
    return Trust(allow_unsigned=allow_unsigned, keys=keys)


# Accept unsigned input on purpose (the CLI's --allow-unsigned): a signature that is there must still
# hold. For tests, and for a model this process is building itself.
ALLOW_UNSIGNED = Trust(allow_unsigned=True)

# How to accept what is unsigned, and whose key to trust, by kind (for the refusal messages).
_UNSIGNED_FIX = {
    PACKAGE_KIND: "ask its owner to sign it ('flexmoe expert sign'), or pass --allow-unsigned to accept it "
    "(Python: provenance=flexmoe.compose.UNSIGNED_OK).",
    MODEL_KIND: "ask the maintainer for a signed copy (compose --sign-key) and pass their key with --trust "
    "MAINTAINER.pub, or pass --allow-unsigned to accept it (Python: trust=flexmoe.signing.ALLOW_UNSIGNED).",
}
_UNTRUSTED_FIX = {
    PACKAGE_KIND: "add the owner's public key with --trust, or refuse the package.",
    MODEL_KIND: "pass the maintainer's public key with --trust, or refuse the model.",
}


def file_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of every file in ``directory`` (recursively, relative names) except the signature."""
    directory = Path(directory)
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != SIGNATURE
    }


def _payload(kind: str, hashes: dict[str, str]) -> bytes:
    """The canonical bytes that are signed: sorted keys, no whitespace, ASCII only."""
    doc = {"schema_version": SCHEMA_VERSION, "kind": kind, "files": hashes}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_dir(directory: Path, key: Ed25519PrivateKey, kind: str) -> str:
    """Sign every file of ``directory`` (written as ``signature.json`` inside it); returns the key id."""
    hashes = file_hashes(directory)
    pub = key.public_key()
    record = {
        "schema_version": SCHEMA_VERSION,
        "algorithm": "ed25519",
        "kind": kind,
        "key_id": key_id(pub),
        "public_key": base64.b64encode(_raw(pub)).decode(),
        "files": hashes,
        "signature": base64.b64encode(key.sign(_payload(kind, hashes))).decode(),
    }
    atomic_write_bytes(
        Path(directory) / SIGNATURE, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
    )
    return record["key_id"]


def verify_dir(directory: Path, kind: str, trust: Trust) -> str | None:
    """Check ``directory``'s signature under ``trust``; returns the signer's key id (None: unsigned and
    allowed). Every refusal is a ``FlexmoeError`` naming the directory."""
    directory = Path(directory)
    sig = directory / SIGNATURE
    if not sig.is_file():
        if trust.allow_unsigned:
            return None
        raise FlexmoeError(
            f"{directory} is not signed (no {SIGNATURE}).",
            _UNSIGNED_FIX.get(kind, "pass --allow-unsigned to accept it."),
        )
    try:
        record = json.loads(sig.read_text(encoding="utf-8"))
        raw = base64.b64decode(record["public_key"], validate=True)
        pub = Ed25519PublicKey.from_public_bytes(raw)
        signature = base64.b64decode(record["signature"], validate=True)
        ok_kind = record.get("kind") == kind and record.get("algorithm") == "ed25519"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise FlexmoeError(f"{sig} is malformed ({type(e).__name__}).", "do not use this copy.") from e
    kid = key_id(pub)
    if not ok_kind:
        raise FlexmoeError(f"{sig} does not sign a {kind}.", "do not use this copy.")
    try:
        pub.verify(signature, _payload(kind, file_hashes(directory)))
    except InvalidSignature:
        raise FlexmoeError(
            f"{directory}: the signature by {kid} does not match the files (changed, added, removed or "
            "renamed after signing).",
            "do not use this copy; ask its author to re-send it.",
        ) from None
    if trust.keys is not None and kid not in trust.keys:
        raise FlexmoeError(
            f"{directory} is signed by {kid}, which is not among the --trust keys.",
            _UNTRUSTED_FIX.get(kind, "pass the signer's public key with --trust."),
        )
    return kid
