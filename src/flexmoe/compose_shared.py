"""Merging the shared tensors that post-trained experts changed (embeddings, LM head, attention, norms,
the anchor FFN slot), with exact opt-out.

Every package that trained shared tensors carries them as deltas from the anchor
(``shared_delta.safetensors``). A merged tensor is computed from the anchor's tensor and the deltas
of the experts in the model, in expert order:

- ``mean`` (BAR): the plain unweighted mean over the anchor and every expert, the anchor counted as
  one: ``anchor + sum(deltas) / (experts + 1)``; an expert without a delta for a tensor counts as the
  anchor. Each expert's change is diluted to 1/N.
- ``ties`` (TIES-merging, Yadav et al. 2023): trim each delta to its largest-magnitude ``density``
  share, elect a sign per entry by the sign of the summed trimmed deltas, and average only the
  entries that agree with it (the disjoint mean), so a change only one expert made is kept whole
  instead of being diluted by experts that did not touch it.
- ``disjoint``: per entry, the mean over the experts that changed it (an entry one expert changed keeps
  that change whole; entries several changed get their mean; the anchor does not count). Made for
  deltas confined to each owner's own embedding and LM-head rows (``StageSettings.shared_rows``), which
  barely overlap: there it is the sum of the changes, each kept whole.
- ``sum`` (task arithmetic with scale 1, Ilharco et al. 2023): ``anchor + sum(deltas)``; every owner's
  change is kept whole, and changes several owners made to the same entry add up.

Exact opt-out: a composed model keeps every expert's delta file (``flexmoe_shared/NAME.safetensors``,
the package's bytes, hashed in ``flexmoe.json``) and names its anchor by path and fingerprint.
``remove``/``add``/``update`` re-merge from the anchor and the remaining deltas, so removing an owner
gives bit for bit the tensors of a composition that never had it. The anchor must still be at its
recorded path (checked by fingerprint); the deltas cost one extra copy of what each owner changed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from flexmoe.anchor import fingerprint
from flexmoe.checkpoint import TensorReader
from flexmoe.errors import FlexmoeError
from flexmoe.fileio import sha256_file

METHODS = ("mean", "ties", "disjoint", "sum")
# Measured in BENCHMARKS.md (post-training): with owner-row deltas it keeps each owner's change whole
# where the mean keeps a quarter of it (3 owners + the anchor) and loses the owners' task gains.
DEFAULT = "disjoint"
SHARED_DIR = "flexmoe_shared"
TIES_DENSITY = 0.2


def _summed(base: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros_like(base, dtype=torch.float32)
    for d in deltas:
        acc += d
    return acc


def merge_mean(base: torch.Tensor, deltas: list[torch.Tensor], n_experts: int) -> torch.Tensor:
    return (base.float() + _summed(base, deltas) / (n_experts + 1)).to(base.dtype)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` share of entries with the largest magnitude (ties at the cut kept)."""
    k = max(1, round(delta.numel() * density))
    if k >= delta.numel():
        return delta
    cut = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= cut, delta, torch.zeros_like(delta))


def merge_ties(
    base: torch.Tensor, deltas: list[torch.Tensor], n_experts: int, density: float = TIES_DENSITY
) -> torch.Tensor:
    if not deltas:
        return base
    trimmed = [trim(d.float(), density) for d in deltas]
    total = torch.zeros_like(trimmed[0])
    for t in trimmed:
        total += t
    sign = total.sign()
    agree_sum, agree_n = torch.zeros_like(total), torch.zeros_like(total)
    for t in trimmed:
        keep = (t.sign() == sign) & (t != 0)
        agree_sum += torch.where(keep, t, torch.zeros_like(t))
        agree_n += keep.float()
    return (base.float() + agree_sum / agree_n.clamp(min=1)).to(base.dtype)


def merge_disjoint(base: torch.Tensor, deltas: list[torch.Tensor], n_experts: int) -> torch.Tensor:
    touched = torch.zeros_like(base, dtype=torch.float32)
    for d in deltas:
        touched += (d != 0).float()
    return (base.float() + _summed(base, deltas) / touched.clamp(min=1)).to(base.dtype)


