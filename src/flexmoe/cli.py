"""Command line: a thin layer over the Python API, one sub-command group per role.

Every user error is a ``FlexmoeError``: printed as one line naming the problem and the fix, exit code 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from flexmoe import prompt_centroids, signing, validate
from flexmoe.anchor import AnchorTrainSettings, inspect, pretrain, publish_router_init_for, resolve
from flexmoe.anchor_sft import sft_anchor
from flexmoe.audit import pipeline as audit_api
from flexmoe.audit.extraction import ExtractionConfig
from flexmoe.audit.pipeline import AuditSizes, canary_audit
from flexmoe.chat import read_chat_file
from flexmoe.compose import ComposeSettings, Provenance, add, compose, remove, update
from flexmoe.corpora import build_demo_corpora
from flexmoe.demo import run_demo
from flexmoe.errors import FlexmoeError
from flexmoe.evaluate.composition import CompositionSetup, evaluate_composition
from flexmoe.evaluate.harness import GROUP, export_lm_eval
from flexmoe.evaluate.report import composition_table, markdown
from flexmoe.evaluate.run import EvalSettings, evaluate_lm, load_lm, seq_len_of
from flexmoe.expert.package import check, package_bytes, sign_package
from flexmoe.expert.privacy import DPSettings
from flexmoe.expert.shared import OWNER_ROW_RATIO
from flexmoe.expert.stages import StageRun, add_prompt_centroid, settings_for, train_stage
from flexmoe.expert.train import PUBLIC_MIX, ExpertSpec, ExpertTrainSettings, train_expert
from flexmoe.fileio import write_json
from flexmoe.posttrain_demo import run_post_train_demo
from flexmoe.router.calibrate import calibrator
from flexmoe.router.proxy import ProxySettings, select_proxy
from flexmoe.router.train import RouterTrainSettings, train_router
from flexmoe.router_init import default_router_init
from flexmoe.routing_stats import compute_for_package, publish_anchor_stats
from flexmoe.runtime import from_pretrained, generate, routing_shares
from flexmoe.sequence_routing import SequenceRouting
from flexmoe.serve.cli import PROMPT_CALIBRATION
from flexmoe.serve.cli import register as register_serve
from flexmoe.signing import Trust, generate_keys, key_id, load_private_key
from flexmoe.training import is_main

console = Console(highlight=False, soft_wrap=True)
app = typer.Typer(
    help="flexmoe: train together, share nothing (FlexOlmo mixture-of-experts).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Corpora: build the embedded demo data.", no_args_is_help=True)
anchor_app = typer.Typer(
    help="Maintainer: pretrain or inspect the public anchor model.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
expert_app = typer.Typer(
    help="Data owner: train an expert on private data; inspect a package.", no_args_is_help=True
)
app.add_typer(anchor_app, name="anchor")
app.add_typer(expert_app, name="expert")
audit_app = typer.Typer(
    help="Privacy audit: extraction, canary exposure and membership inference against a model.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")
router_app = typer.Typer(
    help="Maintainer: train the router of a composed model on the owners' public proxy sets.",
    no_args_is_help=True,
)
app.add_typer(router_app, name="router")
register_serve(app)  # serve, owners, audit-log, ledger


def _print_json(obj) -> None:
    console.print_json(json.dumps(obj, default=str))


@data_app.command("demo")
def data_demo(
    out: Path = typer.Option(..., "--out", help="Directory to create (one sub-directory per domain)."),
    size_mb: float = typer.Option(
        None, help="Approximate megabytes of text per domain (default: 2 for demo, 1 for measure)."
    ),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    federation: str = typer.Option(
        "demo", help="demo (public, code, math, legal) or measure (9 owners; for measurement only)."
    ),
    task_items: int = typer.Option(100, min=1, help="Items per evaluation task, at most."),
) -> None:
    """Build an embedded federation (a broad public pool and owners), offline and deterministic."""
    stats = build_demo_corpora(
        out, size_mb=size_mb, force=force, federation=federation, task_items=task_items
    )
    for domain, s in stats.items():
        console.print(f"{domain:8s} " + "  ".join(f"{k} {v:,}" for k, v in s.items()))
    console.print(f"wrote {out}")


@anchor_app.command("train")
def anchor_train(
    data: Path = typer.Option(
        None, "--data", help="Public corpus: a directory (train/valid files) or a file."
    ),
    out: Path = typer.Option(..., "--out", help="Anchor directory to create (HF checkpoint)."),
    preset: str = typer.Option("tiny", help="Model size: tiny (CPU, <3 min), small or base (GPU)."),
    seed: int = typer.Option(0, help="Random seed (weights and data order)."),
    steps: int = typer.Option(None, help="Override the preset's number of optimiser steps."),
    vocab_size: int = typer.Option(None, help="Override the preset's tokenizer vocabulary size."),
    compile: bool = typer.Option(
        None, "--compile/--no-compile", help="torch.compile each decoder layer (default: on GPUs only)."
    ),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last checkpoint."),
    force: bool = typer.Option(False, help="Replace --out (and any interrupted run) if it exists."),
    stage: str = typer.Option(None, help="sft: post-train --anchor for chat on --chat (adds the template)."),
    base: str = typer.Option(None, "--anchor", help="With --stage sft: the pretrained anchor to post-train."),
    chat: Path = typer.Option(None, "--chat", help="With --stage sft: public chat data (JSONL messages)."),
    lr: float = typer.Option(1e-3, help="With --stage sft: peak learning rate."),
) -> None:
    """Pretrain a dense OLMo 2 anchor and its byte-level BPE tokenizer from scratch; or, with
    --stage sft, post-train an anchor for chat."""
    if stage is not None:
        _anchor_sft(stage, base, chat, out, steps=steps, lr=lr, seed=seed, resume=resume, force=force)
        return
    if data is None:
        raise FlexmoeError("No --data given.", "pass --data PUBLIC (or --stage sft, --anchor, --chat).")
    settings = AnchorTrainSettings(
        preset, seed, steps, vocab_size, compile=compile, resume=resume, force=force
    )
    s = pretrain(data, out, settings=settings)
    if s.get("finished"):
        console.print(
            f"final validation loss (all held-out blocks) {s['valid_loss']:.4f} "
            f"(perplexity {s['valid_perplexity']:.1f}); "
            f"unigram baseline {s['unigram_valid_loss']:.4f}; "
            f"{s['tokens_seen']:,} tokens in {s['seconds']:.0f}s"
        )
        console.print(f"wrote {out}  fingerprint {s['fingerprint']}")


def _anchor_sft(stage: str, base: str | None, chat: Path | None, out: Path, **kw) -> None:
    if stage != "sft" or not base or not chat:
        raise FlexmoeError(
            "Anchor post-training needs --stage sft, --anchor and --chat.",
            "e.g. --stage sft --anchor A --chat DIR --out A-sft.",
        )
    s = sft_anchor(base, chat, out, **{k: v for k, v in kw.items() if v is not None})
    if s.get("finished"):
        v = s["valid_loss"]
        console.print(
            f"chat validation loss (assistant tokens) {v['before']:.4f} -> {v['after']:.4f}; "
            f"{s['tokens_seen']:,} tokens in {s['seconds']:.0f}s"
        )
        console.print(f"wrote {out}  fingerprint {s['fingerprint']}")


@anchor_app.command("inspect")
def anchor_inspect(
    anchor: str = typer.Argument(..., help="Anchor directory or hub id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Architecture, parameter counts (shared vs FFN) and the anchor fingerprint."""
    info = inspect(anchor)
    if as_json:
        _print_json(info)
        return
    p = info["parameters"]
    console.print(f"{info['architecture']} ({info['model_type']}, family {info['family']})  {info['path']}")
    console.print(
        f"layers {info['layers']}  hidden {info['hidden_size']}  ffn {info['intermediate_size']}  "
        f"heads {info['attention_heads']}  vocab {info['vocab_size']}"
    )
    console.print(
        f"parameters {p['total']:,}  = shared {p['shared']:,} + FFN {p['ffn']:,} "
        f"({p['ffn'] / p['total']:.0%}; one expert adds {p['ffn']:,})"
    )
    console.print(f"fingerprint {info['fingerprint']}")


