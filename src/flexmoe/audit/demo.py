"""The demo's privacy section: DP experts for one owner, their utility, and what leaks from each model.

Canaries are planted into that owner's training data when the demo builds its corpora, so the
ordinary FlexOlmo expert, the dense fine-tuned baseline and the composed model are audited without
extra training. The section then trains DP experts for the same owner (same data, same public mix,
router rows initialised at random: the other inits are statistics of the data outside DP-SGD) and:

- utility: the composed FlexOlmo model with the owner's expert replaced by the DP expert
  (``flexmoe.compose.update``), scored like the rest of the demo on the owner's test perplexity, the
  public test perplexity and the owner's cloze task; epsilon = infinity is the ordinary FlexOlmo model;
- audit: canary exposure, loss membership AUC (training vs held-out blocks) and the extraction rate of
  the public model, the dense expert, the owner's expert alone (public + owner expert, top-2 of 2; for
  the ordinary and each DP expert) and the composed model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from flexmoe.audit.canaries import PREFIX, load_canaries, make_canaries, plant_jsonl, save_canaries
from flexmoe.audit.extraction import ExtractionConfig
from flexmoe.audit.pipeline import AuditSizes, audit_lm, membership_sets, summary_row
from flexmoe.compose import Provenance, compose, update
from flexmoe.data import load_splits, read_documents
from flexmoe.evaluate.run import EvalSettings, evaluate_lm, load_lm
from flexmoe.expert.package import signed_package
from flexmoe.expert.privacy import DPSettings
from flexmoe.expert.train import EXPERT_PRESETS, ExpertSpec, train_expert
from flexmoe.fileio import read_json
from flexmoe.jobs import Job, on_loaded
from flexmoe.signing import Trust
from flexmoe.tokenizer import load_tokenizer


@dataclass(frozen=True)
class PrivacyPreset:
    owner: str = "legal"
    epsilons: tuple[float, ...] = (1.0, 8.0)
    dp_steps: int = 60
    dp_batch_size: int = 8
    dp_lr: float | None = None  # None: the expert preset's
    repeats: tuple[int, ...] = (1, 10, 100)
    per_repeat: int = 4
    length: int = 10
    candidates: int = 1000
    membership_blocks: int = 64
    extraction: ExtractionConfig = field(
        default_factory=lambda: ExtractionConfig(prefix_tokens=32, suffix_tokens=32, samples=2, documents=24)
    )


PRIVACY_PRESETS = {
    "tiny": PrivacyPreset(dp_steps=45),
    "small": PrivacyPreset(dp_steps=40, dp_batch_size=64),
    "test": PrivacyPreset(
        epsilons=(8.0,),
        dp_steps=2,
        dp_batch_size=4,
        repeats=(1, 10),
        per_repeat=1,
        candidates=20,
        membership_blocks=4,
        extraction=ExtractionConfig(prefix_tokens=8, suffix_tokens=8, samples=1, documents=2),
    ),
}
CANARIES = "canaries.json"


def plant_demo_canaries(workdir: Path, data: Path, pp: PrivacyPreset) -> bool:
    """Plant canaries into the owner's training split before anyone trains on it; returns whether
    the data holds canaries (a work directory from before this section has none, and keeps none)."""
    if (data / CANARIES).exists():
        return True
    trained = (workdir / "owners" / pp.owner / "expert").exists() or (workdir / "models").exists()
    if trained:
        return False
    canaries = make_canaries(pp.repeats, pp.per_repeat, controls=pp.per_repeat, length=pp.length)
    train = data / pp.owner / "train.jsonl"
    plant_jsonl(train, train, canaries)
    save_canaries(data / CANARIES, canaries, pp.length)  # last: its presence means "planted"
    return True


def domain_utility(lm, data: Path, owner: str, settings: EvalSettings) -> dict:
    """The owner's and the public test perplexity and the owner's cloze task, scored by the demo's
    own evaluation with its settings (so the numbers compare with the demo's table)."""
    only = replace(settings, domains=("public", owner), only_tasks=(f"{owner}_cloze",))
    r = evaluate_lm(lm, data, only)
    return {"perplexity": r["perplexity"], "tasks": r["tasks"]}


@dataclass
class PrivacyRun:
    """Where the demo's privacy section runs and with which of the demo's settings."""

    workdir: Path
    data: Path
    anchor: Path
    pp: PrivacyPreset
    expert_preset: str
    router_init: str
    public_mix: float
    eval_blocks: int
    eval_items: int | None
    steps: object  # flexmoe.demo.Steps: runs, times and prints each step
    quiet: bool
    owner_key: object  # the owner's Ed25519 private key: it signs its DP packages
    provenance: Provenance  # the maintainer's: owners' keys trusted, the models it writes signed
    trust: Trust  # a model user's: the composed models audited load signed by the maintainer


def privacy_section(run: PrivacyRun, report: dict) -> dict:
    """Train the DP experts (skipped when they exist), build the models to audit, score and audit."""
    pp = run.pp
    dp_pkgs = _train_dp_experts(run)
    audited, utility = _dp_models_and_utility(run, report, dp_pkgs)
    audits, members = _audit_models(run, audited)
    return {
        "owner": pp.owner,
        "canaries_planted": (run.data / "canaries.json").exists(),
        "epsilons": list(pp.epsilons),
        "dp": {k: read_json(p / "expert.json")["dp"] for k, p in dp_pkgs.items()},
        "utility": utility,
        "utility_model": f"flexolmo with the {pp.owner} expert replaced by the DP expert (compose.update)",
        "audit": {k: {"summary": summary_row(v), **v} for k, v in audits.items()},
        "audit_sizes": {
            "candidates": pp.candidates,
            "membership_blocks": members,
            "extraction": asdict(pp.extraction),
        },
        "settings": {"dp_steps": pp.dp_steps, "dp_batch_size": pp.dp_batch_size, "dp_lr": pp.dp_lr},
    }


def dp_packages(run: PrivacyRun) -> dict[str, Path]:
    """Where the owner's DP experts live, by epsilon (``eps1``, ``eps8``)."""
    home = run.workdir / "owners" / run.pp.owner
    return {f"eps{eps:g}": home / f"expert_dp_eps{eps:g}" for eps in run.pp.epsilons}


def dp_expert_jobs(run: PrivacyRun) -> list[Job]:
    """A job per DP expert not trained yet: one per epsilon, against the federation's public row."""
    pp = run.pp
    owner, home = pp.owner, run.workdir / "owners" / pp.owner
    spec = ExpertSpec(
        name=owner,
        description=f"demo {owner} data, DP",
        router_init="random",
        public_row=run.router_init if run.router_init != "random" else None,
    )
    kwargs = dict(spec=spec, steps=pp.dp_steps, batch_size=pp.dp_batch_size, lr=pp.dp_lr)
    kwargs |= dict(public=[home / "public"], public_mix=run.public_mix, quiet=run.quiet)
    jobs = []
    for eps, (key, out) in zip(pp.epsilons, dp_packages(run).items(), strict=True):
        if out.exists():
            continue
        jobs.append(
            Job(
                f"dp expert {owner} {key}",
                train_expert,
                (run.anchor, [home / "data"], owner, out, run.expert_preset),
                dict(kwargs, dp=DPSettings(epsilon=eps)),
            )
        )
    return jobs


def _train_dp_experts(run: PrivacyRun) -> dict[str, Path]:
    """The DP experts (trained here unless they exist), each signed by the owner."""
    run.steps.run_all(dp_expert_jobs(run))
    return {key: signed_package(pkg, run.owner_key) for key, pkg in dp_packages(run).items()}


def _dp_models_and_utility(run: PrivacyRun, report: dict, dp_pkgs: dict) -> tuple[dict, dict]:
    """The models to audit (composed as needed) and each DP model's utility on the owner's domain."""
    owner, models, anchor = run.pp.owner, run.workdir / "models", run.anchor
    seq_len = EXPERT_PRESETS[run.expert_preset].seq_len

    def built(out: Path, fn, *args) -> Path:
        if not out.exists():
            run.steps.run("privacy: compose", fn, *args, out, provenance=run.provenance)
        return out

    audited = {"public": anchor, f"dense_{owner}": models / f"dense_{owner}", "flexolmo": models / "flexolmo"}
    home = run.workdir / "owners" / owner
    audited[f"expert_{owner}"] = built(models / f"expert_{owner}", compose, anchor, [home / "expert"])
    utility = {"inf": {k: report["models"]["flexolmo"][k] for k in ("perplexity", "tasks")}}
    for key, pkg in dp_pkgs.items():
        audited[f"expert_{owner}_dp_{key}"] = built(
            models / f"expert_{owner}_dp_{key}", compose, anchor, [pkg]
        )
        flex = built(models / f"flexolmo_dp_{key}", update, models / "flexolmo", pkg)
        utility[key.removeprefix("eps")] = run.steps.run(
            f"privacy: utility {key}",
            domain_utility,
            load_lm(flex, trust=run.trust),
            run.data,
            owner,
            EvalSettings(seq_len=seq_len, max_blocks=run.eval_blocks, max_items=run.eval_items),
        )
    pub = report["models"]["public"]
    for u in utility.values():  # share of the expert's loss reduction on the owner's test data kept
        gain = math.log(pub["perplexity"][owner] / utility["inf"]["perplexity"][owner])
        u["owner_loss_gain_kept"] = (
            math.log(pub["perplexity"][owner] / u["perplexity"][owner]) / gain if gain > 0 else None
        )
    return audited, utility


def _audit_models(run: PrivacyRun, audited: dict) -> tuple[dict, int]:
    """Canary exposure, membership and extraction of every model; returns them and the member count."""
    pp, data = run.pp, run.data
    owner, home = pp.owner, run.workdir / "owners" / pp.owner
    planted = (data / "canaries.json").exists()
    canaries, length = load_canaries(data / "canaries.json") if planted else (None, pp.length)
    trained_on = load_splits([home / "data"]).train  # packed as in training: members are real blocks
    held_out = read_documents([data / owner / "valid.jsonl", data / owner / "test.jsonl"])
    seq_len = EXPERT_PRESETS[run.expert_preset].seq_len
    members, non_members = membership_sets(
        trained_on, held_out, load_tokenizer(run.anchor), seq_len, pp.membership_blocks
    )
    sizes = AuditSizes(
        candidates=pp.candidates, membership_blocks=pp.membership_blocks, extraction=pp.extraction
    )
    kwargs = dict(
        canaries=canaries,
        length=length,
        members=members,
        non_members=non_members,
        extraction_docs=[d for d in trained_on if not d.startswith(PREFIX)],
        sizes=sizes,
    )
    names = [name for name, path in audited.items() if path.exists()]
    jobs = [
        Job(
            f"privacy: audit {name}",
            on_loaded,
            (audit_lm, partial(load_lm, audited[name], trust=run.trust)),
            kwargs,
        )
        for name in names
    ]
    audits = dict(zip(names, run.steps.run_all(jobs), strict=True))
    for name in names:
        row = summary_row(audits[name])
        run.steps.console.print(f"   {name}: " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()))
    return audits, len(members)
