"""The on-disk formats: anchor metadata, expert package manifest, composed model's ``flexmoe.json``.

Each is a typed, versioned schema (pydantic) with one reader and one writer that every command uses.
Readers migrate older files (the unversioned ``flexmoe-expert/1`` / ``flexmoe-model/1`` files written
before schema versions existed are version 1) and refuse newer versions and malformed files with the
file named. Unknown extra fields are kept (forward compatible within a version).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flexmoe import __version__, validate
from flexmoe.errors import FlexmoeError
from flexmoe.fileio import read_json, write_json
from flexmoe.signing import SIGNATURE

EXPERT_MANIFEST = "expert.json"
EXPERT_FORMAT = "flexmoe-expert/1"
MODEL_META = "flexmoe.json"
MODEL_FORMAT = "flexmoe-model/1"
ANCHOR_META = "flexmoe_anchor.json"
SCHEMA_VERSION = 1


class _Schema(BaseModel):
    model_config = ConfigDict(extra="allow")


class AnchorRef(_Schema):
    fingerprint: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")


class TensorInfo(_Schema):
    shape: list[int]
    dtype: str


class ExpertManifest(_Schema):
    """``expert.json``: who, what, against which anchor, how trained; hashes of the tensor files."""

    schema_version: int = SCHEMA_VERSION
    format: str = EXPERT_FORMAT
    name: str
    anchor: AnchorRef
    files: dict[str, str] = Field(min_length=1)
    tensors: dict[str, TensorInfo] = Field(min_length=1)
    dp: dict[str, Any] | None = None


class ModelExpert(_Schema):
    position: int
    name: str
    manifest: dict[str, Any]
    signer: str | None = None  # key id that signed the package (trust on first use)


class ModelMeta(_Schema):
    """``flexmoe.json``: which experts are inside (with their manifests), anchor, hashes, history."""

    schema_version: int = SCHEMA_VERSION
    format: str = MODEL_FORMAT
    flexmoe_version: str = __version__
    anchor: dict[str, Any]
    history: list[dict[str, Any]]
    top_k: int = Field(ge=1)
    experts: list[ModelExpert] = Field(min_length=1)
    weights_sha256: dict[str, str] = Field(default_factory=dict)
    bias_file: str | None = None
    router_training: dict[str, Any] | None = None
    router_calibration: dict[str, Any] | None = None


class AnchorMeta(_Schema):
    """``flexmoe_anchor.json``: how a pretrained anchor was made (never trusted for its fingerprint)."""

    schema_version: int = SCHEMA_VERSION


# --------------------------------------------------------------------------------------------------
# Migration: one function per format taking any older raw dict to the current version.


def _migrate(raw: Any, path: Path, fmt: str | None) -> dict:
    if not isinstance(raw, dict):
        raise FlexmoeError(f"{path} is not a JSON object.", "restore the file; do not use this copy.")
    if fmt is not None and raw.get("format") != fmt:
        raise FlexmoeError(
            f"{path}: unknown format {raw.get('format')!r} (expected {fmt}).", "upgrade flexmoe."
        )
    version = raw.get("schema_version", 1)  # files written before versions existed are version 1
    if not isinstance(version, int) or version < 1:
        raise FlexmoeError(f"{path}: invalid schema_version {version!r}.", "restore the file.")
    if version > SCHEMA_VERSION:
        raise FlexmoeError(
            f"{path} has schema version {version}; this flexmoe reads up to {SCHEMA_VERSION}.",
            "upgrade flexmoe.",
        )
    return {**raw, "schema_version": SCHEMA_VERSION}


def migrate_expert_manifest(raw: Any, path: Path = Path(EXPERT_MANIFEST)) -> dict:
    return _migrate(raw, path, EXPERT_FORMAT)


def migrate_model_meta(raw: Any, path: Path = Path(MODEL_META)) -> dict:
    return _migrate(raw, path, MODEL_FORMAT)


def _parse(schema: type[_Schema], raw: dict, path: Path) -> dict:
    try:
        return schema.model_validate(raw).model_dump(mode="json")
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "(top level)"
        raise FlexmoeError(
            f"{path} is malformed: {where}: {first['msg']} ({e.error_count()} problem(s)).",
            "do not use this copy; ask its author to re-send it.",
        ) from None


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except UnicodeDecodeError as e:
        raise FlexmoeError(
            f"{path} is not UTF-8 JSON (byte offset {e.start}).", "restore the file."
        ) from None


# --------------------------------------------------------------------------------------------------
# Expert package manifest


def read_expert_manifest(package: Path) -> dict:
    """The validated, migrated manifest of an expert package directory."""
    path = Path(package) / EXPERT_MANIFEST
    if not path.is_file():
        raise FlexmoeError(
            f"{package} is not an expert package (no {EXPERT_MANIFEST}).",
            "pass the directory the owner shipped.",
        )
    m = _parse(ExpertManifest, migrate_expert_manifest(_read(path), path), path)
    validate.name(m["name"], f"{path}: expert name")
    for field in ("description", "contact", "license"):
        if isinstance(m.get(field), str):
            validate.printable(m[field].replace("\n", " "), f"{path}: {field}")
    return m


def new_expert_manifest(manifest: dict, files: dict[str, str], tensors: dict[str, dict]) -> dict:
    """The complete manifest of a package being written (format, version, time, hashes filled in)."""
    m = {
        **manifest,
        "schema_version": SCHEMA_VERSION,
        "format": EXPERT_FORMAT,
        "flexmoe_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
        "tensors": tensors,
    }
    return _parse(ExpertManifest, m, Path(EXPERT_MANIFEST))


def write_expert_manifest(package: Path, manifest: dict) -> None:
    """Write ``expert.json``. Rewriting the manifest of a signed package drops its signature (which
    no longer holds): the owner signs again with ``flexmoe expert sign``."""
    manifest = _parse(ExpertManifest, {**manifest, "schema_version": SCHEMA_VERSION}, Path(EXPERT_MANIFEST))
    write_json(Path(package) / EXPERT_MANIFEST, manifest)
    (Path(package) / SIGNATURE).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Composed model


def read_model_meta(model: Path) -> dict:
    """The validated, migrated ``flexmoe.json`` of a composed model directory."""
    path = Path(model) / MODEL_META
    if not path.is_file():
        raise FlexmoeError(
            f"{model} is not a flexmoe model (no {MODEL_META}).", "pass a directory made by compose."
        )
    meta = _parse(ModelMeta, migrate_model_meta(_read(path), path), path)
    for e in meta["experts"]:
        validate.name(e["name"], f"{path}: expert name")
    return meta


def new_model_meta(
    base: dict,
    top_k: int,
    experts: list[tuple[str, dict, str | None]],
    weights_sha256: dict[str, str],
    bias_file: str,
) -> dict:
    """The ``flexmoe.json`` of a model being written. ``base`` holds ``anchor``, ``history`` and
    optional records (router training/calibration); ``experts`` are (name, manifest, signer)."""
    meta = {
        **base,
        "schema_version": SCHEMA_VERSION,
        "format": MODEL_FORMAT,
        "flexmoe_version": __version__,
        "top_k": top_k,
        "experts": [
            {"position": i, "name": n, "manifest": m, "signer": s} for i, (n, m, s) in enumerate(experts)
        ],
        "weights_sha256": weights_sha256,
        "bias_file": bias_file,
    }
    return _parse(ModelMeta, meta, Path(MODEL_META))


def carry_model_meta(meta: dict, event: dict, **records: dict | None) -> dict:
    """The base of a model derived from ``meta`` (add/update/remove/router training): its anchor, its
    history plus ``event``, and the records that still hold (given ones replace old ones)."""
    base = {"anchor": meta["anchor"], "history": meta["history"] + [event]}
    if meta.get("router_training") is not None:
        base["router_training"] = meta["router_training"]
    base.update({k: v for k, v in records.items() if v is not None})
    return base


def write_model_meta(model: Path, meta: dict) -> None:
    write_json(Path(model) / MODEL_META, _parse(ModelMeta, meta, Path(MODEL_META)))


# --------------------------------------------------------------------------------------------------
# Anchor metadata


def read_anchor_meta(anchor: Path) -> dict | None:
    path = Path(anchor) / ANCHOR_META
    if not path.is_file():
        return None
    return _parse(AnchorMeta, _migrate(_read(path), path, None), path)


def write_anchor_meta(anchor: Path, summary: dict) -> None:
    write_json(Path(anchor) / ANCHOR_META, {**summary, "schema_version": SCHEMA_VERSION})
