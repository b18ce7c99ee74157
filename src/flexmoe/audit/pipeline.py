"""The canary audit end to end: plant secrets into an owner's data, train what the owner could ship
(a FlexOlmo expert, DP experts, and the dense fine-tuned model FlexOlmo replaces), compose, and
measure what leaks from each: canary exposure, membership AUC and the extraction rate.

Every step writes under ``workdir`` and is skipped when its output exists, so an interrupted audit
continues where it stopped; the secrets stay in ``workdir/canaries.json``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console

from flexmoe.anchor import load_anchor, resolve
from flexmoe.audit.canaries import (
    PREFIX,
    Canary,
    exposure,
    load_canaries,
    make_canaries,
    plant,
    save_canaries,
)
from flexmoe.audit.extraction import ExtractionConfig, extraction_attack
from flexmoe.audit.membership import membership_auc_blocks
from flexmoe.compose import compose
from flexmoe.data import blocks_for, load_splits
from flexmoe.evaluate.baselines import dense_expert
from flexmoe.evaluate.run import load_lm
from flexmoe.expert.privacy import DPConfig
from flexmoe.expert.train import EXPERT_PRESETS, ExpertSpec, train_expert
from flexmoe.fileio import atomic_dir, atomic_write_bytes, save_pretrained_atomic, write_json
from flexmoe.tokenizer import load_tokenizer


@dataclass
class AuditSizes:
    """How much each attack looks at (the paper's extraction sizes are ExtractionConfig's defaults)."""

    candidates: int = 1000  # random secrets per exposure estimate (cap: log2(candidates + 1) bits)
    membership_blocks: int = 128  # training blocks and as many held-out blocks
    extraction: ExtractionConfig | None = field(default_factory=ExtractionConfig)


def membership_sets(
    train_docs: Sequence[str], held_out_docs: Sequence[str], tokenizer, seq_len: int, n: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` blocks the owner trained on (packed exactly as in training) and ``n`` held-out blocks."""
    def pick(blocks: torch.Tensor, salt: str) -> torch.Tensor:
        idx = random.Random(f"{seed}-{salt}").sample(range(len(blocks)), min(n, len(blocks)))
        return blocks[sorted(idx)]

    return (
        pick(blocks_for(train_docs, tokenizer, seq_len), "in"),
        pick(blocks_for(held_out_docs, tokenizer, seq_len), "out"),
    )