@anchor_app.command("router-init")
def anchor_router_init(
    anchor: Path = typer.Argument(..., help="Anchor directory (written into: flexmoe_router.*)."),
    public: list[Path] = typer.Option(..., "--public", help="Public documents (files or directories)."),
    embedder: str = typer.Option(
        "default",
        help="Sentence-transformers model name or path; 'default' = shipped all-MiniLM-L6-v2; 'none'.",
    ),
    n_docs: int = typer.Option(1000, help="Public documents to sample."),
    seq_len: int = typer.Option(256, help="Tokens per document used for the anchor's hidden states."),
) -> None:
    """Publish the public router row and embedder projection next to an existing anchor."""
    emb = None if embedder == "none" else embedder
    meta = publish_router_init_for(anchor, public, emb, n_docs, seq_len)
    console.print(f"published router init for {', '.join(meta['methods'])} from {meta['n_docs']} documents")


@anchor_app.command("centroid")
def anchor_centroid(
    anchor: Path = typer.Argument(
        ..., help="Chat anchor directory (its flexmoe_anchor.json gains the centroid)."
    ),
    chat: Path = typer.Option(
        ..., "--chat", help="Public chat data (directory with train.jsonl, or a file)."
    ),
) -> None:
    """Publish the public prompt centroid with a chat anchor post-trained before 'anchor train --stage
    sft' wrote it; models composed from the anchor afterwards carry it."""
    rec = prompt_centroids.publish(anchor, chat)
    console.print(f"published the public prompt centroid ({rec['prompts']} prompts) with {anchor}")


@anchor_app.command("routing-stats")
def anchor_routing_stats(
    anchor: Path = typer.Argument(..., help="Anchor directory (written into: flexmoe_routing_anchor.*)."),
    public: list[Path] = typer.Option(..., "--public", help="Public corpus (its training split is used)."),
) -> None:
    """Publish the public routing statistics (mean, covariance, constant direction) with the anchor."""
    meta = publish_anchor_stats(anchor, public)
    spread = ", ".join(f"{v:.3f}" for v in meta["const_cv"])
    console.print(f"published routing statistics from {meta['tokens']:,} public tokens; fold spread {spread}")


@expert_app.command("stats")
def expert_stats(
    package: Path = typer.Argument(..., help="Your expert package (statistics are written beside it)."),
    anchor: str = typer.Option(..., "--anchor", help="The anchor the expert was trained against."),
    data: list[Path] = typer.Option(..., "--data", help="Your data (its validation split is used)."),
    public: list[Path] = typer.Option(..., "--public", help="Public corpus (its training split)."),
) -> None:
    """Data owner: routing statistics of your expert (a few numbers per layer) to ship with it."""
    rec = compute_for_package(anchor, package, data, public)
    console.print(f"wrote routing statistics beside {package} ({len(rec['tensors'])} tensors)")
    if (Path(package) / signing.SIGNATURE).is_file():
        # The signature covers every file of the package directory, the statistics included.
        console.print("the package was signed: sign it again ('flexmoe expert sign') before sending it")


ROW_RATIO_HELP = (
    "--shared-rows owner: a token's rows are yours when it is at least this many times as frequent in your "
    "data as in --public (default 4)."
)
SHARED_ATTENTION_HELP = (
    "The attention projections train too (your own attention; kept whole only under flexmoe's sequence "
    "routing, merged with the other owners' in the stock export)."
)
SHARED_ROWS_HELP = (
    "Embedding/LM-head rows that train beside the FFN: none, owner (tokens frequent in your data and rare "
    "in --public) or all (BAR). Default: none; --stage sft: owner."
)


def _grpo(kl: float | None) -> dict | None:
    """``--kl`` as the rl stage's GRPO settings (None: the defaults)."""
    return None if kl is None else {"kl_coef": kl}


