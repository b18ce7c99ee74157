"""Command line for serving: ``serve``, ``owners``, ``audit-log``, ``ledger`` (registered by flexmoe.cli)."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.console import Console

from flexmoe.errors import FlexmoeError
from flexmoe.serve import ledger as L
from flexmoe.serve.app import Settings, create_app
from flexmoe.serve.audit_log import verify
from flexmoe.serve.owners import Registry

#: ``--prompt-calibration`` (serve and generate): public chat the prompt choice is calibrated on
PROMPT_CALIBRATION = typer.Option(
    None,
    "--prompt-calibration",
    help="Public chat JSONL (first 100 conversations): with sequence routing on a model whose owners "
    "shipped no prompt centroids, a prompt's owner is the one whose router row stands out most from its "
    "own level on these public prompts.",
)

console = Console(highlight=False, soft_wrap=True)
owners_app = typer.Typer(help="Governance: register expert owners and the admin key.", no_args_is_help=True)
audit_log_app = typer.Typer(help="Governance: check the hash-chained audit log.", no_args_is_help=True)
ledger_app = typer.Typer(help="Usage ledger: per owner and per day.", no_args_is_help=True)
commands = typer.Typer()  # top-level commands, copied onto the main app by register()


@commands.command("serve")
def serve(
    model: Path = typer.Argument(..., help="Composed model directory."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    name: str = typer.Option(None, help="Model id clients use (default: the directory's name)."),
    owners: Path = typer.Option(None, "--owners", help="Owner registry (JSON, from `flexmoe owners add`)."),
    db: str = typer.Option(
        None,
        "--db",
        help="Ledger URL (default sqlite next to the model); "
        "postgresql+psycopg://user@host/db for PostgreSQL.",
    ),
    admin_key_file: Path = typer.Option(
        None, "--admin-key-file", help="Registry holding the admin key hash (default: --owners)."
    ),
    audit_log: Path = typer.Option(None, "--audit-log", help="Audit log (default: next to --owners)."),
    max_batch: int = typer.Option(32, help="Most requests decoded together."),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda when there is one)."),
    dtype: str = typer.Option(None, help="float32, bfloat16 (default: bfloat16 on GPU, float32 on CPU)."),
    trust: list[Path] = typer.Option(
        None,
        "--trust",
        help="Public keys accepted (KEY.pub files or a directory): the maintainer's, for the model served "
        "and models swapped in, and the owners', for packages the admin adds; default: any valid signature.",
    ),
    allow_unsigned: bool = typer.Option(
        False, "--allow-unsigned", help="Serve an unsigned model; the admin may add unsigned packages."
    ),
    sequence_routing: bool | None = typer.Option(
        None,
        "--sequence-routing/--no-sequence-routing",
        help="Each request's prompt picks public or one owner (and that owner's own shared tensors); "
        "default: on for a chat model whose owners shipped prompt centroids, off otherwise.",
        show_default=False,
    ),
    prompt_calibration: Path = PROMPT_CALIBRATION,
) -> None:
    """Serve a composed model over an OpenAI-compatible HTTP API with per-request experts."""
    import uvicorn  # serving only: not needed by any other command

    if admin_key_file is not None and owners is not None and admin_key_file != owners:
        raise FlexmoeError(
            "--admin-key-file and --owners name different files.", "keep both in one registry."
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    settings = Settings(
        model,
        name,
        owners or admin_key_file,
        db,
        audit_log,
        max_batch,
        device,
        dtype,
        trust=trust,
        allow_unsigned=allow_unsigned,
        sequence_routing=sequence_routing,
        prompt_calibration=prompt_calibration,
    )
    app = create_app(settings)
    console.print(
        f"serving {model} as {app.state.flexmoe.name!r} on http://{host}:{port}/v1 "
        f"(owner page: http://{host}:{port}/owner)"
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


@owners_app.command("add")
def owners_add(
    name: str = typer.Argument(..., help="Owner name."),
    expert: str = typer.Option(..., "--expert", help="The expert this owner controls."),
    owners: Path = typer.Option(..., "--owners", help="Registry file (created if missing)."),
) -> None:
    """Register an owner; prints its API key once (only a salted scrypt hash is stored)."""
    key = Registry(owners).add(name, expert)
    console.print(f"owner {name} controls expert {expert}; key (shown once, store it now):")
    print(key)


@owners_app.command("admin-key")
def owners_admin_key(
    owners: Path = typer.Option(..., "--owners", help="Registry file (created if missing)."),
) -> None:
    """Create (or replace) the admin key; prints it once."""
    key = Registry(owners).set_admin()
    console.print("admin key (shown once, store it now):")
    print(key)


@audit_log_app.command("verify")
def audit_log_verify(path: Path = typer.Argument(..., help="Audit log (JSON lines).")) -> None:
    """Check the hash chain of an audit log; exit 1 if any entry was changed, dropped or inserted."""
    if not path.is_file():
        raise FlexmoeError(f"No audit log at {path}.", "give the file the server wrote (--audit-log).")
    ok, n, last, problem = verify(path)
    if not ok:
        raise FlexmoeError(
            f"Audit log {path} FAILED verification after {n} good entries: {problem}.",
            "treat the log as tampered with; restore it from a copy.",
        )
    console.print(f"audit log OK: {n} entries, head {last[:16]}")


@ledger_app.command("report")
def ledger_report(
    db: str = typer.Option(..., "--db", help="Ledger URL, e.g. sqlite:///model-ledger.sqlite."),
    since: str = typer.Option(None, "--since", help="YYYY-MM-DD or Nd (last N days)."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV."),
    plot: Path = typer.Option(None, "--plot", help="Also write a PNG chart here."),
) -> None:
    """Usage per owner, expert and day: requests and tokens attributed."""
    rows = L.Ledger(db).daily(L.parse_since(since))
    print(L.report(rows, as_csv), end="" if as_csv else "\n")
    if plot is not None:
        L.plot(rows, plot)
        console.print(f"plot: {plot}")


def register(app: typer.Typer) -> None:
    app.registered_commands.extend(commands.registered_commands)
    app.add_typer(owners_app, name="owners")
    app.add_typer(audit_log_app, name="audit-log")
    app.add_typer(ledger_app, name="ledger")