def audit_lm(
    lm,
    *,
    canaries: Sequence[Canary] | None = None,
    length: int = 10,
    members: torch.Tensor | None = None,
    non_members: torch.Tensor | None = None,
    extraction_docs: Sequence[str] | None = None,
    sizes: AuditSizes | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Every attack whose inputs are given, against one model (an ``HFLM``)."""
    sizes = sizes or AuditSizes()
    out = {}
    if canaries:
        out["exposure"] = exposure(lm, canaries, length, sizes.candidates)
    if members is not None and non_members is not None:
        out["membership"] = membership_auc_blocks(lm, members, non_members)
    if extraction_docs and sizes.extraction is not None:
        out["extraction"] = extraction_attack(lm, extraction_docs, sizes.extraction, progress)
    return out


def summary_row(result: dict) -> dict:
    """The headline numbers of one model's audit (for tables)."""
    row = {}
    if "exposure" in result:
        row.update({f"exposure_x{r}": v for r, v in result["exposure"]["mean_by_repeats"].items()})
    if "membership" in result:
        row["membership_auc"] = result["membership"]["auc"]
    if "extraction" in result:
        row["extraction_rate"] = result["extraction"]["rate"]
    return row


def canary_audit(
    anchor: Path,
    data: list[Path],
    workdir: Path,
    *,
    name: str = "owner",
    public: list[Path] | None = None,
    public_mix: float = 0.3,
    preset: str = "tiny",
    steps: int | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    dp_epsilons: Sequence[float] = (8.0,),
    dp_steps: int | None = None,
    dp_batch_size: int | None = None,
    dp_lr: float | None = None,
    dense: bool = True,
    other_experts: Sequence[Path] = (),
    held_out: list[Path] | None = None,
    repeats: Sequence[int] = (1, 10, 100),
    per_repeat: int = 3,
    length: int = 10,
    sizes: AuditSizes | None = None,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    """Run (or continue) the audit in ``workdir``; returns the report, also written to ``audit.json``."""
    console = Console(stderr=True, highlight=False, quiet=quiet)
    sizes = sizes or AuditSizes()
    workdir, anchor = Path(workdir), resolve(anchor)
    workdir.mkdir(parents=True, exist_ok=True)
    seq_len = seq_len or EXPERT_PRESETS[preset].seq_len
    planted_dir, secrets_file = workdir / "data", workdir / "canaries.json"

    if not planted_dir.exists():
        console.print("[bold cyan]== planting canaries[/]")
        splits = load_splits(data)
        canaries = make_canaries(repeats, per_repeat, controls=per_repeat, length=length, seed=seed)
        with atomic_dir(planted_dir, force=True) as tmp:
            _write_jsonl(tmp / "train.jsonl", plant(splits.train, canaries, seed))
            _write_jsonl(tmp / "valid.jsonl", splits.valid)
        save_canaries(secrets_file, canaries, length)
    canaries, length = load_canaries(secrets_file)
    planted = load_splits([planted_dir])

    spec = ExpertSpec(name=name, description=f"{name} (canary audit)", router_init="hidden")
    common = dict(
        preset=preset, seq_len=seq_len, public=public, public_mix=public_mix, quiet=quiet, spec=spec
    )
    packages = {"expert": workdir / "experts" / "expert"}
    if not packages["expert"].exists():
        console.print("[bold cyan]== training the FlexOlmo expert[/]")
        train_expert(
            anchor, [planted_dir], name, packages["expert"], steps=steps, batch_size=batch_size, **common
        )
    for eps in dp_epsilons:
        key = f"dp_eps{eps:g}"
        packages[key] = workdir / "experts" / key
        if not packages[key].exists():
            console.print(f"[bold cyan]== training the DP expert, epsilon {eps:g}[/]")
            train_expert(
                anchor,
                [planted_dir],
                name,
                packages[key],
                steps=dp_steps or steps,
                batch_size=dp_batch_size or batch_size,
                lr=dp_lr,
                dp=DPConfig(epsilon=eps),
                # Data-free owner row under DP, trained against the same public row as the expert.
                **{**common, "spec": replace(spec, router_init="random", public_row=spec.router_init)},
            )
    models = {"public": anchor}
    tok = load_tokenizer(anchor)
    if dense:
        models["dense"] = workdir / "models" / "dense"
        if not models["dense"].exists():
            console.print("[bold cyan]== training the dense expert (full fine-tuning)[/]")
            ep = EXPERT_PRESETS[preset]
            m, _ = dense_expert(
                load_anchor(anchor),
                tok,
                planted_dir,
                steps=steps or ep.steps,
                batch_size=batch_size or ep.batch_size,
                seq_len=seq_len,
                quiet=quiet,
            )
            save_pretrained_atomic(m, tok, models["dense"])
    for key, pkg in packages.items():
        models[key] = workdir / "models" / key
        if not models[key].exists():
            compose(anchor, [pkg], models[key])
    if other_experts:
        models["composed"] = workdir / "models" / "composed"
        if not models["composed"].exists():
            compose(anchor, [packages["expert"], *other_experts], models["composed"])

    held = load_splits(held_out).train if held_out else planted.valid
    members, non_members = membership_sets(
        planted.train,  # packed exactly as in training, so members are the blocks the models saw
        held,
        tok,
        seq_len,
        sizes.membership_blocks,
        seed,
    )
    results = {}
    for key, path in models.items():
        console.print(f"[bold cyan]== auditing {key}[/]")
        results[key] = audit_lm(
            load_lm(path),
            canaries=canaries,
            length=length,
            members=members,
            non_members=non_members,
            extraction_docs=[d for d in planted.train if not d.startswith(PREFIX)],
            sizes=sizes,
            progress=lambda m: console.print(f"   {m}"),
        )
        console.print("   " + "  ".join(f"{k} {v:.3g}" for k, v in summary_row(results[key]).items()))
    report = {
        "models": results,
        "summary": {k: summary_row(v) for k, v in results.items()},
        "canaries": {
            "repeats": sorted({c.repeats for c in canaries}),
            "per_repeat": per_repeat,
            "length": length,
        },
        "membership": {"members": len(members), "non_members": len(non_members), "block_tokens": seq_len},
    }
    write_json(workdir / "audit.json", report)
    return report


def _write_jsonl(path: Path, docs: Sequence[str]) -> None:
    atomic_write_bytes(path, "".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
