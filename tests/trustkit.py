"""Tiny shared fixtures for the trust, tamper and bad-input tests: a random 2-layer anchor and
packages made directly from tensors (no training), so that every case runs in well under a second."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import make_anchor_dir

from flexmoe.anchor import fingerprint
from flexmoe.expert.package import write_package

DOCS = [f"document {i} about topic {i % 7}: " + "words and more words " * (3 + i % 5) for i in range(60)]


def anchor(root: Path) -> Path:
    return make_anchor_dir(root / "anchor", "olmo2", DOCS)


def package(anchor_dir: Path, out: Path, name: str, seed: int = 0, key=None, dp: dict | None = None) -> Path:
    """A valid expert package for ``anchor_dir`` with random FFN weights."""
    import json

    cfg = json.loads((anchor_dir / "config.json").read_text())
    H, I, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    from safetensors.torch import load_file

    pub = load_file(str(anchor_dir / "flexmoe_router.safetensors"))["hidden.public"]
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(L):
        t[f"layers.{i}.gate_proj.weight"] = torch.randn(I, H, generator=g) * 0.02
        t[f"layers.{i}.up_proj.weight"] = torch.randn(I, H, generator=g) * 0.02
        t[f"layers.{i}.down_proj.weight"] = torch.randn(H, I, generator=g) * 0.02
        t[f"layers.{i}.router.weight"] = torch.randn(H, generator=g)
        t[f"layers.{i}.router.bias"] = torch.tensor(-0.1)
        t[f"layers.{i}.public_router.weight"] = pub[i].clone()
    manifest = {
        "name": name,
        "description": f"{name} data",
        "contact": "",
        "license": "test",
        "anchor": {
            "fingerprint": fingerprint(anchor_dir),
            "model_type": cfg["model_type"],
            "num_hidden_layers": L,
            "hidden_size": H,
            "intermediate_size": I,
        },
        "router_init": "hidden",
        "bias_init": 0.0,
        "training": {"steps": 1, "lr": 1e-3, "seq_len": 64},
        "tokens_seen": 0,
        "seconds": 0.0,
        "data": {"fingerprint": "0" * 64, "train_documents": 1, "valid_documents": 1},
        "valid_loss": {"anchor": 1.0, "expert": 1.0},
        "dp": dp,
    }
    write_package(out, t, manifest, sign_key=key)
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
