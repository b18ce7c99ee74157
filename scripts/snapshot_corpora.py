"""Dev-time snapshot of the real text that the demo corpora ship (run once; the outputs are committed).

Writes, under ``src/flexmoe/assets/``:

- ``code.jsonl.xz``: CPython standard-library modules of the running interpreter, split into documents
  of a few KB (top-level functions and classes, merged or cut at line boundaries), about 3 MB of text;
- ``licenses.jsonl.xz``: open-source licence texts from Debian's ``/usr/share/common-licenses``;
- ``LICENSE-PSF.txt``: the interpreter's own licence file, which covers the code snapshot;
- the further sources of the two federations (``flexmoe.corpora.federations``), one ``<name>.jsonl.xz``
  each, listed in ``EXTRA`` below: pip's own source, the Python language reference (``pydoc_data``),
  mpmath's function documentation, Debian copyright files, package READMEs and metadata headers,
  licence files of installed packages, CPython's C API headers, CMake modules, package configuration
  files and scientific docstrings (SymPy, NetworkX, SciPy).

The package never reads the live Python installation at build time (it differs between Python
versions); it only decompresses these files, so the demo corpora are identical everywhere.

Every row is ``{"source": ..., "text": ...}``; files are read in sorted order and picked by a hash of
their path, so a rerun on the same machine reproduces the assets byte for byte.

Usage: ``python scripts/snapshot_corpora.py [--budget-mb 3.0]``
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import lzma
import re
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


# --- the further sources of the two federations ------------------------------------------------------

SITE = Path(sysconfig.get_paths()["purelib"])
INCLUDE = Path(sysconfig.get_paths()["include"])
DOC_DIR = Path("/usr/share/doc")
CMAKE_DIR = next(iter(sorted(Path("/usr/share").glob("cmake-*/Modules"))), Path("/nonexistent"))
CONFIG_EXT = {".toml", ".cfg", ".ini", ".yaml", ".yml", ".json", ".mplstyle"}


def _rank(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _take(rows: list[dict[str, str]], budget: int, key: str = "source") -> list[dict[str, str]]:
    """Whole files (all rows of one ``key``) in hash order until ``budget`` characters; stored order."""
    by_file: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_file.setdefault(r[key], []).append(r)
    chosen, total = [], 0
    for name in sorted(by_file, key=_rank):
        if total >= budget:
            break
        chosen.append(name)
        total += sum(len(r["text"]) for r in by_file[name])
    keep = set(chosen)
    return [r for r in rows if r[key] in keep]


def _python_rows(root: Path, prefix: str, budget: int) -> list[dict[str, str]]:
    """Module documents (as for the stdlib snapshot) of the ``.py`` files under ``root``."""
    files = sorted(
        (p for p in root.rglob("*.py") if "__pycache__" not in p.parts), key=lambda p: p.as_posix()
    )
    rows = []
    for p in choose_files(root, files, budget):
        for doc in split_module(p.read_text(encoding="utf-8")):
            if len(doc) >= MIN_DOC // 2:
                rows.append({"source": f"{prefix}/{p.relative_to(root).as_posix()}", "text": doc})
    return rows


def pydoc_topic_rows() -> list[dict[str, str]]:
    """The Python language reference as shipped in ``pydoc_data.topics``, cut at paragraphs."""
    from pydoc_data.topics import topics  # the running interpreter's reference text

    version = ".".join(map(str, sys.version_info[:3]))
    return [
        {"source": f"CPython {version} Lib/pydoc_data/topics.py [{name}]", "text": chunk}
        for name in sorted(topics)
        for chunk in license_chunks(topics[name])
    ]


def _string_assignments(path: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of every module-level ``name = "..."`` string (mpmath keeps its docs that way)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, str) and isinstance(node.targets[0], ast.Name):
                yield node.targets[0].id, node.value.value


def mpmath_rows() -> list[dict[str, str]]:
    import mpmath  # dev-time only: the installed mpmath's documentation of its functions

    path = Path(mpmath.__file__).parent / "function_docs.py"
    rows = []
    for name, text in _string_assignments(path):
        for chunk in license_chunks(text.strip("\n")):
            if len(chunk) >= 200:
                rows.append(
                    {"source": f"mpmath {mpmath.__version__} function_docs.py [{name}]", "text": chunk}
                )
    return rows


def docstring_rows(package: str, budget: int) -> list[dict[str, str]]:
    """Long docstrings (functions, classes, modules) of an installed package, with the name as a title."""
    import importlib.metadata

    root = SITE / package
    version = importlib.metadata.version(package)
    rows = []
    for p in sorted(root.rglob("*.py"), key=lambda q: q.as_posix()):
        if {"tests", "test", "benchmarks"} & set(p.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and 400 <= len(doc) <= 12_000:
                    title = getattr(node, "name", p.stem)
                    rel = p.relative_to(SITE).as_posix()
                    for chunk in license_chunks(f"{title}\n\n{doc}"):
                        rows.append({"source": f"{package} {version} {rel}", "text": chunk})
    return _take(rows, budget)


def debian_copyright_rows(budget: int) -> list[dict[str, str]]:
    """Debian ``copyright`` files (who holds the rights to a package, under which licences)."""
    rows = []
    for p in sorted(DOC_DIR.glob("*/copyright")):
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for chunk in license_chunks(text):
            rows.append({"source": f"Debian /usr/share/doc/{p.parent.name}/copyright", "text": chunk})
    return _take(rows, budget)


def _dist_infos() -> list[Path]:
    """Installed distributions, except flexmoe itself (its own README would feed back into its data)."""
    found = sorted(SITE.glob("*.dist-info"), key=lambda p: p.name.lower())
    return [p for p in found if not p.name.startswith("flexmoe-")]


def metadata_rows() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Installed packages' METADATA: (header records, README bodies cut at paragraphs)."""
    records, readmes = [], []
    for d in _dist_infos():
        meta = d / "METADATA"
        if not meta.is_file():
            continue
        head, _, body = meta.read_text(encoding="utf-8").partition("\n\n")
        name = d.name.removesuffix(".dist-info")
        # the bare list of extras' dependencies says little; keep the descriptive fields
        head = "\n".join(line for line in head.splitlines() if not line.startswith("Requires-Dist:"))
        records.append({"source": f"{name} METADATA header", "text": head.strip() + "\n"})
        for chunk in license_chunks(body):
            if len(chunk) >= 200:
                readmes.append({"source": f"{name} METADATA description", "text": chunk})
    return records, readmes