@expert_app.command("train")
def expert_train(
    anchor: str = typer.Option(..., "--anchor", help="Anchor directory or hub id."),
    data: list[Path] = typer.Option(
        ..., "--data", help="Private data: .txt/.jsonl/.parquet files or directories."
    ),
    name: str = typer.Option(..., "--name", help="Expert name (letters, digits, - _ .)."),
    out: Path = typer.Option(..., "--out", help="Expert package directory to create."),
    preset: str = typer.Option("tiny", help="Training length and batch: tiny (CPU), small, base (GPU)."),
    router_init: str = typer.Option(
        None, help="Router-row init: embed, hidden or random (default: embed; random with --dp-epsilon)."
    ),
    bias_init: float = typer.Option(0.0, help="Initial router bias (<= 0)."),
    description: str = typer.Option("", help="What the data is (goes into the manifest)."),
    contact: str = typer.Option("", help="Owner contact (goes into the manifest)."),
    license: str = typer.Option("proprietary: usage terms set by the owner", help="Licence / usage terms."),
    steps: int = typer.Option(None, help="Override the preset's optimiser steps."),
    batch_size: int = typer.Option(None, help="Override the preset's global batch (sequences per step)."),
    seq_len: int = typer.Option(None, help="Override the preset's sequence length."),
    lr: float = typer.Option(None, help="Override the preset's peak learning rate."),
    seed: int = typer.Option(0, help="Random seed (data order)."),
    public: list[Path] = typer.Option(
        None, "--public", help="Public documents to mix in (recommended: the router learns mine vs public)."
    ),
    public_mix: float = typer.Option(PUBLIC_MIX, help="Share of training sequences taken from --public."),
    fsdp: bool = typer.Option(False, help="Shard anchor and expert with FSDP2 (large anchors; torchrun)."),
    activation_checkpointing: bool = typer.Option(
        False, help="Recompute activations in the backward pass (less memory, ~1/3 more compute)."
    ),
    dp_epsilon: float = typer.Option(
        None, "--dp-epsilon", help="Train with differential privacy (DP-SGD) at this epsilon."
    ),
    dp_delta: float = typer.Option(
        None, "--dp-delta", help="DP delta (default 1/(10 N), N = privacy units)."
    ),
    dp_max_grad_norm: float = typer.Option(
        1.0, "--dp-max-grad-norm", help="Per-unit gradient clipping norm."
    ),
    dp_unit: str = typer.Option("sequence", "--dp-unit", help="Privacy unit: sequence or document."),
    dp_accountant: str = typer.Option("rdp", "--dp-accountant", help="Opacus accountant: rdp or prv."),
    public_row: str = typer.Option(
        None,
        "--public-row",
        help="DP: public router row of the federation, embed or hidden (default: embed).",
    ),
    dp_clipping: str = typer.Option(
        "auto",
        "--dp-clipping",
        help="Per-sample gradients: auto (hooks; ghost clipping on a GPU short of memory), hooks, ghost.",
    ),
    early_stop: int = typer.Option(
        3,
        "--early-stop",
        help="Stop after this many validations (10 per run) without a better held-out loss and keep the "
        "best weights; 0 = off.",
    ),
    compile: bool = typer.Option(
        None, "--compile/--no-compile", help="torch.compile each decoder layer (default: on GPUs only)."
    ),
    router_aux_loss: float = typer.Option(
        None, help="Weight of the 'mine vs public' routing loss (default 0.1 with --public, else 0)."
    ),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last checkpoint."),
    force: bool = typer.Option(False, help="Replace --out (and any interrupted run) if it exists."),
    stage: str = typer.Option(
        None, help="Post-training stage: mid (text), sft (chat --data), rl (tasks --data); BAR unfreezing."
    ),
    from_package: Path = typer.Option(None, "--from", help="Continue from this stage's package."),
    freeze_shared: bool = typer.Option(False, help="Frozen recipe: only expert FFN and router row train."),
    shared_rows: str = typer.Option(None, help=SHARED_ROWS_HELP),
    row_ratio: float = typer.Option(None, help=ROW_RATIO_HELP),
    shared_attention: bool = typer.Option(False, help=SHARED_ATTENTION_HELP),
    kl: float = typer.Option(
        None, "--kl", help="rl: weight of a KL penalty towards the starting package (default 0, as BAR)."
    ),
    sign_key: Path = typer.Option(None, "--sign-key", help="Owner's private key: sign the package."),
) -> None:
    """Train one expert against the frozen anchor (works under torchrun for several processes/GPUs);
    with --stage, one post-training stage (progressive unfreezing, shared deltas in the package)."""
    key = load_private_key(sign_key) if sign_key else None  # a bad key fails before training
    if freeze_shared or any(x is not None for x in (stage, from_package, kl)):
        if shared_attention:
            raise FlexmoeError("--shared-attention is for pretraining experts.", "leave it out with --stage.")
        s = settings_for(stage or "mid", freeze_shared=freeze_shared, steps=steps, batch_size=batch_size,
            seq_len=seq_len, lr=lr, seed=seed, public_mix=public_mix, router_init=router_init,
            row_ratio=row_ratio, shared_rows=shared_rows, router_aux=router_aux_loss,
            grpo=_grpo(kl))  # fmt: skip
        run = StageRun(from_package, public[0] if public else None, resume, force, sign_key=key)
        return _expert_stage(anchor, data[0], name, out, s, run, dp_epsilon)
    dp = None if dp_epsilon is None else DPSettings(epsilon=dp_epsilon, delta=dp_delta,
        max_grad_norm=dp_max_grad_norm, unit=dp_unit, accountant=dp_accountant,
        clipping=dp_clipping)  # fmt: skip

    spec = ExpertSpec(
        name=name,
        description=description,
        contact=contact,
        license=license,
        router_init=router_init or ("random" if dp else default_router_init(resolve(anchor))),
        bias_init=bias_init,
        public_row=public_row,
        router_aux_loss=router_aux_loss,
    )
    settings = ExpertTrainSettings(
        preset=preset,
        spec=spec,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        seed=seed,
        public=public or None,
        public_mix=public_mix,
        shared_rows=shared_rows or "none",
        row_ratio=OWNER_ROW_RATIO if row_ratio is None else row_ratio,
        shared_attention=shared_attention,
        fsdp=fsdp,
        activation_checkpointing=activation_checkpointing,
        compile=compile,
        early_stop=early_stop,
        dp=dp,
        resume=resume,
        force=force,
    )
    m = train_expert(anchor, data, name, out, settings=settings)

    if m.get("finished") and key is not None and is_main():
        console.print(f"signed by {sign_package(out, key)}")
    if m.get("finished") and "valid_loss" in m and is_main():
        v = m["valid_loss"]
        console.print(f"held-out loss on {name}'s data: anchor {v['anchor']:.4f} -> expert {v['expert']:.4f}")
        if m.get("stopped_early"):
            console.print(f"stopped early: kept the weights of step {m['best_step']}")
        console.print(f"wrote {out}  ({m['tokens_seen']:,} tokens in {m['seconds']:.0f}s)")
        if m.get("dp"):
            console.print(_dp_line(m["dp"]))


def _dp_line(dp: dict | None) -> str:
    if not dp:
        return "differential privacy: none"
    return (
        f"differential privacy: ({dp['epsilon']:.3g}, {dp['delta']:.2g})-DP per {dp['unit']} "
        f"(target epsilon {dp['target_epsilon']:g}; {dp['accountant']} accountant); noise multiplier "
        f"{dp['noise_multiplier']:.3f}, sampling rate {dp['sample_rate']:.4g}, {dp['steps']} steps, "
        f"clipping norm {dp['max_grad_norm']:g} ({dp['clipping']})"
    )