def merge_sum(base: torch.Tensor, deltas: list[torch.Tensor], n_experts: int) -> torch.Tensor:
    return (base.float() + _summed(base, deltas)).to(base.dtype)


MERGES = {"mean": merge_mean, "ties": merge_ties, "disjoint": merge_disjoint, "sum": merge_sum}


@dataclass
class MergedReader:
    """The anchor's tensors with the experts' shared deltas merged in, read lazily one at a time (the
    ``TensorReader`` interface ``compose.write_model`` streams from)."""

    anchor: object  # TensorReader of the anchor
    delta_files: list[Path | None]  # one per owner expert, in expert order (None: no shared change)
    method: str

    def __post_init__(self):
        if self.method not in METHODS:
            raise FlexmoeError(f"Unknown shared merge {self.method!r}.", f"use one of {', '.join(METHODS)}.")
        self.keys = []
        for f in self.delta_files:
            if f is None:
                self.keys.append(set())
                continue
            with safe_open(str(f), "pt") as sf:
                self.keys.append(set(sf.keys()))
        unknown = set().union(*self.keys) - set(self.anchor.names())
        if unknown:
            raise FlexmoeError(
                f"Shared deltas name tensors the anchor lacks ({sorted(unknown)[:3]}).",
                "the package does not fit this anchor.",
            )

    def __contains__(self, name: str) -> bool:
        return name in self.anchor

    def names(self) -> list[str]:
        return self.anchor.names()

    def get(self, name: str) -> torch.Tensor:
        base = self.anchor.get(name)
        deltas = []
        for f, keys in zip(self.delta_files, self.keys, strict=True):
            if name in keys:
                with safe_open(str(f), "pt") as sf:
                    d = sf.get_tensor(name)
                if d.shape != base.shape:
                    raise FlexmoeError(
                        f"{f}: delta {name} has shape {list(d.shape)}, the anchor {list(base.shape)}.",
                        "the package does not fit this anchor.",
                    )
                deltas.append(d)
        if not deltas:
            return base
        return MERGES[self.method](base, deltas, len(self.delta_files))


def record(experts, method: str, anchor_path: Path) -> dict:
    """The ``shared_merge`` entry of ``flexmoe.json``: method, anchor path, each delta file's hash."""
    return {
        "method": method,
        "anchor_path": str(Path(anchor_path).resolve()),
        "deltas": {
            e.name: e.manifest["files"].get("shared_delta.safetensors") for e in experts if e.delta_file
        },
        "density": TIES_DENSITY if method == "ties" else None,
    }


def check_kept(meta: dict, experts) -> None:
    """Before re-merging: each kept delta file must still hash as ``flexmoe.json`` recorded it."""
    recorded = (meta.get("shared_merge") or {}).get("deltas", {})
    for e in experts:
        if e.delta_file is not None and e.delta_file.parent.name == SHARED_DIR:
            if sha256_file(e.delta_file) != recorded.get(e.name):
                raise FlexmoeError(
                    f"{e.delta_file} does not match its SHA-256 in flexmoe.json (tampered or truncated).",
                    "restore the model directory, or compose again from the packages.",
                )


def keep_deltas(out: Path, experts) -> None:
    """Copy each expert's delta file into the composed model (what exact opt-out re-merges from)."""
    for e in experts:
        if e.delta_file is not None:
            (out / SHARED_DIR).mkdir(exist_ok=True)
            shutil.copy2(e.delta_file, out / SHARED_DIR / f"{e.name}.safetensors")


def anchor_reader(meta: dict, anchor: Path | None = None):
    """The anchor of a composed model, checked by fingerprint (for re-merging after opt-out)."""
    path = Path(anchor or meta.get("shared_merge", {}).get("anchor_path") or meta["anchor"]["path"])
    if not path.is_dir() or fingerprint(path) != meta["anchor"]["fingerprint"]:
        raise FlexmoeError(
            f"Re-merging the shared tensors needs the anchor this model was composed from; {path} is "
            "missing or a different model.",
            "restore the anchor at that path (or pass its directory as anchor=...).",
        )
    return TensorReader(path)
