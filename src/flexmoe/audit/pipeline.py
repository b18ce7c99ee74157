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
from flexmoe.audit.membership import membership_auc, membership_auc_blocks
from flexmoe.compose import UNSIGNED_OK, compose
from flexmoe.data import blocks_for, load_splits, read_documents
from flexmoe.evaluate.baselines import dense_expert
from flexmoe.evaluate.run import load_lm
from flexmoe.expert.privacy import DPSettings
from flexmoe.expert.train import EXPERT_PRESETS, ExpertSpec, train_expert
from flexmoe.fileio import atomic_dir, atomic_write_bytes, save_pretrained_atomic, write_json
from flexmoe.signing import ALLOW_UNSIGNED, Trust
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


@dataclass
class CanaryAuditSettings:
    """``flexmoe audit canaries``'s settings besides its paths."""

    name: str = "owner"
    public: list[Path] | None = None
    public_mix: float = 0.3
    preset: str = "tiny"
    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None  # None: the preset's
    dp_epsilons: Sequence[float] = (8.0,)
    dp_steps: int | None = None
    dp_batch_size: int | None = None
    dp_lr: float | None = None
    dense: bool = True
    other_experts: Sequence[Path] = ()
    held_out: list[Path] | None = None
    repeats: Sequence[int] = (1, 10, 100)
    per_repeat: int = 3
    length: int = 10
    sizes: AuditSizes | None = None
    seed: int = 0
    quiet: bool = False


@dataclass
class _Planted:
    """The owner's data with canaries planted, and the secrets."""

    dir: Path
    splits: object
    canaries: list
    length: int


def canary_audit(
    anchor: Path, data: list[Path], workdir: Path, settings: CanaryAuditSettings | None = None, **overrides
) -> dict:
    """Run (or continue) the audit in ``workdir``; returns the report, also written to ``audit.json``.

    ``settings`` (or keyword ``overrides`` of its fields) say how."""
    s = replace(settings or CanaryAuditSettings(), **overrides)
    console = Console(stderr=True, highlight=False, quiet=s.quiet)
    workdir, anchor = Path(workdir), resolve(anchor)
    workdir.mkdir(parents=True, exist_ok=True)
    seq_len = s.seq_len or EXPERT_PRESETS[s.preset].seq_len
    planted = _plant(workdir, data, s, console)
    packages = _train_packages(anchor, planted.dir, workdir, s, seq_len, console)
    tok = load_tokenizer(anchor)
    models = {"public": anchor}
    if s.dense:
        models["dense"] = _dense_model(anchor, planted.dir, workdir, tok, s, seq_len, console)
    models |= _composed_models(anchor, packages, workdir, s.other_experts)
    held = load_splits(s.held_out).train if s.held_out else planted.splits.valid
    sizes = s.sizes or AuditSizes()
    # Packed exactly as in training, so members are the blocks the models saw.
    members, non_members = membership_sets(
        planted.splits.train, held, tok, seq_len, sizes.membership_blocks, s.seed
    )
    results = {}
    for key, path in models.items():
        console.print(f"[bold cyan]== auditing {key}[/]")
        results[key] = audit_lm(
            # Models this audit composed itself, unsigned (the dense ones are plain HF checkpoints).
            load_lm(path, trust=ALLOW_UNSIGNED),
            canaries=planted.canaries,
            length=planted.length,
            members=members,
            non_members=non_members,
            extraction_docs=[d for d in planted.splits.train if not d.startswith(PREFIX)],
            sizes=sizes,
            progress=lambda m: console.print(f"   {m}"),
        )
        console.print("   " + "  ".join(f"{k} {v:.3g}" for k, v in summary_row(results[key]).items()))
    report = {
        "models": results,
        "summary": {k: summary_row(v) for k, v in results.items()},
        "canaries": {
            "repeats": sorted({c.repeats for c in planted.canaries}),
            "per_repeat": s.per_repeat,
            "length": planted.length,
        },
        "membership": {"members": len(members), "non_members": len(non_members), "block_tokens": seq_len},
    }
    write_json(workdir / "audit.json", report)
    return report


def _plant(workdir: Path, data: list[Path], s: CanaryAuditSettings, console) -> _Planted:
    """Plant the canaries into the owner's training split once; later runs reuse them."""
    planted_dir, secrets_file = workdir / "data", workdir / "canaries.json"
    if not planted_dir.exists():
        console.print("[bold cyan]== planting canaries[/]")
        splits = load_splits(data)
        canaries = make_canaries(s.repeats, s.per_repeat, controls=s.per_repeat, length=s.length, seed=s.seed)
        with atomic_dir(planted_dir, force=True) as tmp:
            _write_jsonl(tmp / "train.jsonl", plant(splits.train, canaries, s.seed))
            _write_jsonl(tmp / "valid.jsonl", splits.valid)
        save_canaries(secrets_file, canaries, s.length)
    canaries, length = load_canaries(secrets_file)
    return _Planted(planted_dir, load_splits([planted_dir]), canaries, length)


