"""Downstream tasks built deterministically from held-out (test-split) documents, never training data.

Per domain, ``<domain>_cloze``: a multiple-choice task in the style of HellaSwag: given the text so far,
pick the true next segment (a line of code or legal text, a sentence of prose, a step of working)
among four candidates; the three distractors are true segments of other held-out documents of the
same domain. Plus ``math_answer``: a generative exact-match task: the problem and its working up to
``Answer:``, and the model must produce the number.

Items are written to ``DATA/tasks/<task>.jsonl``:
``{"id", "task", "domain", "context", "choices", "answer"}`` (multiple choice) or
``{"id", "task", "domain", "prompt", "answer"}`` (generative).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from flexmoe.errors import FlexmoeError

N_CHOICES = 4
MAX_CONTEXT_CHARS = 480
MIN_CONTEXT_CHARS = 120
SEGMENT = {
    "public": re.compile(r"(?<=[.!?\"])\s+"),  # sentences
    "code": re.compile(r"\n"),  # lines
    "math": re.compile(r"\n"),  # steps of working
    "legal": re.compile(r"(?<=[.;:])\s+|\n"),  # clauses
}


def _rank(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def _segments(text: str, domain: str) -> list[tuple[int, int]]:
    """(start, end) of each segment of a document, keeping segments of 12 to 200 characters."""
    spans, start = [], 0
    for m in SEGMENT[domain].finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(a, b) for a, b in spans if 12 <= len(text[a:b].strip()) <= 200]


def cloze_items(docs: list[dict], domain: str, n_items: int, kind: str | None = None) -> list[dict]:
    """Up to ``n_items`` four-way cloze items from held-out documents, spread over the documents.

    ``kind`` (a key of ``SEGMENT``; the domain's name by default) says how the text is cut into segments.
    """
    candidates = []
    for d in docs:
        text = d["text"]
        for a, b in _segments(text, kind or domain):
            if a >= MIN_CONTEXT_CHARS and "Answer:" not in text[a:b]:
                candidates.append((d["id"], text[max(0, a - MAX_CONTEXT_CHARS) : a], text[a:b]))
    candidates.sort(key=lambda c: _rank(f"{c[0]}|{c[2]}"))
    picked, per_doc = [], {}
    for doc_id, ctx, seg in candidates:  # at most a few items per document, so one document can't dominate
        if per_doc.get(doc_id, 0) < max(1, 2 * n_items // max(1, len(docs))) and len(picked) < n_items:
            picked.append((doc_id, ctx, seg))
            per_doc[doc_id] = per_doc.get(doc_id, 0) + 1
    items = []
    for i, (doc_id, ctx, seg) in enumerate(picked):
        others = [p[2] for p in picked if p[0] != doc_id and p[2].strip() != seg.strip()]
        if len(others) < N_CHOICES - 1:
            continue
        start = _rank(f"{doc_id}|{i}") % len(others)
        distractors = [others[(start + 7 * j) % len(others)] for j in range(N_CHOICES - 1)]
        answer = _rank(f"answer|{doc_id}|{i}") % N_CHOICES
        choices = distractors[:answer] + [seg] + distractors[answer:]
        items.append(
            {
                "id": f"{domain}_cloze-{i:04d}",
                "task": f"{domain}_cloze",
                "domain": domain,
                "context": ctx,
                "choices": choices,
                "answer": answer,
            }
        )
    return items


def math_answer_items(docs: list[dict], n_items: int) -> list[dict]:
    """Generative exact-match items: everything up to ``Answer:``; the target is the number after it."""
    items = []
    for d in sorted(docs, key=lambda d: _rank(d["id"]))[:n_items]:
        head, sep, tail = d["text"].rpartition("Answer:")
        if sep and tail.strip():
            prompt = head[-MAX_CONTEXT_CHARS:] + "Answer:"
            items.append(
                {
                    "id": f"math_answer-{len(items):04d}",
                    "task": "math_answer",
                    "domain": "math",
                    "prompt": prompt,
                    "answer": tail.strip(),
                }
            )
    return items


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tasks(data_dir: Path, n_items: int = 100, domains: dict[str, str] | None = None) -> dict[str, int]:
    """Write every task of the domains under ``data_dir/tasks``; returns items per task.

    ``domains`` maps each domain to its kind of text (a key of ``SEGMENT``); by default the demo's four.
    """
    data_dir = Path(data_dir)
    (data_dir / "tasks").mkdir(exist_ok=True)
    counts = {}
    for domain, kind in (domains or {d: d for d in SEGMENT}).items():
        docs = _read(data_dir / domain / "test.jsonl")
        tasks = {f"{domain}_cloze": cloze_items(docs, domain, n_items, kind)}
        if domain == "math":
            tasks["math_answer"] = math_answer_items(docs, n_items)
        for name, items in tasks.items():
            with open(data_dir / "tasks" / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as f:
                f.writelines(json.dumps(it, ensure_ascii=True) + "\n" for it in items)
            counts[name] = len(items)
    return counts


def load_tasks(data_dir: Path) -> dict[str, list[dict]]:
    """All tasks of a data directory, by name."""
    folder = Path(data_dir) / "tasks"
    if not folder.is_dir():
        raise FlexmoeError(
            f"{data_dir} has no tasks/ folder.", "build the data with: flexmoe data demo --out DIR"
        )
    return {p.stem: _read(p) for p in sorted(folder.glob("*.jsonl"))}
