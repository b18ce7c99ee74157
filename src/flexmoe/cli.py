"""Command line: a thin layer over the Python API, one sub-command group per role.

Every user error is a ``FlexmoeError``: printed as one line naming the problem and the fix, exit code 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from flexmoe.errors import FlexmoeError

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


def _print_json(obj) -> None:
    console.print_json(json.dumps(obj, default=str))


@data_app.command("demo")
def data_demo(
    out: Path = typer.Option(..., "--out", help="Directory to create (one sub-directory per domain)."),
    size_mb: float = typer.Option(2.0, help="Approximate megabytes of text per domain."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Build the embedded demo corpora (public, code, math, legal), offline and deterministic."""
    from flexmoe.corpora import build_demo_corpora

    stats = build_demo_corpora(out, size_mb=size_mb, force=force)
    for domain, s in stats.items():
        console.print(f"{domain:8s} " + "  ".join(f"{k} {v:,}" for k, v in s.items()))
    console.print(f"wrote {out}")


@anchor_app.command("train")
def anchor_train(
    data: Path = typer.Option(
        ..., "--data", help="Public corpus: a directory (train/valid files) or a file."
    ),
    out: Path = typer.Option(..., "--out", help="Anchor directory to create (HF checkpoint)."),
    preset: str = typer.Option("tiny", help="Model size: tiny (CPU, <3 min), small or base (GPU)."),
    seed: int = typer.Option(0, help="Random seed (weights and data order)."),
    steps: int = typer.Option(None, help="Override the preset's number of optimiser steps."),
    vocab_size: int = typer.Option(None, help="Override the preset's tokenizer vocabulary size."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last checkpoint."),
    force: bool = typer.Option(False, help="Replace --out (and any interrupted run) if it exists."),
) -> None:
    """Pretrain a dense OLMo 2 anchor and its byte-level BPE tokenizer from scratch."""
    from flexmoe.anchor import pretrain

    s = pretrain(data, out, preset, seed=seed, steps=steps, vocab_size=vocab_size, resume=resume, force=force)
    if s.get("finished"):
        console.print(
            f"validation loss {s['valid_loss']:.4f} (perplexity {s['valid_perplexity']:.1f}); "
            f"unigram baseline {s['unigram_valid_loss']:.4f}; "
            f"{s['tokens_seen']:,} tokens in {s['seconds']:.0f}s"
        )
        console.print(f"wrote {out}  fingerprint {s['fingerprint']}")


@anchor_app.command("inspect")
def anchor_inspect(
    anchor: str = typer.Argument(..., help="Anchor directory or hub id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Architecture, parameter counts (shared vs FFN) and the anchor fingerprint."""
    from flexmoe.anchor import inspect

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
    from flexmoe.anchor import load_anchor, publish_router_init
    from flexmoe.data import read_documents
    from flexmoe.tokenizer import load_tokenizer

    model = load_anchor(anchor)
    meta = publish_router_init(
        anchor,
        model,
        load_tokenizer(anchor),
        read_documents(public),
        embedder=None if embedder == "none" else embedder,
        seq_len=seq_len,
        n_docs=n_docs,
    )
    console.print(f"published router init for {', '.join(meta['methods'])} from {meta['n_docs']} documents")


@expert_app.command("train")
def expert_train(
    anchor: str = typer.Option(..., "--anchor", help="Anchor directory or hub id."),
    data: list[Path] = typer.Option(
        ..., "--data", help="Private data: .txt/.jsonl/.parquet files or directories."
    ),
    name: str = typer.Option(..., "--name", help="Expert name (letters, digits, - _ .)."),
    out: Path = typer.Option(..., "--out", help="Expert package directory to create."),
    preset: str = typer.Option("tiny", help="Training length and batch: tiny (CPU), small, base (GPU)."),
    router_init: str = typer.Option("embed", help="Router-row init: embed, hidden or random."),
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
    public_mix: float = typer.Option(0.3, help="Share of training sequences taken from --public."),
    fsdp: bool = typer.Option(False, help="Shard anchor and expert with FSDP2 (large anchors; torchrun)."),
    activation_checkpointing: bool = typer.Option(
        False, help="Recompute activations in the backward pass (less memory, ~1/3 more compute)."
    ),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last checkpoint."),
    force: bool = typer.Option(False, help="Replace --out (and any interrupted run) if it exists."),
) -> None:
    """Train one expert against the frozen anchor (works under torchrun for several processes/GPUs)."""
    from flexmoe.expert.train import ExpertSpec, train_expert

    spec = ExpertSpec(
        name=name,
        description=description,
        contact=contact,
        license=license,
        router_init=router_init,
        bias_init=bias_init,
    )
    m = train_expert(
        anchor,
        data,
        name,
        out,
        preset,
        spec=spec,
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        seed=seed,
        resume=resume,
        force=force,
        public=public or None,
        public_mix=public_mix,
        fsdp=fsdp,
        activation_checkpointing=activation_checkpointing,
    )
    from flexmoe.training import is_main

    if m.get("finished") and "valid_loss" in m and is_main():
        v = m["valid_loss"]
        console.print(f"held-out loss on {name}'s data: anchor {v['anchor']:.4f} -> expert {v['expert']:.4f}")
        console.print(f"wrote {out}  ({m['tokens_seen']:,} tokens in {m['seconds']:.0f}s)")


@expert_app.command("inspect")
def expert_inspect(
    package: Path = typer.Argument(..., help="Expert package directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Print an expert package's manifest and verify its hashes (fails on tampering)."""
    from flexmoe.expert.package import package_bytes, verify

    m = verify(package)
    if as_json:
        _print_json(m)
        return
    console.print(
        f"expert {m['name']}  ({m['description'] or 'no description'})  contact {m['contact'] or '-'}"
    )
    console.print(f"licence: {m['license']}")
    console.print(f"anchor {m['anchor']['model_type']} {m['anchor']['fingerprint']}")
    t = m["training"]
    console.print(
        f"router init {m['router_init']}; {m['tokens_seen']:,} tokens, {t['steps']} steps, lr {t['lr']}, "
        f"data {m['data']['fingerprint'][:16]}... ({m['data']['train_documents']} documents)"
    )
    v = m.get("valid_loss") or {}
    if v:
        console.print(f"held-out loss: anchor {v['anchor']:.4f} -> expert {v['expert']:.4f}")
    console.print(f"differential privacy: {m['dp'] or 'none'}")
    console.print(
        f"created {m['created']} by flexmoe {m['flexmoe_version']}; {package_bytes(package):,} bytes"
    )
    console.print("hashes verified: OK")


def _names(values: list[str] | None) -> list[str] | None:
    """Accept both repeated options and comma-separated lists."""
    if not values:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _summary(meta: dict, out: Path) -> None:
    names = ", ".join(e["name"] for e in meta["experts"])
    console.print(f"wrote {out}: {len(meta['experts'])} experts ({names}), top-k {meta['top_k']}")


@app.command("compose")
def compose_cmd(
    anchor: str = typer.Option(..., "--anchor", help="The anchor every expert was trained against."),
    expert: list[Path] = typer.Option(..., "--expert", help="Expert package (repeat for several)."),
    out: Path = typer.Option(..., "--out", help="Composed model directory to create."),
    top_k: int = typer.Option(None, help="Experts per token (default: half the experts, at least 2)."),
    max_shard_mb: int = typer.Option(2048, help="Largest weight shard in MB."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Maintainer: compose expert packages into one MoE (HF flex_olmo for OLMo 2 anchors)."""
    from flexmoe.compose import compose

    _summary(compose(anchor, expert, out, top_k=top_k, force=force, max_shard_bytes=max_shard_mb << 20), out)


@app.command("add")
def add_cmd(
    model: Path = typer.Argument(..., help="Composed model directory."),
    expert: Path = typer.Option(..., "--expert", help="Package of the joining expert."),
    out: Path = typer.Option(..., "--out", help="New model directory (the input stays untouched)."),
    top_k: int = typer.Option(None, help="Experts per token in the new model (default: keep)."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Maintainer: add a late-joining owner's expert without retraining anyone."""
    from flexmoe.compose import add

    _summary(add(model, expert, out, top_k=top_k, force=force), out)


@app.command("update")
def update_cmd(
    model: Path = typer.Argument(..., help="Composed model directory."),
    expert: Path = typer.Option(..., "--expert", help="Newer package of an expert already in the model."),
    out: Path = typer.Option(..., "--out", help="New model directory (the input stays untouched)."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Maintainer: replace a named expert by a newer package; other experts stay bit-identical."""
    from flexmoe.compose import update

    _summary(update(model, expert, out, force=force), out)


@app.command("remove")
def remove_cmd(
    model: Path = typer.Argument(..., help="Composed model directory."),
    expert: str = typer.Option(..., "--expert", help="Name of the expert to remove (opt-out)."),
    out: Path = typer.Option(..., "--out", help="New model directory (the input stays untouched)."),
    top_k: int = typer.Option(None, help="Experts per token in the new model (default: keep, clamped)."),
    force: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Maintainer: physical opt-out; no parameter trained on that owner's data remains."""
    from flexmoe.compose import remove

    _summary(remove(model, expert, out, top_k=top_k, force=force), out)


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
) -> None:
    """Model user: stream a continuation using any subset of experts."""
    from flexmoe.runtime import from_pretrained, generate

    c = from_pretrained(model, include=_names(include), exclude=_names(exclude), use_bias=use_bias)
    console.print(prompt, end="")
    generate(c, prompt, max_new_tokens, stream=True, temperature=temperature, seed=seed)


@app.command("route")
def route_cmd(
    model: Path = typer.Argument(..., help="Composed model directory."),
    text: str = typer.Option(..., "--text", help="Text to attribute."),
    include: list[str] = typer.Option(None, "--include", help="Only these experts (plus public)."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Leave out these experts."),
    use_bias: bool = typer.Option(False, help="Apply the learned router biases."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Model user: the share of routing weight each expert received (over tokens and layers)."""
    from flexmoe.runtime import from_pretrained, routing_shares

    c = from_pretrained(model, include=_names(include), exclude=_names(exclude), use_bias=use_bias)
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
        ..., "--data", help="Data directory from 'flexmoe data demo' (test splits + tasks)."
    ),
    out: Path = typer.Option(None, "--out", help="Write the full results as JSON here."),
    include: list[str] = typer.Option(None, "--include", help="Only these experts (plus public)."),
    exclude: list[str] = typer.Option(None, "--exclude", help="Leave out these experts."),
    use_bias: bool = typer.Option(False, help="Apply the learned router biases (flexmoe runtime only)."),
    seq_len: int = typer.Option(None, help="Perplexity block length (default: the model's training length)."),
    max_blocks: int = typer.Option(64, help="Test blocks per domain for perplexity."),
) -> None:
    """Per-domain perplexity and downstream tasks, with item counts and 95% intervals."""
    from flexmoe.evaluate.run import evaluate_lm, load_lm, seq_len_of
    from flexmoe.fileio import write_json

    lm = load_lm(model, _names(include), _names(exclude), use_bias)
    r = evaluate_lm(
        lm,
        data,
        seq_len=seq_len or seq_len_of(model),
        max_blocks=max_blocks,
        progress=lambda m: console.print(f"  {m}"),
    )
    console.print("perplexity: " + "  ".join(f"{d} {v:.2f}" for d, v in r["perplexity"].items()))
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
) -> None:
    """The whole federation end to end, offline, with baselines, opt-out and a report."""
    from flexmoe.demo import run_demo
    from flexmoe.evaluate.report import markdown

    report = run_demo(workdir, preset)
    console.print(markdown(report))
    console.print(f"wrote {workdir}/report.json, report.md, report.png")


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one clean line."""
    try:
        app()
    except FlexmoeError as e:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
