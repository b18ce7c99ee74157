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

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from flexmoe import formats, prompt_centroids, signing, validate
from flexmoe.errors import FlexmoeError
from flexmoe.expert.privacy import epsilon_after
from flexmoe.fileio import atomic_dir, sha256_file
from flexmoe.moe import moe_blocks
from flexmoe.parallel import full

TENSOR_FILE = "expert.safetensors"
SHARED_FILE = "shared_delta.safetensors"  # post-training: shared tensors' change from the anchor
MANIFEST = formats.EXPERT_MANIFEST
FORMAT = formats.EXPERT_FORMAT
KIND = signing.PACKAGE_KIND
# The owner's routing statistics (flexmoe.routing_stats), written beside a package after it is built:
# not in the manifest (the package is unchanged), but bound to it by their own record's hashes.
STATS_FILE = "routing_stats.safetensors"
STATS_META = "routing_stats.json"
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


def write_package(
    out: Path,
    tensors: dict[str, torch.Tensor],
    manifest: dict,
    force: bool = False,
    sign_key=None,
    shared_deltas: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Write a package atomically; fills in the format, hashes, version and creation time.

    ``sign_key`` (an Ed25519 private key) signs it inside the same atomic write. ``shared_deltas``
    (post-training stages that train shared tensors: trained minus anchor, under the anchor's tensor
    names) go into ``shared_delta.safetensors``, hashed like the expert file."""
    with atomic_dir(out, force=force) as tmp:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": "pt"})
        files = {TENSOR_FILE: sha256_file(tmp / TENSOR_FILE)}
        if shared_deltas:
            save_file(shared_deltas, str(tmp / SHARED_FILE), metadata={"format": "pt"})
            files[SHARED_FILE] = sha256_file(tmp / SHARED_FILE)
            tensors_of = {k: list(v.shape) for k, v in sorted(shared_deltas.items())}
            manifest = {**manifest, "shared_deltas": {"file": SHARED_FILE, "tensors": tensors_of}}
        manifest = formats.new_expert_manifest(
            manifest,
            files,
            {
                k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in sorted(tensors.items())
            },
        )
        formats.write_expert_manifest(tmp, manifest)
        if sign_key is not None:
            signing.sign_dir(tmp, sign_key, KIND)
    return manifest


def sign_package(path: Path, key) -> str:
    """Sign an existing package (verified first, so a tampered copy is never signed)."""
    verify(path, signing.Trust(allow_unsigned=True))
    return signing.sign_dir(Path(path), key, KIND)


def signed_package(path: Path, key) -> Path:
    """``path`` signed by its owner: signed now unless a signature is already there (a run interrupted
    between training and signing, or a package from before its owner signed)."""
    if not (Path(path) / signing.SIGNATURE).is_file():
        sign_package(path, key)
    return Path(path)


def verify(path: Path, trust: signing.Trust | None = None) -> dict:
    """Check a package (``check``) and return its manifest."""
    return check(path, trust)[0]


def check(path: Path, trust: signing.Trust | None = None) -> tuple[dict, str | None]:
    """Check a package; returns the manifest and the signer's key id (None when unsigned and
    allowed). Any problem (tampered, truncated, incomplete, unlisted files, non-finite weights, a DP
    claim the accountant does not reproduce, a bad signature) is a FlexmoeError naming the package.

    ``trust`` None accepts unsigned packages but still refuses a signature that does not verify.
    """
    path = Path(path)
    trust = trust or signing.Trust(allow_unsigned=True)
    manifest = formats.read_expert_manifest(path)
    present = {
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.name not in (MANIFEST, signing.SIGNATURE) and not p.is_dir()
    }
    unlisted = sorted(present - set(manifest["files"]) - _check_side_files(path, present))
    if unlisted:
        raise FlexmoeError(
            f"{path}: file(s) not listed in {MANIFEST}: {', '.join(unlisted)}.",
            "remove them or ask the owner to re-send the package; unlisted files are never used.",
        )
    expected = {TENSOR_FILE, SHARED_FILE} if manifest.get("shared_deltas") else {TENSOR_FILE}
    if set(manifest["files"]) != expected:
        raise FlexmoeError(
            f"{path}: {MANIFEST} must list exactly {', '.join(sorted(expected))}.",
            "ask the owner to re-send it.",
        )
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise FlexmoeError(f"{path}: {name} is missing.", "ask the owner to re-send the whole package.")
        if sha256_file(f) != digest:
            raise FlexmoeError(
                f"{path}: {name} does not match its SHA-256 in {MANIFEST} (tampered or truncated).",
                "ask the owner to re-send the package; do not use this copy.",
            )
    signer = signing.verify_dir(path, KIND, trust)
    _check_tensors(path, manifest)
    _check_shared_deltas(path, manifest)
    if manifest.get(prompt_centroids.FIELD) is not None:  # sized by the router rows: [H]
        H = manifest["tensors"]["layers.0.router.weight"]["shape"][0]
        prompt_centroids.check_record(manifest[prompt_centroids.FIELD], H, str(path))
    if manifest.get("dp"):
        check_dp_claim(path, manifest["dp"])
    return manifest, signer


def _check_side_files(path: Path, present: set[str]) -> set[str]:
    """The routing statistics beside a package, if any: both files, their record's hashes matching the
    statistics and this package's tensors (stale or tampered ones are refused). Returns their names."""
    side = {STATS_FILE, STATS_META} & present
    if not side:
        return set()
    try:
        rec = json.loads((path / STATS_META).read_text(encoding="utf-8"))
        ok = (
            side == {STATS_FILE, STATS_META}
            and sha256_file(path / STATS_FILE) == rec["sha256"]
            and sha256_file(path / TENSOR_FILE) == rec["package_sha256"][TENSOR_FILE]
        )
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise FlexmoeError(
            f"{path}: its routing statistics ({STATS_META}, {STATS_FILE}) are incomplete or do not match "
            "their record or this package (stale or tampered).",
            "delete them, or ask the owner to recompute them: flexmoe expert stats PACKAGE --data DIR.",
        )
    return side


