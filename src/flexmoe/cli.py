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
anchor_app = typer.Typer(help="Maintainer: pretrain or inspect the public anchor model.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(anchor_app, name="anchor")


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
    data: Path = typer.Option(..., "--data", help="Public corpus: a directory (train/valid files) or a file."),
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
            f"unigram baseline {s['unigram_valid_loss']:.4f}; {s['tokens_seen']:,} tokens in {s['seconds']:.0f}s"
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


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one clean line."""
    try:
        app()
    except FlexmoeError as e:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
