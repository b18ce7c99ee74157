"""One set of validators for everything a user hands to flexmoe: numbers, names, text files, weights.

Every check raises ``FlexmoeError`` naming the value (and the file and byte offset, for files) and the
fix, so that bad input is refused before any work starts and never surfaces as a traceback.
"""

from __future__ import annotations

import functools
import json
import math
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import torch

from flexmoe.errors import FlexmoeError

# A single line (or .txt document) longer than this is refused rather than read: a 50 MB one-line
# file would otherwise become gigabytes of Python strings and token lists.
MAX_LINE_BYTES = 8 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


# --------------------------------------------------------------------------------------------------
# Numbers


def number(
    value: float | int | None,
    option: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """A finite number in [low, high] (open ends with ``low_open`` / ``high_open``); None passes."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FlexmoeError(f"{option} {value!r} is not a number.", f"pass a number for {option}.")
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
        hi = "" if high is None else (f"< {high:g}" if high_open else f"<= {high:g}")
        want = " and ".join(x for x in (lo, hi) if x) or "finite"
        raise FlexmoeError(f"{option} {value!r} is out of range.", f"pass a finite value {want}.")


def positive(value, option: str) -> None:
    number(value, option, low=0, low_open=True)


def numbers(**checks: tuple) -> None:
    """Several ``number`` checks: ``numbers(**{"--lr": (lr, dict(low=0, low_open=True))})``."""
    for option, (value, bounds) in checks.items():
        number(value, option, **bounds)


# --------------------------------------------------------------------------------------------------
# Names and text that reach a terminal or a file name


def printable(text: str, what: str) -> None:
    """Refuse control characters (terminal escape sequences, NUL, newlines) in short text fields."""
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")]
    if bad:
        raise FlexmoeError(
            f"{what} contains control character(s) {', '.join(sorted({repr(c) for c in bad}))}.",
            "use printable text only (no escape sequences or line breaks).",
        )


def safe_text(text: str) -> str:
    """``text`` with control characters shown as escapes, so that nothing reaches a terminal raw."""
    return "".join(
        c.encode("unicode_escape").decode() if unicodedata.category(c) == "Cc" and c != "\n" else c
        for c in text
    )


def name(value: str, what: str = "Expert name") -> None:
    """An expert or owner name: letters, digits, '-', '_' or '.', printable, at most 64 characters."""
    printable(value or "", what)
    if (
        not value
        or len(value) > 64
        or value in (".", "..")
        or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in value)
    ):
        raise FlexmoeError(
            f"{what} {value!r} is not valid.", "use 1-64 ASCII letters, digits, '-', '_' or '.'."
        )


# --------------------------------------------------------------------------------------------------
# Files


def not_pickle(path: Path, what: str = "file") -> None:
    """Pickle can run code when loaded: flexmoe reads safetensors and JSON only, and says so."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES or path.name == "pytorch_model.bin":
        raise FlexmoeError(
            f"{path} is a pickle-based {what} ({path.suffix}); flexmoe never loads pickle (it can run code).",
            "convert it to safetensors (e.g. model.save_pretrained(dir, safe_serialization=True)).",
        )


def no_pickle_weights(directory: Path) -> None:
    """A model directory with pickle weights and no safetensors is refused explicitly."""
    directory = Path(directory)
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(
        p.name for p in directory.iterdir() if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise FlexmoeError(
            f"{directory} has only pickle weights ({', '.join(pickles)}); flexmoe never loads pickle.",
            "convert them to safetensors (model.save_pretrained(dir, safe_serialization=True)).",
        )


def _decode_error(path: Path, offset: int, e: UnicodeDecodeError) -> FlexmoeError:
    where = offset + e.start
    bad = e.object[e.start : e.start + 4].hex(" ")
    hint = ""
    if e.object[:2] in (b"\xff\xfe", b"\xfe\xff"):
        hint = " (it looks like UTF-16)"
    elif b"\x00" in e.object[:4096]:
        hint = " (it looks like a binary file)"
    return FlexmoeError(
        f"{path} is not UTF-8 text{hint}: invalid byte(s) {bad} at byte offset {where}.",
        "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8), or remove it from --data.",
    )


def utf8_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """Stream ``(line number, line)`` of a UTF-8 file in bounded memory.

    Refuses invalid UTF-8 (with the byte offset), NUL bytes (binary files) and lines longer than
    ``max_line_bytes``."""
    path = Path(path)
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), 1):
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise FlexmoeError(
                    f"{path}: line {lineno} (byte offset {offset}) is longer than "
                    f"{max_line_bytes // 2**20} MiB.",
                    "split the text into documents or lines of reasonable length.",
                )
            nul = raw.find(b"\x00")
            if nul >= 0:
                raise FlexmoeError(
                    f"{path} is not text: NUL byte at byte offset {offset + nul}.",
                    "pass UTF-8 text files only (binary files cannot be trained on).",
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _decode_error(path, offset, e) from None
            yield lineno, text.removeprefix("\ufeff") if lineno == 1 else text
            offset += len(raw)


def jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """Stream ``(line number, parsed JSON)`` of a JSONL file through ``utf8_lines``; blank lines are
    skipped and a line that is not JSON is refused with its file and line number."""
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise FlexmoeError(
                f"{path}:{lineno} is not valid JSON ({e.msg}).", "write one JSON object per line."
            ) from e


def text_documents(path: Path, max_doc_bytes: int = MAX_LINE_BYTES) -> list[str]:
    """Documents of a ``.txt`` file: separated by one or more blank lines (a paragraph each).

    Streams the file line by line; a single document larger than ``max_doc_bytes`` is refused."""
    docs: list[str] = []
    cur: list[str] = []
    size = 0
    for lineno, line in utf8_lines(path, max_doc_bytes):
        if line.strip():
            cur.append(line)
            size += len(line)
            if size > max_doc_bytes:
                raise FlexmoeError(
                    f"{path}: the document ending at line {lineno} is larger than "
                    f"{max_doc_bytes // 2**20} MiB.",
                    "separate documents in .txt files by blank lines.",
                )
        elif cur:
            docs.append("".join(cur).rstrip("\n"))
            cur, size = [], 0
    if cur:
        docs.append("".join(cur).rstrip("\n"))
    return docs


def finite_tensor(t, what: str) -> None:
    """Weights must be finite: NaN or inf would poison every composed model they enter."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise FlexmoeError(f"{what} contains NaN or infinite values.", "do not use these weights.")


# --------------------------------------------------------------------------------------------------
# Command-line options: one rule per option name, applied to every command (``guard_cli``).

_INT_MIN_1 = (
    "steps batch_size seq_len max_new_tokens max_blocks n_docs documents prefix_tokens suffix_tokens "
    "samples candidates per_repeat max_tokens max_documents max_private vocab_size dp_steps "
    "dp_batch_size max_shard_mb top_k limit"
).split()
RULES: dict[str, dict] = {
    **{k: {"low": 1} for k in _INT_MIN_1},
    **{k: {"low": 0, "low_open": True} for k in "lr dp_lr size_mb dp_epsilon dp_max_grad_norm".split()},
    **{k: {"low": 0} for k in "temperature weight_decay seed extraction_documents".split()},
    "dp_delta": {"low": 0, "high": 1, "low_open": True, "high_open": True},
    "bias_init": {"high": 0},
    "public_mix": {"low": 0, "high": 1, "low_open": True, "high_open": True},
    "fraction": {"low": 0, "high": 1, "low_open": True, "high_open": True},
    "proxy_share": {"low": 0, "high": 1, "high_open": True},
    "threshold": {"low": 0, "high": 1},
}
NAMES = ("name",)
TEXTS = ("description", "contact", "license")


def cli_arguments(params: dict) -> None:
    """Check a command's parsed options by name (numbers in range and finite, names, short texts)."""
    for key, value in params.items():
        option = "--" + key.replace("_", "-")
        values = value if isinstance(value, list | tuple) else [value]
        if key in RULES:
            for v in values:
                number(v, option, **RULES[key])
        elif key in NAMES and value is not None:
            name(value, option)
        elif key in TEXTS and isinstance(value, str):
            printable(value, option)


def guard_cli(app) -> None:
    """Wrap every command of a typer app (and its sub-apps) so that ``cli_arguments`` runs first."""
    for info in app.registered_commands:
        if getattr(info.callback, "_guarded", False):
            continue
        fn = info.callback

        @functools.wraps(fn)
        def run(*args, _fn=fn, **kwargs):
            cli_arguments(kwargs)
            return _fn(*args, **kwargs)

        run._guarded = True
        info.callback = run
    for group in app.registered_groups:
        guard_cli(group.typer_instance)
