"""Bounded-memory checkpoint I/O: read tensors one at a time, write size-limited shards.

A ``ShardWriter`` takes tensors in a fixed order and flushes a shard whenever the next tensor would
push it past ``max_shard_bytes``; peak memory is about one shard, whatever the model's size. The same
tensor stream always produces byte-identical files, which is what lets ``remove`` equal a fresh
``compose`` without that expert.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexmoe.errors import FlexmoeError
from flexmoe.fileio import read_json, sha256_file, write_json

INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Write ``(name, tensor)`` pairs into ``model-0000k-of-0000n.safetensors`` shards plus an index.

    A model that fits one shard is written as a single ``model.safetensors`` (HF convention).
    """

    def __init__(self, out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out, self.max = Path(out), max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.pending or any(name in s for s in self.shards):
            raise ValueError(f"duplicate tensor {name}")
        size = tensor_bytes(tensor)
        if self.pending and self.pending_bytes + size > self.max:
            self._flush()
        self.pending[name] = tensor.detach().cpu().contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        k = len(self.shards)
        save_file(self.pending, str(self.out / f".shard-{k:05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush, give shards their final names, write the index; returns the weight file names."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        )
        for k, name in enumerate(names):
            os.replace(self.out / f".shard-{k:05d}.safetensors", self.out / name)
        if n > 1:
            weight_map = {t: names[k] for k, shard in enumerate(self.shards) for t in shard}
            write_json(self.out / INDEX, {"metadata": {"total_size": self.total}, "weight_map": weight_map})
        return names


class TensorReader:
    """Random access to the tensors of a checkpoint directory without loading it whole."""

    def __init__(self, path: Path):
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            self.where = {k: self.path / v for k, v in read_json(index)["weight_map"].items()}
        elif (self.path / "model.safetensors").is_file():
            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                self.where = {k: self.path / "model.safetensors" for k in f.keys()}
        else:
            raise FlexmoeError(f"{self.path} has no model weights.", "pass a model directory.")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return sorted(self.where)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.where[name]), "pt") as f:
            return f.get_tensor(name).clone()  # a copy, so no page of the mapping stays resident

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)


class StateReader:
    """The ``TensorReader`` interface over an in-memory state dict (for exporting trained models)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def names(self) -> list[str]:
        return sorted(self.state)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def weight_hashes(path: Path) -> dict[str, str]:
    """SHA-256 of every weight file of a checkpoint (recorded in flexmoe.json)."""
    files = sorted({p.name for p in TensorReader(path).where.values()})
    return {f: sha256_file(Path(path) / f) for f in files}


RUN_INPUTS = "inputs.json"


def check_run_inputs(work: Path, resume: bool, **inputs: str) -> None:
    """Record what an unfinished run trains on (data fingerprints, anchor, name) beside its checkpoint;
    a resumed run must be given the same, or it is refused (a code run resumed with math data would
    otherwise produce a package claiming the wrong data)."""
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 records; every rank reads the same data
        return
    path = Path(work) / RUN_INPUTS
    if resume and path.is_file():
        saved = read_json(path)
        diff = sorted(k for k in set(saved) | set(inputs) if saved.get(k) != inputs.get(k))
        if diff:
            raise FlexmoeError(
                f"The interrupted run in {work} was started with other {', '.join(diff)}.",
                "resume with the original --data and settings, or pass --force to start over.",
            )
        return
    write_json(path, inputs)
