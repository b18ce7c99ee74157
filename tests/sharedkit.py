"""Helpers of the shared-tensor tests (``--shared-rows``, ``--shared-attention``): a short expert run
with the public mix, and a model directory's tensors."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from flexmoe.expert.train import ExpertSpec, train_expert

KW = dict(steps=12, seq_len=64, quiet=True)


def train(anchor: Path, data: Path, name: str, out: Path, **kw) -> dict:
    """Train ``name``'s expert on ``data / name`` with the demo's public data mixed in."""
    spec = ExpertSpec(name=name, router_init="hidden")
    return train_expert(anchor, [data / name], name, out, spec=spec, public=[data / "public"], **{**KW, **kw})


def weights(path: Path) -> dict:
    """Every tensor of the safetensors files in ``path``."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def opt_out_weights(anchor: Path, packages: list[Path], root: Path) -> tuple[dict, dict, dict]:
    """The tensors of the composition of ``packages``, of the first package alone, and of the first
    composition with the last owner (``math``) removed."""
    from flexmoe.compose import UNSIGNED_OK, compose, remove

    compose(anchor, packages, root / "both", provenance=UNSIGNED_OK)
    compose(anchor, packages[:1], root / "first_only", provenance=UNSIGNED_OK)
    remove(root / "both", "math", root / "removed")
    return tuple(weights(root / n) for n in ("both", "first_only", "removed"))
