"""The usage ledger: every request's tokens and per-expert attribution, in one SQLAlchemy 2 layer for
SQLite (default) and PostgreSQL (``postgresql+psycopg://...``).

Migrations are a small versioned schema table (``schema_version``) and an ordered list of steps, each
run once in its own transaction: enough for a handful of tables, without alembic's script directory.
A row is committed before its response is completed (write-ahead), so a killed server loses no request
whose answer a client received.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Connection, Engine

from flexmoe.errors import FlexmoeError

meta = MetaData()
schema_version = Table("schema_version", meta, Column("version", Integer, primary_key=True))
requests = Table(
    "requests",
    meta,
    Column("id", String(36), primary_key=True),
    Column("created", DateTime(timezone=True), nullable=False, index=True),
    Column("model", String(200), nullable=False),
    Column("endpoint", String(40), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("finish_reason", String(20), nullable=False),
)
usage = Table(
    "expert_usage",
    meta,
    Column("request_id", String(36), ForeignKey("requests.id"), primary_key=True),
    Column("expert", String(200), primary_key=True),
    Column("owner", String(200), nullable=True, index=True),
    Column("share", Float, nullable=False),
    Column("tokens", Float, nullable=False),  # share x completion tokens
)


def _v1(conn: Connection) -> None:
    for t in (requests, usage):
        t.create(conn, checkfirst=True)


MIGRATIONS: list[Callable[[Connection], None]] = [_v1]


def connect(url: str) -> Engine:
    """An engine for ``url`` with the schema migrated to the newest version."""
    try:
        engine = create_engine(url, pool_pre_ping=True)
    except Exception as e:  # noqa: BLE001 - bad URLs and missing drivers read the same to a user
        raise FlexmoeError(f"Cannot open ledger database {url!r}: {e}", "give a valid SQLAlchemy URL.") from e
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # a commit is on disk: kill -9 loses nothing
            cur.close()

    migrate(engine)
    return engine


def migrate(engine: Engine) -> int:
    with engine.begin() as conn:
        schema_version.create(conn, checkfirst=True)
        current = conn.execute(select(func.max(schema_version.c.version))).scalar() or 0
    for version, step in enumerate(MIGRATIONS[current:], start=current + 1):
        with engine.begin() as conn:
            step(conn)
            conn.execute(insert(schema_version).values(version=version))
    return len(MIGRATIONS)


class Ledger:
    def __init__(self, url: str):
        self.url = url
        self.engine = connect(url)

    def record(
        self,
        model: str,
        endpoint: str,
        prompt_tokens: int,
        completion_tokens: int,
        finish_reason: str,
        attribution: dict[str, float],
        owner_of: Callable[[str], str | None],
    ) -> str:
        """Write one request and its per-expert usage in one transaction; returns the request id."""
        rid = str(uuid.uuid4())
        with self.engine.begin() as conn:
            conn.execute(
                insert(requests).values(
                    id=rid,
                    created=datetime.now(timezone.utc),
                    model=model[:200],
                    endpoint=endpoint,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    finish_reason=finish_reason,
                )
            )
            rows = [
                {
                    "request_id": rid,
                    "expert": e,
                    "owner": owner_of(e),
                    "share": s,
                    "tokens": s * completion_tokens,
                }
                for e, s in attribution.items()
            ]
            if rows:
                conn.execute(insert(usage), rows)
        return rid

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(requests)).scalar()

    def daily(self, since: datetime | None = None, expert: str | None = None) -> list[dict]:
        """Usage per owner (or expert without owner), expert and UTC day: requests and attributed tokens."""
        day = (
            func.date(requests.c.created)
            if self.engine.dialect.name == "sqlite"
            else func.date_trunc("day", requests.c.created)
        )
        q = (
            select(
                day.label("day"),
                usage.c.owner,
                usage.c.expert,
                func.count().label("requests"),
                func.sum(usage.c.tokens).label("tokens"),
            )
            .join(requests, requests.c.id == usage.c.request_id)
            .group_by(day, usage.c.owner, usage.c.expert)
            .order_by(day, usage.c.expert)
        )
        if since is not None:
            q = q.where(requests.c.created >= since)
        if expert is not None:
            q = q.where(usage.c.expert == expert)
        with self.engine.connect() as conn:
            out = []
            for r in conn.execute(q):
                d = r.day if isinstance(r.day, str) else r.day.date().isoformat()
                out.append(
                    {
                        "day": str(d)[:10],
                        "owner": r.owner or "",
                        "expert": r.expert,
                        "requests": int(r.requests),
                        "tokens": round(float(r.tokens or 0.0), 3),
                    }
                )
            return out


def report(rows: list[dict], as_csv: bool = False) -> str:
    """The daily rows as CSV or as an aligned text table."""
    fields = ["day", "owner", "expert", "requests", "tokens"]
    if as_csv:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    lines = [f"{'day':10s}  {'owner':16s}  {'expert':16s}  {'requests':>8s}  {'tokens':>10s}"]
    for r in rows:
        lines.append(
            f"{r['day']:10s}  {r['owner'] or '-':16s}  {r['expert']:16s}  "
            f"{r['requests']:8d}  {r['tokens']:10.1f}"
        )
    totals: dict[str, float] = {}
    for r in rows:
        totals[r["owner"] or r["expert"]] = totals.get(r["owner"] or r["expert"], 0.0) + r["tokens"]
    lines.append("totals: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(totals.items())))
    return "\n".join(lines)


def plot(rows: list[dict], out) -> None:
    """Tokens attributed per owner per day, one line each (PNG)."""
    import matplotlib  # heavy: only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, float]] = {}
    for r in rows:
        key = r["owner"] or r["expert"]
        series.setdefault(key, {})[r["day"]] = series.get(key, {}).get(r["day"], 0.0) + r["tokens"]
    days = sorted({r["day"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, vals in sorted(series.items()):
        ax.plot(days, [vals.get(d, 0.0) for d in days], marker="o", label=key)
    ax.set_ylabel("tokens attributed")
    ax.set_title("flexmoe usage per owner and day")
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def parse_since(since: str | None) -> datetime | None:
    """``YYYY-MM-DD`` or ``Nd`` (the last N days)."""
    if not since:
        return None
    if since.endswith("d") and since[:-1].isdigit():
        return datetime.now(timezone.utc) - timedelta(days=int(since[:-1]))
    try:
        return datetime.fromisoformat(since).replace(tzinfo=timezone.utc)
    except ValueError as e:
        raise FlexmoeError(f"--since {since!r} is not a date.", "use YYYY-MM-DD or Nd (e.g. 7d).") from e