def _check_tensors(path: Path, manifest: dict) -> None:
    """Tensors exactly as listed, readable, finite (read one at a time: bounded memory)."""
    try:
        with safe_open(str(path / TENSOR_FILE), "pt") as sf:
            found = {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
            listed = {k: v["shape"] for k, v in manifest["tensors"].items()}
            if found != listed:
                raise FlexmoeError(
                    f"{path}: tensors differ from the manifest.", "ask the owner to re-send the package."
                )
            for k in sorted(found):
                validate.finite_tensor(sf.get_tensor(k), f"{path}: tensor {k}")
    except SafetensorError as e:
        raise FlexmoeError(
            f"{path}: {TENSOR_FILE} is unreadable ({e}).", "ask the owner to re-send it."
        ) from e


def check_dp_claim(path: Path, dp: dict) -> None:
    """Re-derive epsilon with the accountant from the recorded noise, sampling rate and steps; the
    claimed epsilon must match and stay within the target."""
    try:
        nm, q, steps = float(dp["noise_multiplier"]), float(dp["sample_rate"]), int(dp["steps"])
        delta, eps, target = float(dp["delta"]), float(dp["epsilon"]), float(dp["target_epsilon"])
        accountant = str(dp["accountant"])
        validate.number(nm, "noise_multiplier", low=0, low_open=True)
        validate.number(q, "sample_rate", low=0, high=1, low_open=True)
        validate.number(delta, "delta", low=0, high=1, low_open=True, high_open=True)
        validate.number(steps, "steps", low=0)
    except (KeyError, TypeError, ValueError, FlexmoeError) as e:
        raise FlexmoeError(
            f"{path}: the DP record is incomplete or invalid ({e}).", "do not use this copy."
        ) from None
    if accountant not in ("rdp", "prv"):
        raise FlexmoeError(f"{path}: unknown DP accountant {accountant!r}.", "do not use this copy.")
    derived = epsilon_after(accountant, nm, q, steps, delta)
    if not math.isclose(derived, eps, rel_tol=1e-6, abs_tol=1e-9) or eps > target * (1 + 1e-9):
        raise FlexmoeError(
            f"{path}: the DP record claims epsilon {eps:.6g} (target {target:g}), but the {accountant} "
            f"accountant gives {derived:.6g} for noise {nm:g}, sampling rate {q:g}, {steps} steps.",
            "refuse this package: its privacy claim is false.",
        )


def _check_shared_deltas(path: Path, manifest: dict) -> None:
    """A post-trained package's shared deltas: hashed in the manifest, as listed, finite."""
    if not manifest.get("shared_deltas"):
        return
    if SHARED_FILE not in manifest["files"]:
        raise FlexmoeError(f"{path}: {SHARED_FILE} is not hashed in {MANIFEST}.", "do not use this package.")
    with safe_open(str(path / SHARED_FILE), "pt") as sf:
        found = {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
        if found != manifest["shared_deltas"]["tensors"]:
            raise FlexmoeError(
                f"{path}: shared deltas differ from the manifest.", "ask the owner to re-send the package."
            )
        for k in sorted(found):
            validate.finite_tensor(sf.get_tensor(k), f"{path}: shared delta {k}")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a verified package."""
    verify(path)
    return load_file(str(Path(path) / TENSOR_FILE))


def package_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
