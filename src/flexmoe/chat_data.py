"""The demo's chat sets (public and one per owner domain) and tasks with checkable answers, generated
deterministically from templates; and the answer checks used for evaluation and RL rewards.

Per domain, ``build_chat_sets`` writes ``DIR/{domain}/``: ``train.jsonl`` and ``valid.jsonl``
(conversations), ``tasks.jsonl`` (held-out evaluation prompts with answers) and ``rl.jsonl`` (prompts
with answers for RL, disjoint from the evaluation tasks). A task row is
``{"messages": [...prompt turns...], "answer": str, "check": "number|exact|contains"}``.

Items are split by a hash of their prompt, so no evaluation prompt is ever trained on.

- math: small-number arithmetic; the answer is a number.
- code: the value a short Python expression evaluates to (computed here by Python itself).
- legal: which party holds a role in a one-sentence agreement; the answer is a name.
- public (general chat): repeat a phrase, opposites, plurals; the answer is a word or phrase.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from flexmoe import validate
from flexmoe.chat import check_conversation
from flexmoe.errors import FlexmoeError
from flexmoe.fileio import atomic_dir

DOMAINS = ("public", "code", "math", "legal")
SYSTEM = "You are a helpful assistant."

_WORDS = "apple river stone cloud tiger lamp garden window silver paper forest candle bridge".split()
_OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "light": "dark",
    "open": "closed",
    "early": "late",
    "high": "low",
    "full": "empty",
    "old": "new",
    "wet": "dry",
    "hard": "soft",
}
_NAMES = "Acme Borealis Cobalt Dunmore Everly Fairfax Granite Halcyon Ironwood Juniper Keystone Lumen".split()
_ROLES = (("licensor", "licensee"), ("lessor", "lessee"), ("employer", "employee"), ("seller", "buyer"))


def _math(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    op = rng.choice("+-*")
    c = {"+": a + b, "-": a - b, "*": a * b}[op]
    q = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"Calculate {a} {op} {b}."])
    return q, f"{a} {op} {b} = {c}. The answer is {c}.", str(c)


def _code(rng: random.Random) -> tuple[str, str, str]:
    w, a, b = rng.choice(_WORDS), rng.randint(1, 9), rng.randint(1, 9)
    expr = rng.choice(
        [
            f"len('{w}')",
            f"{a} * {b}",
            f"max({a}, {b})",
            f"'{w}'.upper()",
            f"'{w}'[:{a % 4 + 1}]",
            f"{a + b} // {b}",
        ]
    )
    value = eval(expr, {"__builtins__": {"len": len, "max": max}})  # noqa: S307  our own template, no input
    q = rng.choice(
        [f"What does `{expr}` evaluate to in Python?", f"In Python, what is the value of `{expr}`?"]
    )
    return q, f"`{expr}` evaluates to {value}.", str(value)


def _legal(rng: random.Random) -> tuple[str, str, str]:
    x, y = rng.sample(_NAMES, 2)
    r1, r2 = rng.choice(_ROLES)
    ask, ans = rng.choice([(r1, x), (r2, y)])
    q = f"This agreement is made between {x} (the {r1}) and {y} (the {r2}). Who is the {ask}?"
    return q, f"The {ask} is {ans}.", ans


def _public(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        phrase = " ".join(rng.sample(_WORDS, rng.choice((2, 3))))
        return f"Repeat after me: {phrase}", phrase, phrase
    if kind == 1:
        w, o = rng.choice(sorted(_OPPOSITES.items()))
        return f"What is the opposite of {w}?", f"The opposite of {w} is {o}.", o
    w = rng.choice(_WORDS)
    return f"What is the plural of {w}?", f"The plural of {w} is {w}s.", f"{w}s"


MAKERS = {"public": _public, "code": _code, "math": _math, "legal": _legal}
CHECKS = {"public": "contains", "code": "exact", "math": "number", "legal": "contains"}


def _bucket(prompt: str) -> float:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64


def domain_items(domain: str, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` distinct (prompt, reply, answer) items of a domain (fewer if the templates run out)."""
    rng = random.Random(f"{domain}-{seed}")
    seen, items = set(), []
    for _ in range(n * 20):
        q, r, a = MAKERS[domain](rng)
        if q not in seen:
            seen.add(q)
            items.append((q, r, a))
        if len(items) == n:
            break
    return items


def _conversation(q: str, r: str, rng: random.Random) -> dict:
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    if rng.random() < 0.3:  # some conversations carry a system turn, as real chat data does
        msgs.insert(0, {"role": "system", "content": SYSTEM})
    return {"messages": msgs}


def build_chat_sets(out: Path, n_train: int = 400, n_tasks: int = 60, force: bool = False) -> dict:
    """Write the demo chat sets and tasks under ``out``; returns counts per domain and split."""
    stats = {}
    with atomic_dir(Path(out), force=force) as tmp:
        for d in DOMAINS:
            rng = random.Random(f"conv-{d}")
            items = domain_items(d, n_train + 2 * n_tasks)
            held = [it for it in items if _bucket(it[0]) < 0.2][:n_tasks]
            rl = [it for it in items if 0.2 <= _bucket(it[0]) < 0.35]
            train = [it for it in items if _bucket(it[0]) >= 0.35]
            valid, train = train[: max(1, len(train) // 10)], train[max(1, len(train) // 10) :]
            rows = {
                "train": [_conversation(q, r, rng) for q, r, _ in train],
                "valid": [_conversation(q, r, rng) for q, r, _ in valid],
                "tasks": [_task(q, a, d) for q, _, a in held],
                "rl": [_task(q, a, d) for q, _, a in rl],
            }
            (tmp / d).mkdir()
            for split, rs in rows.items():
                with open(tmp / d / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rs)
            stats[d] = {k: len(v) for k, v in rows.items()}
    return stats


def _task(q: str, answer: str, domain: str) -> dict:
    return {"messages": [{"role": "user", "content": q}], "answer": answer, "check": CHECKS[domain]}


def read_tasks(path: Path) -> list[dict]:
    """Task rows of a ``tasks.jsonl`` / ``rl.jsonl`` file, validated."""
    rows = []
    for lineno, row in validate.jsonl_rows(path):  # UTF-8 checked: a Latin-1 file is a clear error
        where = f"{path}:{lineno}"
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("answer"), str)
            or row.get("check") not in CHECKS.values()
        ):
            raise FlexmoeError(
                f"{where} needs a string 'answer' and 'check' in number/exact/contains.",
                'write {"messages": [...], "answer": "7", "check": "number"}.',
            )
        msgs = (
            row["messages"] + [{"role": "assistant", "content": "?"}]
            if isinstance(row.get("messages"), list)
            else None
        )
        check_conversation({"messages": msgs}, where)
        rows.append(row)
    if not rows:
        raise FlexmoeError(f"{path} holds no tasks.", "add at least one task.")
    return rows


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def correct(reply: str, answer: str, check: str) -> bool:
    """Whether a reply answers a task: the last number equals the answer (number), the text after the
    last 'to'/'is' equals it (exact: code values), or the answer appears as a word (contains)."""
    reply = reply.strip()
    if check == "number":
        nums = _NUMBER.findall(reply)
        return bool(nums) and float(nums[-1]) == float(answer)
    if check == "exact":
        tail = re.split(r"\b(?:to|is)\s+", reply)[-1].strip().rstrip(".").strip("`'\"")
        return tail == answer.strip("'\"")
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", reply) is not None
