"""The expert package: the only thing that leaves a data owner's machine.

A directory with ``expert.safetensors`` (the owner expert's FFN weights for every layer, its router
rows and biases) and ``expert.json`` (the manifest: who, what, against which anchor, how trained, a
SHA-256 of every tensor file, a hash of the training data, never the data itself). No pickle anywhere.

Tensor names inside ``expert.safetensors``::

    layers.{L}.gate_proj.weight  [I, H]     layers.{L}.router.weight  [H]
    layers.{L}.up_proj.weight    [I, H]     layers.{L}.router.bias    []   (<= 0)
    layers.{L}.down_proj.weight  [H, I]     layers.{L}.public_router.weight  [H]  (the frozen r_pub)
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from flexmoe import __version__
from flexmoe.errors import FlexmoeError
from flexmoe.fileio import atomic_dir, read_json, sha256_file, write_json
from flexmoe.moe import moe_blocks
from flexmoe.parallel import full

TENSOR_FILE = "expert.safetensors"
MANIFEST = "expert.json"
FORMAT = "flexmoe-expert/1"
FFN = ("gate_proj", "up_proj", "down_proj")


def expert_tensors(model) -> dict[str, torch.Tensor]:
    """Collect the owner expert (index 1 of every 2-expert block) from a trained expert model."""
    out: dict[str, torch.Tensor] = {}
    for i, block in enumerate(moe_blocks(model)):
        expert, row, public = block.experts[1], block.router[1], block.router[0]
        for proj in FFN:
            out[f"layers.{i}.{proj}.weight"] = full(getattr(expert, proj).weight.detach()).cpu().contiguous()
        out[f"layers.{i}.router.weight"] = full(row.weight.detach()).cpu().view(-1).contiguous()
        out[f"layers.{i}.router.bias"] = full(row.bias.detach()).cpu().view(()).contiguous()
        out[f"layers.{i}.public_router.weight"] = full(public.weight.detach()).cpu().view(-1).contiguous()
    return out


def write_package(out: Path, tensors: dict[str, torch.Tensor], manifest: dict, force: bool = False) -> dict:
    """Write a package atomically; fills in the format, hashes, version and creation time."""
    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": "pt"})
        manifest = {
            **manifest,
            "format": FORMAT,
            "flexmoe_version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "files": {TENSOR_FILE: sha256_file(tmp / TENSOR_FILE)},
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in sorted(tensors.items())
            },
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def verify(path: Path) -> dict:
    """Check a package: manifest present, file hashes match, tensors as the manifest lists them.

    Returns the manifest. Any mismatch (tampered, truncated, or incomplete package) is a FlexmoeError.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FlexmoeError(
            f"{path} is not an expert package (no {MANIFEST}).", "pass the directory the owner shipped."
        )
    manifest = read_json(path / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise FlexmoeError(f"{path}: unknown package format {manifest.get('format')!r}.", "upgrade flexmoe.")
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise FlexmoeError(f"{path}: {name} is missing.", "ask the owner to re-send the whole package.")
        if sha256_file(f) != digest:
            raise FlexmoeError(
                f"{path}: {name} does not match its SHA-256 in {MANIFEST} (tampered or truncated).",
                "ask the owner to re-send the package; do not use this copy.",
            )
    try:
        with safe_open(str(path / TENSOR_FILE), "pt") as sf:
            found = {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
    except SafetensorError as e:
        raise FlexmoeError(
            f"{path}: {TENSOR_FILE} is unreadable ({e}).", "ask the owner to re-send it."
        ) from e
    listed = {k: v["shape"] for k, v in manifest["tensors"].items()}
    if found != listed:
        raise FlexmoeError(
            f"{path}: tensors differ from the manifest.", "ask the owner to re-send the package."
        )
    return manifest


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a verified package."""
    verify(path)
    return load_file(str(Path(path) / TENSOR_FILE))


def package_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