def _expert_stage(anchor: str, data: Path, name: str, out: Path, s, run: StageRun, dp_epsilon) -> None:
    """``expert train --stage``: one post-training stage (progressive unfreezing, shared deltas)."""
    if dp_epsilon is not None:
        raise FlexmoeError("--stage does not combine with DP.", "drop --dp-epsilon or --stage.")
    m = train_stage(anchor, data, name, out, s, **vars(run))
    if m.get("finished"):
        v, groups = m["stage"]["valid_loss"], ", ".join(m["stage"]["trainable"])
        console.print(f"{s.stage}: valid loss {v['before']:.4f} -> {v['after']:.4f}; trained {groups}")
        console.print(f"wrote {out}")


@expert_app.command("inspect")
def expert_inspect(
    package: Path = typer.Argument(..., help="Expert package directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Print an expert package's manifest and verify its hashes (fails on tampering)."""
    m, signer = check(package)
    if as_json:
        _print_json(m)
        return
    console.print(
        f"expert {m['name']}  ({m['description'] or 'no description'})  contact {m['contact'] or '-'}"
    )
    console.print(f"licence: {m['license']}")
    console.print(f"anchor {m['anchor']['model_type']} {m['anchor']['fingerprint']}")
    t = m["training"]
    data = m.get("data") or m.get("stage", {}).get("data", {})  # a post-training stage records its own
    size = f"{data['train_documents']} documents" if "train_documents" in data else f"stage {t.get('stage')}"
    console.print(
        f"router init {m['router_init']}; {m['tokens_seen']:,} tokens, {t['steps']} steps, lr {t['lr']}, "
        f"data {data.get('fingerprint', '?')[:16]}... ({size})"
    )
    v = m.get("valid_loss") or {}
    if v:
        console.print(f"held-out loss: anchor {v['anchor']:.4f} -> expert {v['expert']:.4f}")
    console.print(_dp_line(m.get("dp")))
    console.print(
        f"created {m['created']} by flexmoe {m['flexmoe_version']}; {package_bytes(package):,} bytes"
    )
    console.print("hashes verified: OK (every file listed, weights finite, DP record re-derived)")
    console.print(f"shared tensors trained: {_shared_trained(m)}")
    pc = m.get("prompt_centroid")
    console.print(f"prompt centroid: from {pc['prompts']} chat prompts" if pc else "prompt centroid: none")
    console.print(f"signed by {signer}" if signer else "unsigned (sign with: flexmoe expert sign)")
    if m.get("proxy"):
        p = m["proxy"]
        console.print(
            f"proxy set: {p['count']} public documents ({p['method']['features']} features); "
            f"classifier held-out accuracy {p['classifier']['heldout_accuracy']:.3f}"
        )


def _shared_trained(m: dict) -> str:
    """What of the anchor a package trained besides its FFN and router row, as one phrase."""
    rows, parts = m.get("shared_rows"), []
    if m.get("stage"):  # a post-training stage names its trainable groups
        parts = [g for g in m["stage"].get("trainable", []) if not g.startswith("owner ")]
    elif rows:
        count = f" ({rows['rows']})" if rows.get("rows") else ""
        parts.append(f"{rows['mode']} embedding / LM-head rows{count}")
    if m.get("shared_attention"):
        parts.append("attention projections")
    return ", ".join(parts) or "none (FlexOlmo: FFN and router row only)"


@expert_app.command("proxy")
def expert_proxy(
    private: list[Path] = typer.Option(..., "--private", help="The owner's private documents (stay here)."),
    public: list[Path] = typer.Option(..., "--public", help="The public corpus to choose from."),
    out: Path = typer.Option(..., "--out", help="Proxy directory to create (public documents only)."),
    fraction: float = typer.Option(0.05, help="Share of the public documents to select."),
    features: str = typer.Option("auto", help="auto (embedder if installed), embed or ngram."),
    package: Path = typer.Option(None, "--package", help="Record the proxy set in this package's manifest."),
    name: str = typer.Option(None, help="Owner / expert name (default: the package's)."),
    max_private: int = typer.Option(1000, help="Private documents sampled to train the classifier."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Data owner: select public documents resembling the private data (for router training)."""
    r = select_proxy(
        private,
        public,
        out,
        ProxySettings(fraction=fraction, features=features, max_private=max_private),
        package=package,
        name=name,
        force=force,
    )
    console.print(
        f"wrote {out}: {r['count']} of {r['public_documents']} public documents; classifier "
        f"({r['method']['features']}) held-out accuracy {r['classifier']['heldout_accuracy']:.3f}"
        + (f"; recorded in {package}" if package else "")
    )


def _names(values: list[str] | None) -> list[str] | None:
    """Accept both repeated options and comma-separated lists."""
    if not values:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _summary(meta: dict, out: Path) -> None:
    names = ", ".join(e["name"] for e in meta["experts"])
    console.print(f"wrote {out}: {len(meta['experts'])} experts ({names}), top-k {meta['top_k']}")


SIGN_KEY = typer.Option(None, "--sign-key", help="Maintainer's private key: sign the model written.")
TRUST = typer.Option(
    None, "--trust", help="Owners' public keys (KEY.pub files or a directory); default: trust on first use."
)
ALLOW_UNSIGNED = typer.Option(False, "--allow-unsigned", help="Accept packages without a signature.")


def _provenance(sign_key: Path | None, trust: list[Path] | None, allow_unsigned: bool):
    key = load_private_key(sign_key) if sign_key else None
    return Provenance(trust=Trust.from_paths(trust, allow_unsigned=allow_unsigned), sign_key=key)


# Loading a composed model (generate, route, eval, audit, serve): the maintainer's signature.
MODEL_TRUST = typer.Option(
    None,
    "--trust",
    help="The maintainer's public key(s) (KEY.pub files or a directory): load only a model they signed; "
    "default: any valid signature.",
)
MODEL_ALLOW_UNSIGNED = typer.Option(
    False, "--allow-unsigned", help="Load a composed model without a signature (a signature must still hold)."
)


ROUTING_HELP = (
    "Routing method: trained, phatgoose, calibrated, lda (NAME+prior: public logit + log owners); "
    "recomputed on every later remove/add/update."
)
ROUTING_BIAS_HELP = "fold (into the rows, stock export) or keep (runtime-only bias file)."


@app.command("compose")
def compose_cmd(
    anchor: str = typer.Option(..., "--anchor", help="The anchor every expert was trained against."),
    expert: list[Path] = typer.Option(..., "--expert", help="Expert package (repeat for several)."),
    out: Path = typer.Option(..., "--out", help="Composed model directory to create."),
    top_k: int = typer.Option(None, help="Experts per token (default: half the experts, at least 2)."),
    max_shard_mb: int = typer.Option(2048, help="Largest weight shard in MB."),
    calibrate: bool = typer.Option(
        False, help="Recalibrate the router for this set of experts on public text (needs --public)."
    ),
    public: list[Path] = typer.Option(None, "--public", help="Public documents for --calibrate."),
    routing: str = typer.Option(None, help=ROUTING_HELP),
    routing_bias: str = typer.Option(None, help=ROUTING_BIAS_HELP),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    shared_merge: str = typer.Option(
        None, help="Post-trained shared tensors: disjoint (default), mean (BAR), ties, sum (task arithmetic)."
    ),
    sign_key: Path = SIGN_KEY,
    trust: list[Path] = TRUST,
    allow_unsigned: bool = ALLOW_UNSIGNED,
) -> None:
    """Maintainer: compose expert packages into one MoE (HF flex_olmo for OLMo 2 anchors)."""
    how = ComposeSettings(
        top_k=top_k,
        max_shard_bytes=max_shard_mb << 20,
        calibrate=_calibration(calibrate, public),
        shared_merge=shared_merge,
        routing=routing,
        routing_bias=routing_bias,
    )
    prov = _provenance(sign_key, trust, allow_unsigned)
    _summary(compose(anchor, expert, out, how, force=force, provenance=prov), out)


def _calibration(calibrate: bool, public: list[Path] | None):
    """A calibrator on the public documents, or None; --public alone is a mistake worth naming."""
    if calibrate and not public:
        raise FlexmoeError("--calibrate needs public text.", "add --public PATH (the public corpus).")
    if public and not calibrate:
        raise FlexmoeError("--public is only used with --calibrate.", "add --calibrate, or drop --public.")
    return calibrator(public) if calibrate else None


@app.command("add")
def add_cmd(
    model: Path = typer.Argument(..., help="Composed model directory."),
    expert: Path = typer.Option(..., "--expert", help="Package of the joining expert."),
    out: Path = typer.Option(..., "--out", help="New model directory (the input stays untouched)."),
    top_k: int = typer.Option(None, help="Experts per token in the new model (default: keep)."),
    calibrate: bool = typer.Option(
        False, help="Recalibrate the router for this set of experts on public text (needs --public)."
    ),
    public: list[Path] = typer.Option(None, "--public", help="Public documents for --calibrate."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    sign_key: Path = SIGN_KEY,
    trust: list[Path] = TRUST,
    allow_unsigned: bool = ALLOW_UNSIGNED,
) -> None:
    """Maintainer: add a late-joining owner's expert without retraining anyone."""
    how = ComposeSettings(top_k=top_k, calibrate=_calibration(calibrate, public))
    prov = _provenance(sign_key, trust, allow_unsigned)
    _summary(add(model, expert, out, how, force=force, provenance=prov), out)


@app.command("update")
def update_cmd(
    model: Path = typer.Argument(..., help="Composed model directory."),
    expert: Path = typer.Option(..., "--expert", help="Newer package of an expert already in the model."),
    out: Path = typer.Option(..., "--out", help="New model directory (the input stays untouched)."),
    calibrate: bool = typer.Option(
        False, help="Recalibrate the router for this set of experts on public text (needs --public)."
    ),
    public: list[Path] = typer.Option(None, "--public", help="Public documents for --calibrate."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    sign_key: Path = SIGN_KEY,
    trust: list[Path] = TRUST,
    allow_unsigned: bool = ALLOW_UNSIGNED,
) -> None:
    """Maintainer: replace a named expert by a newer package; other experts stay bit-identical."""
    how = ComposeSettings(calibrate=_calibration(calibrate, public))
    prov = _provenance(sign_key, trust, allow_unsigned)
    _summary(update(model, expert, out, how, force=force, provenance=prov), out)


@app.command("remove")
def remove_cmd(
    model: Path = typer.Argument(..., help="Composed model directory."),
    expert: str = typer.Option(..., "--expert", help="Name of the expert to remove (opt-out)."),
    out: Path = typer.Option(..., "--out", help="New model directory (the input stays untouched)."),
    top_k: int = typer.Option(None, help="Experts per token in the new model (default: keep, clamped)."),
    calibrate: bool = typer.Option(
        False, help="Recalibrate the router for this set of experts on public text (needs --public)."
    ),
    public: list[Path] = typer.Option(None, "--public", help="Public documents for --calibrate."),
    routing: str = typer.Option(None, help="Routing method for the rest (default: the model's own)."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    sign_key: Path = SIGN_KEY,
) -> None:
    """Maintainer: physical opt-out; no parameter trained on that owner's data remains."""
    how = ComposeSettings(top_k=top_k, calibrate=_calibration(calibrate, public), routing=routing)
    prov = _provenance(sign_key, None, True)
    _summary(remove(model, expert, out, how, force=force, provenance=prov), out)


@router_app.command("train")
def router_train_cmd(
    model: Path = typer.Argument(..., help="Composed model directory."),
    proxy: list[Path] = typer.Option(None, "--proxy", help="Proxy set from 'flexmoe expert proxy' (repeat)."),
    public: list[Path] = typer.Option(..., "--public", help="The public corpus (mixed in; validation)."),
    out: Path = typer.Option(..., "--out", help="New model directory (the input stays untouched)."),
    steps: int = typer.Option(40, help="Optimiser steps."),
    batch_size: int = typer.Option(8, help="Sequences per step."),
    seq_len: int = typer.Option(None, help="Tokens per sequence (default: the owners' training length)."),
    lr: float = typer.Option(2e-3, help="Peak learning rate (the paper: 2e-3)."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay on the router rows (the paper: 0.1)."),
    proxy_share: float = typer.Option(0.5, help="Share of training sequences from the proxy sets."),
    seed: int = typer.Option(0, help="Random seed (data order)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last checkpoint."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
    sign_key: Path = SIGN_KEY,
) -> None:
    """Maintainer: train only the router rows on proxy sets + public text (experts stay frozen)."""
    key = load_private_key(sign_key) if sign_key else None  # a bad key fails before training
    settings = RouterTrainSettings(
        steps, batch_size, seq_len, lr, weight_decay, proxy_share, seed=seed, resume=resume, force=force
    )
    meta = train_router(model, proxy or [], public, out, settings=settings, sign_key=key)
    if meta and key is not None:
        console.print(f"signed by {key_id(key.public_key())}")
    if meta:
        v = meta["router_training"]["valid_loss"]
        console.print(f"public validation loss {v['before']:.4f} -> {v['after']:.4f}")
        _summary(meta, out)


SEQUENCE_ROUTING = typer.Option(
    False,
    "--sequence-routing",
    help="Route each position to public + at most one owner chosen from the text so far: by each owner's "
    "own model's likelihood of it (one extra pass per owner and one anchor pass; in generation once, at "
    "the prompt; chat models choose by the router rows there, one pass); a post-trained owner's "
    "positions use its own shared tensors; flexmoe's runtime only.",
)


#: generate: by default on for a post-trained federation (``runtime.from_pretrained(sequence_routing=None)``)
SEQUENCE_ROUTING_AUTO = typer.Option(
    None,
    "--sequence-routing/--no-sequence-routing",
    help="As for 'flexmoe route'; default: on for a chat model whose owners shipped prompt centroids "
    "(a post-trained federation: the prompt picks its owner), off otherwise.",
    show_default=False,
)


SEQUENCE_EVIDENCE = typer.Option(
    None,
    "--sequence-evidence",
    help="With --sequence-routing: 'likelihood' (default; the owners' own models score the text so far, "
    "one pass per owner) or 'rows' (the router rows in one anchor pass: cheaper, weaker).",
)


def _sequence(on: bool, evidence: str | None):
    """``from_pretrained``'s ``sequence_routing`` from the two CLI options."""
    if evidence is not None and not on:
        raise FlexmoeError(
            f"--sequence-evidence {evidence} without --sequence-routing.", "add --sequence-routing."
        )
    return SequenceRouting(evidence=evidence) if on and evidence else on


def _composed(model, include, exclude, use_bias, sequence_routing, trust, allow_unsigned):
    """A composed model as a model user loads it: signature verified, expert choice, routing mode."""
    t = Trust.from_paths(trust, allow_unsigned=allow_unsigned)
    return from_pretrained(
        model,
        include=_names(include),
        exclude=_names(exclude),
        use_bias=use_bias,
        trust=t,
        sequence_routing=sequence_routing,
    )


@app.command("generate")
def generate_cmd(
    model: Path = typer.Argument(..., help="Composed model directory."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    include: list[str] = typer.Option(
        None, "--include", help="Only these experts (plus public); comma-separated."
    ),
    exclude: list[str] = typer.Option(None, "--exclude", help="Leave out these experts; comma-separated."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    use_bias: bool = typer.Option(False, help="Apply the learned router biases (not in the HF format)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    sequence_routing: bool | None = SEQUENCE_ROUTING_AUTO,
    chat: bool = typer.Option(
        False,
        "--chat",
        help="The prompt is one user turn in the model's chat template (post-trained models).",
    ),
    prompt_calibration: Path = PROMPT_CALIBRATION,
    trust: list[Path] = MODEL_TRUST,
    allow_unsigned: bool = MODEL_ALLOW_UNSIGNED,
) -> None:
    """Model user: stream a continuation (or with --chat a reply) using any subset of experts."""
    c = _composed(model, include, exclude, use_bias, sequence_routing, trust, allow_unsigned)
    if prompt_calibration is not None:
        c.calibrate_prompts(read_chat_file(prompt_calibration))
    if not chat:
        console.print(prompt, end="")
    generate(c, prompt, max_new_tokens, stream=True, temperature=temperature, seed=seed, chat=chat)


@app.command("route")
def route_cmd(
    model: Path = typer.Argument(..., help="Composed model directory."),
    text: str = typer.Option(..., "--text", help="Text to attribute."),
    include: list[str] = typer.Option(None, "--include", help="Only these experts (plus public)."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Leave out these experts."),
    use_bias: bool = typer.Option(False, help="Apply the learned router biases."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    sequence_routing: bool = SEQUENCE_ROUTING,
    sequence_evidence: str = SEQUENCE_EVIDENCE,
    trust: list[Path] = MODEL_TRUST,
    allow_unsigned: bool = MODEL_ALLOW_UNSIGNED,
) -> None:
    """Model user: the share of routing weight each expert received (over tokens and layers)."""
    seq = _sequence(sequence_routing, sequence_evidence)
    c = _composed(model, include, exclude, use_bias, seq, trust, allow_unsigned)
    shares = routing_shares(c, text)
    if as_json:
        _print_json(shares)
        return
    for name, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        console.print(f"{name:>16s} {share:6.1%} " + "#" * round(40 * share))


@app.command("eval")
def eval_cmd(
    model: Path = typer.Argument(..., help="A composed flexmoe model or any HF causal LM directory."),
    data: Path = typer.Option(
        ...,
        "--data",
        help="A folder of domains each with a test split (test.jsonl/.txt/.parquet; tasks/ optional), "
        "one such domain folder, or a single .jsonl/.txt/.parquet file.",
    ),
    out: Path = typer.Option(None, "--out", help="Write the full results as JSON here."),
    include: list[str] = typer.Option(None, "--include", help="Only these experts (plus public)."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Leave out these experts."),
    use_bias: bool = typer.Option(False, help="Apply the learned router biases (flexmoe runtime only)."),
    seq_len: int = typer.Option(None, help="Perplexity block length (default: the model's training length)."),
    max_blocks: int = typer.Option(64, help="Test blocks per domain for perplexity."),
    limit: int = typer.Option(None, "--limit", help="At most N documents per domain and N items per task."),
    composition: bool = typer.Option(
        False, "--composition", help="Composition metrics per owner (retention, opt-out, oracle)."
    ),
    anchor: Path = typer.Option(None, "--anchor", help="The dense anchor (for --composition)."),
    expert: list[Path] = typer.Option(
        None, "--expert", help="Owner packages (for --composition: checks that 'alone' is what they trained)."
    ),
    owner: list[str] = typer.Option(
        None, "--owner", help="Owner domains (default: the experts with a test split)."
    ),
    public: str = typer.Option("public", "--public", help="The public domain's name (for --composition)."),
    sequence_routing: bool = SEQUENCE_ROUTING,
    sequence_evidence: str = SEQUENCE_EVIDENCE,
    trust: list[Path] = MODEL_TRUST,
    allow_unsigned: bool = MODEL_ALLOW_UNSIGNED,
) -> None:
    """Perplexity per domain (with bootstrap intervals) and tasks if any; or, with --composition,
    how much of each owner's gain survives composition and what opt-out removes."""
    if limit is not None and limit < 1:
        raise FlexmoeError(f"--limit {limit} is below 1.", "pass a positive number of documents/items.")
    t = Trust.from_paths(trust, allow_unsigned=allow_unsigned)
    sequence_routing = _sequence(sequence_routing, sequence_evidence)
    if composition:
        setup = CompositionSetup(
            model,
            data,
            _names(owner),
            public,
            anchor,
            expert or (),
            seq_len or seq_len_of(model),
            max_blocks,
            limit,
            trust=t,
            sequence_routing=sequence_routing,
        )
        r = evaluate_composition(setup, progress=lambda m: console.print(f"  {m}"))
        console.print(composition_table(r["composition"]))
        if out:
            write_json(out, r)
        return
    lm = load_lm(
        model, _names(include), _names(exclude), use_bias, trust=t, sequence_routing=sequence_routing
    )
    r = evaluate_lm(
        lm,
        data,
        EvalSettings(
            seq_len=seq_len or seq_len_of(model), max_blocks=max_blocks, max_items=limit, max_docs=limit
        ),
        progress=lambda m: console.print(f"  {m}"),
    )
    if r["perplexity"]:
        console.print("perplexity: " + "  ".join(f"{d} {v:.2f}" for d, v in r["perplexity"].items()))
    if r["tasks"]:
        console.print("tasks (%):  " + "  ".join(f"{t} {v:.1f}" for t, v in r["tasks"].items()))
        console.print(f"average {r['average']:.1f}")
    if out:
        write_json(out, r)


@app.command("demo")
def demo_cmd(
    workdir: Path = typer.Option(
        Path("demo-run"), "--workdir", help="Where everything is written (resumable)."
    ),
    preset: str = typer.Option("tiny", help="tiny (2 CPU cores, ~15 min) or small (GPU)."),
    post_train: bool = typer.Option(False, help="Only the post-training section (chat SFT, merge, opt-out)."),
    shared_rows: str = typer.Option(
        None, help="The owners' --shared-rows (none, owner or all; default none)."
    ),
    shared_attention: bool = typer.Option(False, help="The owners train --shared-attention too."),
    workers: int = typer.Option(
        None,
        min=1,
        help="Models trained and scored side by side (default: 2 on a CPU with 2+ cores, 1 on a GPU).",
    ),
) -> None:
    """The whole federation end to end, offline, with baselines, opt-out and a report."""
    if post_train:
        r = run_post_train_demo(workdir, preset)
        _print_json(r["post_training"])
        console.print(f"wrote {workdir}/report.json (post_training)")
        return
    given = {"shared_rows": shared_rows, "shared_attention": shared_attention or None, "workers": workers}
    report = run_demo(workdir, preset, overrides={k: v for k, v in given.items() if v is not None} or None)
    console.print(markdown(report))
    console.print(f"wrote {workdir}/report.json, report.md, report.png")


@audit_app.command("extraction")
def audit_extraction(
    model: Path = typer.Argument(..., help="A composed flexmoe model or any HF causal LM directory."),
    data: list[Path] = typer.Option(..., "--data", help="Training documents to attack (files or dirs)."),
    include: list[str] = typer.Option(None, "--include", help="Only these experts (plus public)."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Leave out these experts."),
    documents: int = typer.Option(100, help="Documents to attack (the paper used 10,000)."),
    prefix_tokens: int = typer.Option(32, help="Prefix given to the model."),
    suffix_tokens: int = typer.Option(256, help="Continuation sampled and compared."),
    samples: int = typer.Option(10, help="Samples per document (top-k 50, top-p 0.95, T=1)."),
    threshold: float = typer.Option(0.9, help="Normalised Levenshtein similarity counted as extracted."),
    seed: int = typer.Option(0, help="Sampling seed."),
    out: Path = typer.Option(None, "--out", help="Write the result as JSON here."),
    trust: list[Path] = MODEL_TRUST,
    allow_unsigned: bool = MODEL_ALLOW_UNSIGNED,
) -> None:
    """The FlexOlmo paper's extraction attack: share of documents whose continuation is regenerated."""
    t = Trust.from_paths(trust, allow_unsigned=allow_unsigned)
    cfg = ExtractionConfig(
        prefix_tokens=prefix_tokens,
        suffix_tokens=suffix_tokens,
        samples=samples,
        documents=documents,
        threshold=threshold,
        seed=seed,
    )
    progress = lambda m: console.print(f"  {m}")  # noqa: E731
    r = audit_api.audit_extraction(model, data, _names(include), _names(exclude), cfg, progress, t)
    lo, hi = r["ci95"]
    console.print(
        f"extracted {r['extracted']} of {r['documents']} documents: rate {100 * r['rate']:.1f}% "
        f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%); mean best similarity {r['mean_best_similarity']:.3f}"
    )
    if out:
        write_json(out, r)


@audit_app.command("canaries")
def audit_canaries(
    anchor: Path = typer.Option(..., "--anchor", help="The anchor to train against."),
    data: list[Path] = typer.Option(..., "--data", help="The owner's data (canaries are planted in a copy)."),
    workdir: Path = typer.Option(..., "--workdir", help="Where everything is written (resumable)."),
    name: str = typer.Option("owner", help="Expert name."),
    public: list[Path] = typer.Option(None, "--public", help="Public documents to mix into training."),
    steps: int = typer.Option(None, help="Training steps (default: the preset's)."),
    batch_size: int = typer.Option(None, help="Sequences per step (default: the preset's)."),
    seq_len: int = typer.Option(None, help="Sequence length (default: the preset's)."),
    dp_epsilon: list[float] = typer.Option([8.0], "--dp-epsilon", help="Epsilon of a DP expert (repeat)."),
    dp_steps: int = typer.Option(None, help="Steps of the DP experts (default: --steps)."),
    dp_batch_size: int = typer.Option(None, help="Expected batch of the DP experts (default: --batch-size)."),
    dp_lr: float = typer.Option(None, help="Peak learning rate of the DP experts (default: the preset's)."),
    dense: bool = typer.Option(True, help="Also train and audit the dense (fully fine-tuned) expert."),
    other_expert: list[Path] = typer.Option(
        None, "--other-expert", help="Other owners' packages: also audit the composed model."
    ),
    repeats: str = typer.Option("1,10,100", help="How often each canary is repeated (comma-separated)."),
    per_repeat: int = typer.Option(3, help="Canaries per repeat count (and as many controls)."),
    candidates: int = typer.Option(1000, help="Random secrets scored per exposure estimate."),
    extraction_documents: int = typer.Option(32, help="Documents for the extraction attack (0: skip)."),
    seed: int = typer.Option(0, help="Seed of canaries and attacks."),
) -> None:
    """Plant secret canaries into an owner's data, train, and measure exposure, membership AUC and
    extraction for the dense expert, the FlexOlmo expert, DP experts and the composed model."""
    sizes = AuditSizes(
        candidates=candidates,
        extraction=ExtractionConfig(documents=extraction_documents, suffix_tokens=64, samples=4, seed=seed)
        if extraction_documents > 0
        else None,
    )
    r = canary_audit(
        anchor,
        data,
        workdir,
        name=name,
        public=public or None,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        dp_epsilons=dp_epsilon,
        dp_steps=dp_steps,
        dp_batch_size=dp_batch_size,
        dp_lr=dp_lr,
        dense=dense,
        other_experts=other_expert or (),
        repeats=[int(x) for x in repeats.split(",") if x.strip()],
        per_repeat=per_repeat,
        sizes=sizes,
        seed=seed,
    )
    cols = sorted({k for row in r["summary"].values() for k in row})
    console.print(f"{'model':>14s}  " + "  ".join(f"{c:>16s}" for c in cols))
    for m, row in r["summary"].items():
        console.print(f"{m:>14s}  " + "  ".join(f"{row.get(c, float('nan')):16.3f}" for c in cols))
    console.print(
        "exposure in bits (chance about 1.44; x0 = control canaries never planted); AUC 0.5 = chance. "
        f"wrote {workdir}/audit.json"
    )


@audit_app.command("exposure")
def audit_exposure(
    model: Path = typer.Argument(..., help="A composed flexmoe model or any HF causal LM directory."),
    canaries: Path = typer.Option(..., "--canaries", help="canaries.json written by 'audit canaries'."),
    include: list[str] = typer.Option(None, "--include", help="Only these experts (plus public)."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Leave out these experts."),
    candidates: int = typer.Option(1000, help="Random secrets scored for the rank estimate."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    trust: list[Path] = MODEL_TRUST,
    allow_unsigned: bool = MODEL_ALLOW_UNSIGNED,
) -> None:
    """Exposure (bits) of planted canaries under a model; controls show chance level."""
    t = Trust.from_paths(trust, allow_unsigned=allow_unsigned)
    r = audit_api.audit_exposure(model, canaries, _names(include), _names(exclude), candidates, t)
    if as_json:
        _print_json(r)
        return
    for reps, v in r["mean_by_repeats"].items():
        label = "controls (never planted)" if reps == "0" else f"repeated {reps}x"
        console.print(f"{label:>26s}: mean exposure {v:5.2f} bits")
    console.print(
        f"cap {r['cap_bits']:.2f} bits ({candidates} candidates); chance about {r['chance_bits']:.2f}"
    )


@audit_app.command("membership")
def audit_membership(
    model: Path = typer.Argument(..., help="A composed flexmoe model or any HF causal LM directory."),
    members: list[Path] = typer.Option(..., "--members", help="Training documents."),
    non_members: list[Path] = typer.Option(..., "--non-members", help="Held-out documents."),
    include: list[str] = typer.Option(None, "--include", help="Only these experts (plus public)."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Leave out these experts."),
    max_tokens: int = typer.Option(256, help="Tokens per document scored."),
    max_documents: int = typer.Option(500, help="Documents per side."),
    trust: list[Path] = MODEL_TRUST,
    allow_unsigned: bool = MODEL_ALLOW_UNSIGNED,
) -> None:
    """Loss-based membership inference: AUC of training vs held-out documents (0.5 = chance)."""
    t = Trust.from_paths(trust, allow_unsigned=allow_unsigned)
    r = audit_api.audit_membership(
        model, members, non_members, _names(include), _names(exclude), max_tokens, max_documents, t
    )
    lo, hi = r["ci95"]
    console.print(
        f"membership AUC {r['auc']:.3f} (95% CI {lo:.3f}-{hi:.3f}; {r['members']} members, "
        f"{r['non_members']} non-members); mean loss {r['member_loss']:.3f} vs {r['non_member_loss']:.3f}"
    )


keys_app = typer.Typer(help="Signing keys (Ed25519) for packages and composed models.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    out: Path = typer.Option(..., "--out", help="Private key file to create (KEY.pub is written beside)."),
    force: bool = typer.Option(False, help="Replace existing key files."),
) -> None:
    """Create a key pair: keep KEY secret (mode 600), hand KEY.pub to whoever verifies you."""

    priv, pub, kid = generate_keys(out, force=force)
    console.print(f"wrote {priv} (private: keep secret) and {pub} (public); key id {kid}")


@expert_app.command("centroid")
def expert_centroid(
    package: Path = typer.Argument(..., help="Your chat expert package (its manifest gains the centroid)."),
    anchor: str = typer.Option(
        ..., "--anchor", help="The post-trained anchor the package was trained against."
    ),
    chat: Path = typer.Option(..., "--chat", help="Your chat data (directory with train.jsonl, or a file)."),
) -> None:
    """Data owner: add the prompt centroid (the mean anchor feature of your chat prompts, which the
    runtime uses to send a chat prompt to its owner) to a package trained before sft stages wrote it."""
    signed = (Path(package) / signing.SIGNATURE).is_file()
    rec = add_prompt_centroid(package, anchor, chat)
    console.print(f"added a prompt centroid from {rec['prompts']} prompts to {package}")
    if signed:
        console.print("its signature no longer holds and was dropped: sign again ('flexmoe expert sign')")


@expert_app.command("sign")
def expert_sign(
    package: Path = typer.Argument(..., help="Expert package directory."),
    key: Path = typer.Option(..., "--key", help="The owner's private key."),
) -> None:
    """Sign an existing expert package (verified first: a tampered copy is never signed)."""

    console.print(f"signed {package} by {sign_package(package, load_private_key(key))}")


@app.command("export-lm-eval")
def export_lm_eval_cmd(
    data: Path = typer.Option(..., "--data", help="Data directory from 'flexmoe data demo' (with tasks/)."),
    out: Path = typer.Option(..., "--out", help="Directory for the task YAMLs and their JSONL items."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Task configs to score any model on the demo tasks with lm-evaluation-harness."""

    names = export_lm_eval(data, out, force=force)
    console.print(f"wrote {len(names)} tasks to {out}; run:")
    console.print(f"  lm_eval --model hf --model_args pretrained=MODEL --include_path {out} --tasks {GROUP}")


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one clean line."""
    err = Console(stderr=True, highlight=False)
    try:
        app()
    except FlexmoeError as e:
        err.print("[bold red]error:[/] " + escape(validate.safe_text(str(e))), soft_wrap=True)
        sys.exit(1)
    except OSError as e:  # the file system refused (permissions, disk full, ...): say which file
        err.print("[bold red]error:[/] " + escape(validate.safe_text(str(e))), soft_wrap=True)
        sys.exit(1)


validate.guard_cli(app)  # numbers, names and short texts checked by name before any command runs


if __name__ == "__main__":
    main()