def package_licence_rows() -> list[dict[str, str]]:
    """Licence files of installed packages (``*.dist-info/licenses/`` or ``LICENSE*``)."""
    rows = []
    for d in _dist_infos():
        files = sorted(
            p for p in d.rglob("*") if p.is_file() and re.match(r"(LICEN[CS]E|COPYING|NOTICE)", p.name, re.I)
        )
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            for chunk in license_chunks(text):
                rows.append({"source": f"{d.name}/{p.relative_to(d).as_posix()}", "text": chunk})
    return rows


def _file_chunks(files: list[Path], root: Path, prefix: str, limit: int = 2500) -> list[dict[str, str]]:
    rows = []
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for piece in _cut_lines(text, limit) if len(text) > limit else [text]:
            if len(piece.strip()) >= 150:
                rows.append(
                    {"source": f"{prefix}/{p.relative_to(root).as_posix()}", "text": piece.strip("\n") + "\n"}
                )
    return rows


def capi_rows() -> list[dict[str, str]]:
    files = sorted(INCLUDE.rglob("*.h"), key=lambda p: p.as_posix())
    version = ".".join(map(str, sys.version_info[:3]))
    return _file_chunks(files, INCLUDE, f"CPython {version} Include")


def cmake_rows(budget: int) -> list[dict[str, str]]:
    files = sorted(CMAKE_DIR.rglob("*.cmake"), key=lambda p: p.as_posix())
    return _take(_file_chunks(files, CMAKE_DIR, f"CMake {CMAKE_DIR.parent.name} Modules"), budget)


def config_rows() -> list[dict[str, str]]:
    """Configuration and markup files that installed packages ship (TOML, INI, YAML, JSON, rc files)."""
    files = [
        p
        for p in sorted(SITE.rglob("*"), key=lambda q: q.as_posix())
        if p.is_file()
        and (p.suffix in CONFIG_EXT or p.name == "matplotlibrc")
        and p.stat().st_size < 40_000
        and ".dist-info" not in p.as_posix()
        and not {"tests", "test"} & set(p.parts)
    ]
    rows = _file_chunks(files, SITE, "site-packages")
    # Debian's ALSA use-case and topology configurations (BSD-3-Clause) and fontconfig's (MIT-style)
    system = []
    for root in (Path("/usr/share/alsa"), Path("/usr/share/fontconfig"), Path("/etc/fonts")):
        found = sorted(
            (p for p in root.rglob("*") if p.is_file() and p.stat().st_size < 40_000),
            key=lambda q: q.as_posix(),
        )
        system += _file_chunks(found, root.parent, f"Debian {root.parent.as_posix()}")
    return rows + _take(system, 900_000)


def dpkg_status_rows(path: Path = Path("/var/lib/dpkg/status")) -> list[dict[str, str]]:
    """Debian's database of installed packages: one record per package, a few records per document."""
    records = sorted(r.strip("\n") for r in path.read_text(encoding="utf-8").split("\n\n") if r.strip())
    rows, cur = [], ""
    for rec in records:
        cur = f"{cur}\n\n{rec}" if cur else rec
        if len(cur) >= TARGET_DOC:
            rows.append({"source": "Debian /var/lib/dpkg/status", "text": cur + "\n"})
            cur = ""
    if cur:
        rows.append({"source": "Debian /var/lib/dpkg/status", "text": cur + "\n"})
    return rows


def write_extra_assets() -> None:
    """Every further source of the federations (see ``flexmoe.corpora.sources``)."""
    import pip

    records, readmes = metadata_rows()
    extra = {
        "pip": _python_rows(
            Path(pip.__file__).parent / "_internal", f"pip {pip.__version__} pip/_internal", 1_200_000
        ),
        "pydoc_topics": pydoc_topic_rows(),
        "mpmath_docs": mpmath_rows(),
        "debian_copyright": debian_copyright_rows(3_500_000),
        "readmes": readmes,
        "metadata": records,
        "dpkg_status": dpkg_status_rows(),
        "package_licences": package_licence_rows(),
        "capi": capi_rows(),
        "cmake": cmake_rows(1_000_000),
        "configs": config_rows(),
        "sci_docs": docstring_rows("sympy", 700_000)
        + docstring_rows("networkx", 500_000)
        + docstring_rows("scipy", 400_000),
    }
    for name, rows in extra.items():
        write_xz_jsonl(ASSETS / f"{name}.jsonl.xz", rows)


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
    write_extra_assets()


if __name__ == "__main__":
    main()