def _train_packages(anchor, planted_dir, workdir, s: CanaryAuditSettings, seq_len: int, console) -> dict:
    """The ordinary FlexOlmo expert and one DP expert per epsilon, trained on the planted data."""
    spec = ExpertSpec(name=s.name, description=f"{s.name} (canary audit)", router_init="hidden")
    common = dict(
        preset=s.preset, seq_len=seq_len, public=s.public, public_mix=s.public_mix, quiet=s.quiet, spec=spec
    )
    packages = {"expert": workdir / "experts" / "expert"}
    if not packages["expert"].exists():
        console.print("[bold cyan]== training the FlexOlmo expert[/]")
        out = packages["expert"]
        train_expert(anchor, [planted_dir], s.name, out, steps=s.steps, batch_size=s.batch_size, **common)
    for eps in s.dp_epsilons:
        key = f"dp_eps{eps:g}"
        packages[key] = workdir / "experts" / key
        if not packages[key].exists():
            console.print(f"[bold cyan]== training the DP expert, epsilon {eps:g}[/]")
            train_expert(
                anchor,
                [planted_dir],
                s.name,
                packages[key],
                steps=s.dp_steps or s.steps,
                batch_size=s.dp_batch_size or s.batch_size,
                lr=s.dp_lr,
                dp=DPSettings(epsilon=eps),
                # Data-free owner row under DP, trained against the same public row as the expert.
                **{**common, "spec": replace(spec, router_init="random", public_row=spec.router_init)},
            )
    return packages


def _dense_model(anchor, planted_dir, workdir, tok, s: CanaryAuditSettings, seq_len: int, console) -> Path:
    """The dense baseline: the anchor fully fine-tuned on the planted data."""
    out = workdir / "models" / "dense"
    if not out.exists():
        console.print("[bold cyan]== training the dense expert (full fine-tuning)[/]")
        ep = EXPERT_PRESETS[s.preset]
        m, _ = dense_expert(
            load_anchor(anchor),
            tok,
            planted_dir,
            steps=s.steps or ep.steps,
            batch_size=s.batch_size or ep.batch_size,
            seq_len=seq_len,
            quiet=s.quiet,
        )
        save_pretrained_atomic(m, tok, out)
    return out


def _composed_models(anchor, packages: dict, workdir: Path, other_experts) -> dict:
    """Each package composed alone, and the expert with the other owners' experts."""
    models = {}
    for key, pkg in packages.items():
        models[key] = workdir / "models" / key
        if not models[key].exists():
            compose(anchor, [pkg], models[key], provenance=UNSIGNED_OK)
    if other_experts:
        models["composed"] = workdir / "models" / "composed"
        if not models["composed"].exists():
            compose(anchor, [packages["expert"], *other_experts], models["composed"], provenance=UNSIGNED_OK)
    return models


def _write_jsonl(path: Path, docs: Sequence[str]) -> None:
    atomic_write_bytes(path, "".join(json.dumps({"text": d}) + "\n" for d in docs).encode())


# --------------------------------------------------------------------------------------------------
# One attack against a model directory (what the ``flexmoe audit`` commands run)


def audit_extraction(
    model: Path,
    data: list[Path],
    include=None,
    exclude=None,
    cfg: ExtractionConfig | None = None,
    progress=None,
    trust: Trust | None = None,
) -> dict:
    """The extraction attack on ``model`` (any subset of its experts) over ``data``'s training split.
    ``trust``: a composed model's signature (as ``runtime.from_pretrained``)."""
    lm = load_lm(model, include, exclude, trust=trust)
    return extraction_attack(lm, load_splits(data).train, cfg, progress=progress)


def audit_exposure(
    model: Path,
    canaries_file: Path,
    include=None,
    exclude=None,
    candidates: int = 1000,
    trust: Trust | None = None,
) -> dict:
    """Exposure of the canaries in ``canaries_file`` (written by ``canary_audit``) under ``model``."""
    cs, length = load_canaries(canaries_file)
    return exposure(load_lm(model, include, exclude, trust=trust), cs, length, candidates)


def audit_membership(
    model: Path,
    members: list[Path],
    non_members: list[Path],
    include=None,
    exclude=None,
    max_tokens: int = 256,
    max_documents: int = 500,
    trust: Trust | None = None,
) -> dict:
    """Loss-based membership inference: AUC of training vs held-out documents."""
    ins, outs = read_documents(members)[:max_documents], read_documents(non_members)[:max_documents]
    return membership_auc(load_lm(model, include, exclude, trust=trust), ins, outs, max_tokens)
