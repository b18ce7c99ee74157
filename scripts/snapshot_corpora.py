"""Dev-time snapshot of the real text that the demo corpora ship (run once; the outputs are committed).

Writes, under ``src/flexmoe/assets/``:

- ``code.jsonl.xz``: CPython standard-library modules of the running interpreter, split into documents
  of a few KB (top-level functions and classes, merged or cut at line boundaries), about 3 MB of text;
- ``licenses.jsonl.xz``: open-source licence texts from Debian's ``/usr/share/common-licenses``;
- ``LICENSE-PSF.txt``: the interpreter's own licence file, which covers the code snapshot.

The package never reads the live Python installation at build time (it differs between Python
versions); it only decompresses these files, so the demo corpora are identical everywhere.

Usage: ``python scripts/snapshot_corpora.py [--budget-mb 3.0]``
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import lzma
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "src" / "flexmoe" / "assets"
LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSES = ("Apache-2.0", "GPL-2", "GPL-3", "LGPL-2.1", "LGPL-3", "MPL-2.0", "BSD", "Artistic", "CC0-1.0")

# Tests, GUI code, the deprecated 2to3 tool and the bundled wheels are not representative library code;
# encodings/ and pydoc_data/ are mostly generated data tables and strings rather than code.
SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "site-packages",
    "dist-packages",
    "encodings",
    "pydoc_data",
    "__pycache__",
    "__phello__",
}
MAX_FILE_BYTES = 150_000  # the few larger modules are mostly data or would dominate the sample
MIN_DOC, TARGET_DOC, MAX_DOC = 300, 1500, 5000  # document size bounds in characters


def stdlib_files(root: Path) -> list[Path]:
    """Eligible ``.py`` files of the standard library, sorted by relative path."""
    files = []
    for p in sorted(root.rglob("*.py"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root)
        # config-3.x-<platform>/ holds build helpers whose name differs per platform
        dirs = rel.parts[:-1]
        if SKIP_DIRS.intersection(dirs) or any(d.startswith("config-") for d in dirs):
            continue
        if p.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append(p)
    return files


def choose_files(root: Path, files: list[Path], budget: int) -> list[Path]:
    """A deterministic, package-balanced subset of about ``budget`` bytes.

    Taking the first files alphabetically would fill the budget with a handful of packages, so files
    are ranked by a hash of their path (a fixed pseudo-random order), taken until the budget is met,
    and returned in path order.
    """
    ranked = sorted(files, key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).digest())
    chosen, total = [], 0
    for p in ranked:
        if total >= budget:
            break
        chosen.append(p)
        total += len(p.read_text(encoding="utf-8"))
    return sorted(chosen, key=lambda p: p.relative_to(root).as_posix())


def _cut_lines(text: str, limit: int) -> Iterator[str]:
    """Cut an over-long block into pieces of at most about ``limit`` characters, preferring blank lines."""
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if size >= limit // 2 and (not line.strip() or size + len(line) > limit):
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        yield "".join(piece)


def _node_start(node: ast.stmt, lines: list[str]) -> int:
    """0-based first line of a top-level node, including its decorators and the comments just above."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
    while first > 0 and lines[first - 1].lstrip().startswith("#"):
        first -= 1
    return first


def _blocks(source: str) -> Iterator[str]:
    """Top-level blocks of a module: each statement with the comments and decorators above it."""
    lines = source.splitlines(keepends=True)
    try:
        body = ast.parse(source).body
    except SyntaxError:  # a few stdlib files target other grammars; treat them as plain text
        yield source
        return
    starts = sorted({0, *(_node_start(n, lines) for n in body[1:])}) + [len(lines)]
    for a, b in zip(starts, starts[1:], strict=False):
        yield "".join(lines[a:b])


def split_module(source: str) -> list[str]:
    """Documents of one module: top-level blocks merged up to ~TARGET_DOC, long ones cut at MAX_DOC."""
    docs: list[str] = []
    cur = ""
    for block in _blocks(source):
        pieces = list(_cut_lines(block, MAX_DOC)) if len(block) > MAX_DOC else [block]
        for piece in pieces:
            if cur and len(cur) + len(piece) > MAX_DOC:
                docs.append(cur)
                cur = ""
            cur += piece
            if len(cur) >= TARGET_DOC:
                docs.append(cur)
                cur = ""
    if cur:
        if docs and len(cur) < MIN_DOC:
            docs[-1] += cur
        else:
            docs.append(cur)
    return [d.strip("\n") + "\n" for d in docs if d.strip()]


def license_chunks(text: str, limit: int = 3000) -> list[str]:
    """Cut a licence into paragraph-aligned chunks of at most about ``limit`` characters."""
    paras = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paras:
        if cur and size + len(p) > limit:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return [c + "\n" for c in chunks]


def write_xz_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """One JSON object per line, xz-compressed with the strongest preset (small committed assets)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    print(f"{path.name}: {len(rows)} documents, {len(data):,} bytes -> {path.stat().st_size:,} bytes xz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mb", type=float, default=3.0, help="stdlib source to snapshot, in MB")
    args = ap.parse_args()
    ASSETS.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))

    files = choose_files(root, stdlib_files(root), int(args.budget_mb * 1e6))
    rows, seen = [], set()
    for p in files:
        rel = p.relative_to(root).as_posix()
        for doc in split_module(p.read_text(encoding="utf-8")):
            # identical boilerplate in two modules would leak across splits; tiny modules say little
            if doc in seen or len(doc) < MIN_DOC // 2:
                continue
            seen.add(doc)
            rows.append({"source": f"CPython {version} Lib/{rel}", "text": doc})
    write_xz_jsonl(ASSETS / "code.jsonl.xz", rows)
    shutil.copyfile(root / "LICENSE.txt", ASSETS / "LICENSE-PSF.txt")

    lic_rows = []
    for name in LICENSES:
        path = LICENSE_DIR / name
        if not path.is_file():
            print(f"skipping {name}: not in {LICENSE_DIR}")
            continue
        for chunk in license_chunks(path.read_text(encoding="utf-8")):
            lic_rows.append({"source": f"Debian /usr/share/common-licenses/{name}", "text": chunk})
    write_xz_jsonl(ASSETS / "licenses.jsonl.xz", lic_rows)


if __name__ == "__main__":
    main()
