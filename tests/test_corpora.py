"""The embedded demo corpora: deterministic, well-formed, disjoint splits, distinct domains, right answers."""

from __future__ import annotations

import ast
import collections
import json
import math
import operator
import re
import time
from fractions import Fraction
from pathlib import Path

import pytest

import flexmoe
from flexmoe.corpora import DOMAINS, SPLITS, build_demo_corpora
from flexmoe.corpora import math as math_problems
from flexmoe.corpora._rand import Rand
from flexmoe.corpora.dedup import Deduper
from flexmoe.corpora.federations import MEASURE
from flexmoe.corpora.overlap import coverage, overlap_report
from flexmoe.corpora.sources import ASSETS as ASSET_SOURCES
from flexmoe.corpora.sources import file_group, rows
from flexmoe.errors import FlexmoeError

SMALL_MB = 0.2
ASSETS = Path(flexmoe.__file__).parent / "assets"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _texts(root: Path, domain: str, split: str) -> list[str]:
    lines = (root / domain / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, int]]]:
    out = tmp_path_factory.mktemp("corpora") / "small"
    return out, build_demo_corpora(out, size_mb=SMALL_MB)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, int]], float]:
    out = tmp_path_factory.mktemp("corpora") / "full"
    start = time.perf_counter()
    stats = build_demo_corpora(out)
    return out, stats, time.perf_counter() - start


# --- determinism and layout -------------------------------------------------------------------------


def test_two_builds_are_byte_identical(small, tmp_path: Path) -> None:
    first, _ = small
    second = tmp_path / "again"
    build_demo_corpora(second, size_mb=SMALL_MB)
    a, b = _files(first), _files(second)
    assert sorted(a) == sorted(b)
    tasks = json.loads(a["manifest.json"])["tasks"]
    assert tasks, "the build writes evaluation tasks"
    assert len(a) == 3 * len(DOMAINS) + 1 + len(tasks)
    for name in a:
        assert a[name] == b[name], name


def test_layout_and_manifest(small) -> None:
    out, stats = small
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["flexmoe_version"] == flexmoe.__version__
    assert manifest["size_mb"] == SMALL_MB
    assert manifest["domain_order"] == list(DOMAINS) == ["public", "code", "math", "legal"]
    for d in DOMAINS:
        for s in SPLITS:
            texts = _texts(out, d, s)
            assert manifest["domains"][d][s] == {
                "docs": len(texts),
                "bytes": sum(len(t.encode("utf-8")) for t in texts),
            }
            assert stats[d][f"{s}_docs"] == len(texts)
            assert stats[d][f"{s}_bytes"] == manifest["domains"][d][s]["bytes"]


def test_every_line_is_a_document_and_splits_are_disjoint(small) -> None:
    out, _ = small
    for d in DOMAINS:
        seen: dict[str, str] = {}
        ids = set()
        for s in SPLITS:
            for line in (out / d / f"{s}.jsonl").read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                assert isinstance(row["text"], str) and row["text"].strip()
                assert row["id"].startswith(f"{d}-") and row["id"] not in ids
                ids.add(row["id"])
                assert row["text"] not in seen, f"{d}: document in both {seen.get(row['text'])} and {s}"
                seen[row["text"]] = s


def test_split_proportions_and_sizes(small) -> None:
    _, stats = small
    budget = SMALL_MB * 1e6
    for d in DOMAINS:
        st = stats[d]
        n = sum(st[f"{s}_docs"] for s in SPLITS)
        total = sum(st[f"{s}_bytes"] for s in SPLITS)
        assert n >= 20, d
        assert abs(st["valid_docs"] - n / 20) <= 1 and abs(st["test_docs"] - n / 20) <= 1
        # each domain stops at the first document that reaches the budget
        assert budget <= total < budget * 1.1, (d, total)


def test_default_size_is_fast_and_about_two_mb_per_domain(full) -> None:
    out, stats, seconds = full
    assert seconds < 20, f"building the default corpora took {seconds:.1f} s"
    for d in DOMAINS:
        total = sum(stats[d][f"{s}_bytes"] for s in SPLITS)
        assert 2.0e6 <= total < 2.05e6, (d, total)
        assert 0.88 < stats[d]["train_bytes"] / total < 0.92, d
    legal = "".join(t for s in SPLITS for t in _texts(out, "legal", s))
    assert any(name in legal for name in ("GNU", "Apache License", "Mozilla Public License"))  # real licences
    assert "Section" in legal and "WHEREAS" in legal


def test_documents_have_sensible_lengths(small) -> None:
    out, _ = small
    for d in DOMAINS:
        lengths = sorted(len(t) for t in _texts(out, d, "train"))
        median = lengths[len(lengths) // 2]
        assert 150 <= median <= 10_000, (d, median)


# --- the domains differ -----------------------------------------------------------------------------


def _unigrams(texts: list[str]) -> dict[str, float]:
    counts = collections.Counter(w for t in texts for w in re.findall(r"[A-Za-z_]+|[^\sA-Za-z_]", t))
    total = sum(counts.values())
    return {w: c / total for w, c in counts.items()}


def _l1(p: dict[str, float], q: dict[str, float]) -> float:
    return sum(abs(p.get(w, 0.0) - q.get(w, 0.0)) for w in set(p) | set(q))


def test_each_domain_is_closest_to_itself(small) -> None:
    out, _ = small
    train = {d: _unigrams(_texts(out, d, "train")) for d in DOMAINS}
    for d in DOMAINS:
        test = _unigrams(_texts(out, d, "test"))
        own = _l1(train[d], test)
        others = {e: _l1(train[e], test) for e in DOMAINS if e != d}
        assert own < min(others.values()), (d, own, others)


def test_domain_markers(small) -> None:
    out, _ = small
    texts = {d: [t for s in SPLITS for t in _texts(out, d, s)] for d in DOMAINS}
    assert sum("def " in t or "class " in t for t in texts["code"]) > 0.8 * len(texts["code"])
    assert all(t.rstrip("\n").splitlines()[-1].startswith("Answer: ") for t in texts["math"])
    legal = re.compile(r"(?i)section|agreement|licen[cs]e|copyright|shall")
    assert sum(bool(legal.search(t)) for t in texts["legal"]) > 0.9 * len(texts["legal"])


def test_public_pool_holds_every_owners_kind_in_another_style(full) -> None:
    """Like a web-scale mix: some code, some maths, some licences; but not the owners' own formats."""
    out, _, _ = full
    public = [t for s in SPLITS for t in _texts(out, "public", s)]
    marker = {
        "code": r"^\s*(def|class|import|from) \w",
        "math": r"\d+ ?[-+×/=] ?\d+",
        "legal": r"(?i)licen[cs]e|warrant|permission is hereby granted",
    }
    total = sum(map(len, public))
    for kind, pattern in marker.items():  # share of the public pool's text, by documents' characters
        share = sum(len(t) for t in public if re.search(pattern, t, re.M)) / total
        assert share >= 0.05, (kind, share)
    # the owners' own styles stay with the owners
    assert not any(re.search(r"^Answer: ", t, re.M) for t in public)
    assert not any("WHEREAS" in t for t in public)


def _norm_key(text: str) -> str:
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def _grams8(text: str) -> set[tuple[str, ...]]:
    w = re.findall(r"[^\W_]+", text.lower())
    return {tuple(w[i : i + 8]) for i in range(len(w) - 7)}


def _check_deduplicated(out: Path, domains: list[str]) -> None:
    """No normalised text twice anywhere; no owner document mostly made of public 8-grams."""
    where: dict[str, str] = {}
    for d in domains:
        for s in SPLITS:
            for t in _texts(out, d, s):
                key = _norm_key(t)
                assert key not in where, f"{d}/{s} repeats a document of {where[key]}"
                where[key] = f"{d}/{s}"
    public_grams = set().union(*(_grams8(t) for s in SPLITS for t in _texts(out, "public", s)))
    for d in domains[1:]:
        for s in SPLITS:
            for t in _texts(out, d, s):
                g = _grams8(t)
                # the filter samples a quarter of the 8-grams, so allow some slack over its 50% threshold
                assert not g or len(g & public_grams) < 0.7 * len(g), (d, s, t[:200])


def test_deduplicated_across_splits_and_domains(full) -> None:
    out, _, _ = full
    _check_deduplicated(out, list(DOMAINS))


def test_deduper_drops_exact_and_near_copies() -> None:
    words = " ".join(f"w{i}" for i in range(400))
    d = Deduper()
    assert d.keep(words, "public", within=True)
    assert not d.keep(words.upper().replace(" ", "  ,"), "code", within=False)  # same normalised text
    near = words.replace("w7 ", "changed ").replace("w300", "other")
    assert not d.keep(near, "code", within=False)  # another domain: near copies are dropped
    assert d.keep(near, "public", within=False)  # own domain, generated text: only exact copies count
    assert not d.keep(near + " x", "public", within=True)  # own domain, real text: near copies count
    assert d.keep(" ".join(f"v{i}" for i in range(400)), "code", within=True)
    assert d.dropped == {"code": 2, "public": 1}


# --- math answers -----------------------------------------------------------------------------------

ANSWER = re.compile(r"^Answer: (-?\d+(?:\.\d+)?(?:/\d+)?)$")
BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval(expr: str, env: dict[str, Fraction] | None = None) -> Fraction:
    """Exact value of an arithmetic expression written with × ÷ and implicit products like ``3x``."""
    expr = expr.replace("×", "*").replace("÷", "/")
    expr = re.sub(r"(\d)([a-z(])", r"\1*\2", expr)

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        if isinstance(node, ast.Name):
            return (env or {})[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            return BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(ast.dump(node))

    return ev(ast.parse(expr, mode="eval").body)


def _parse_answer(text: str) -> Fraction:
    lines = text.rstrip("\n").splitlines()
    m = ANSWER.match(lines[-1])
    assert m, lines[-1]
    assert sum(line.startswith("Answer:") for line in lines) == 1
    return Fraction(m.group(1))


def _recompute(kind: str, statement: str, answer: Fraction) -> Fraction | None:
    """The answer worked out independently from the problem statement, where its wording allows."""
    nums = [int(n) for n in re.findall(r"\d+", statement)]
    if kind == "order":
        return _eval(re.match(r"(?:Evaluate|Calculate|What is the value of) (.+)[.?]$", statement).group(1))
    if kind == "addition":
        return Fraction(sum(nums))
    if kind == "subtraction":
        a, b = nums
        return Fraction(b - a if statement.startswith("Subtract") else a - b)
    if kind == "multiplication":
        return Fraction(math.prod(nums))
    if kind == "division":
        return Fraction(nums[0] // nums[1])
    if kind == "remainder":
        return Fraction(nums[0] % nums[1])
    if kind == "fraction":
        m = re.search(r"(\d+/\d+) ([-+×÷]) (\d+/\d+)", statement)
        x, y = Fraction(m.group(1)), Fraction(m.group(3))
        return {"+": x + y, "-": x - y, "×": x * y, "÷": x / y}[m.group(2)]
    if kind == "percent_of":
        return Fraction(nums[0] * nums[1], 100)
    if kind == "percent_what":
        return Fraction(nums[1] * 100, nums[0])
    if kind == "percent_change":
        m = re.search(r"costs \$(\d+)\. Its price (rises|is reduced) by (\d+)%", statement)
        price, p = Fraction(m.group(1)), Fraction(m.group(3))
        return price * (1 + p / 100) if m.group(2) == "rises" else price * (1 - p / 100)
    if kind == "equation":
        eq = re.search(
            r"(?:Solve for [a-z]: |Find [a-z] if |Solve the equation )(.+ = .+)\.$", statement
        ).group(1)
        var = re.search(r"[a-z]", eq).group(0)
        left, right = eq.split(" = ")
        env = {var: answer}
        assert _eval(left, env) == _eval(right, env), eq
        return answer  # substitution checked above
    return None


def test_math_answers_are_correct() -> None:
    r = Rand(7)
    checked = collections.Counter()
    for _ in range(3000):
        p = math_problems.problem(r)
        assert _parse_answer(p.text) == p.answer
        assert p.text.rstrip("\n").splitlines()[-1] == f"Answer: {math_problems.format_number(p.answer)}"
        statement = p.text.split("\n", 1)[0].split(": ", 1)[1]
        expected = _recompute(p.kind, statement, p.answer)
        if expected is not None:
            assert expected == p.answer, (p.kind, statement, p.answer)
            checked[p.kind] += 1
        else:  # word problems: the final working line states the answer
            assert math_problems.format_number(p.answer) in p.text.splitlines()[-2], p.text
    assert len(checked) >= 10, checked  # every parseable kind was recomputed at least once


def test_math_documents_in_corpus_parse(small) -> None:
    out, _ = small
    for s in SPLITS:
        for t in _texts(out, "math", s):
            _parse_answer(t)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Fraction(42), "42"),
        (Fraction(-7), "-7"),
        (Fraction(25, 2), "12.5"),
        (Fraction(1, 8), "0.125"),
        (Fraction(-3, 40), "-0.075"),
        (Fraction(7, 12), "7/12"),
        (Fraction(-50, 3), "-50/3"),
    ],
)
def test_format_number(value: Fraction, text: str) -> None:
    assert math_problems.format_number(value) == text
    assert Fraction(text) == value


# --- atomic output ----------------------------------------------------------------------------------


def test_existing_output_is_refused_untouched_then_replaced_with_force(tmp_path: Path) -> None:
    out = tmp_path / "corpora"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FlexmoeError):
        build_demo_corpora(out, size_mb=0.05)
    assert _files(out) == {"mine.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpora"]  # no temporary left behind

    build_demo_corpora(out, size_mb=0.05, force=True)
    assert not (out / "mine.txt").exists()
    assert (out / "manifest.json").is_file()
    assert all((out / d / f"{s}.jsonl").is_file() for d in DOMAINS for s in SPLITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpora"]


def test_task_items_caps_every_task(tmp_path: Path) -> None:
    out = tmp_path / "c"
    build_demo_corpora(out, size_mb=0.3, task_items=7)
    counts = json.loads((out / "manifest.json").read_text())["tasks"]
    assert counts and all(n <= 7 for n in counts.values()) and max(counts.values()) == 7
    assert all(len((out / "tasks" / f"{t}.jsonl").read_text().splitlines()) == n for t, n in counts.items())


@pytest.mark.parametrize("items", [0, -5, 2.5])
def test_bad_task_items_is_refused_before_anything_is_written(tmp_path: Path, items) -> None:
    with pytest.raises(FlexmoeError, match="task_items"):
        build_demo_corpora(tmp_path / "x", size_mb=0.05, task_items=items)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("size", [0, -1.0, float("nan"), float("inf")])
def test_bad_size_is_refused(tmp_path: Path, size: float) -> None:
    with pytest.raises(FlexmoeError):
        build_demo_corpora(tmp_path / "x", size_mb=size)
    assert not (tmp_path / "x").exists()


# --- shipped assets ---------------------------------------------------------------------------------


def test_shipped_assets_are_small_and_licensed() -> None:
    sizes = {p.name: p.stat().st_size for p in ASSETS.iterdir() if p.is_file()}
    assert {"code.jsonl.xz", "licenses.jsonl.xz", "LICENSE-PSF.txt"} <= set(sizes)
    assert {f"{a}.jsonl.xz" for a in ASSET_SOURCES} <= set(sizes)
    assert sum(sizes.values()) < 3_500_000
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in (ASSETS / "LICENSE-PSF.txt").read_text()


def test_rand_is_reproducible() -> None:
    a, b = Rand(5), Rand(5)
    assert [a.below(1000) for _ in range(50)] == [b.below(1000) for _ in range(50)]
    items = list(range(30))
    Rand(1).shuffle(items)
    assert sorted(items) == list(range(30)) and items != list(range(30))
    picked = Rand(3).picks("abcdef", 6)
    assert picked != list("abcdef") and sorted(picked) == list("abcdef")


# --- the measurement federation ---------------------------------------------------------------------

MEASURE_MB = MEASURE.size_mb  # the default size: the overlap between the Python owners needs enough text


@pytest.fixture(scope="module")
def measure(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, int]]]:
    out = tmp_path_factory.mktemp("corpora") / "measure"
    return out, build_demo_corpora(out, federation="measure")


def test_measure_federation_is_deterministic(measure, tmp_path: Path) -> None:
    first, _ = measure
    build_demo_corpora(tmp_path / "again", federation="measure")
    assert _files(first) == _files(tmp_path / "again")


def test_measure_federation_layout_and_owners(measure) -> None:
    out, stats = measure
    manifest = json.loads((out / "manifest.json").read_text())
    owners = manifest["owners"]
    assert manifest["federation"] == "measure" and manifest["domain_order"] == ["public", *owners]
    assert len(owners) >= 6 and {"py_a", "py_b"} <= set(owners)
    for d in manifest["domain_order"]:
        for s in SPLITS:
            assert manifest["domains"][d][s]["docs"] == len(_texts(out, d, s)) > 0, (d, s)
        assert (out / "tasks" / f"{d}_cloze.jsonl").is_file()
        total = sum(stats[d][f"{s}_bytes"] for s in SPLITS)
        scale = 2 if d == "public" else 1
        assert total < scale * MEASURE_MB * 1e6 * 1.1, (d, total)
    _check_deduplicated(out, manifest["domain_order"])


def test_measure_python_owners_share_modules_but_no_documents(measure) -> None:
    out, _ = measure
    group = {t: file_group(s) for s, t in rows("code")}
    docs = {d: {t for s in SPLITS for t in _texts(out, d, s)} for d in ("py_a", "py_b")}
    assert not docs["py_a"] & docs["py_b"]
    groups = {d: {group[t] for t in docs[d]} for d in docs}
    shared = groups["py_a"] & groups["py_b"]
    assert len(shared) >= 0.15 * min(len(g) for g in groups.values()), (len(shared), groups)
    assert groups["py_a"] - groups["py_b"] and groups["py_b"] - groups["py_a"]  # and each has its own


def test_measure_public_pool_holds_some_of_every_owners_kind(measure) -> None:
    out, _ = measure
    manifest = json.loads((out / "manifest.json").read_text())
    public_labels = {s["label"] for s in manifest["domains"]["public"]["sources"].values() if s["docs"]}
    for d in manifest["owners"]:
        labels = {s["label"] for s in manifest["domains"][d]["sources"].values()}
        assert labels <= public_labels, (d, labels)
    assert MEASURE.owners == tuple(manifest["owners"])


def test_overlap_report(small, measure) -> None:
    assert coverage(["a b c d e"], ["x a b c d"], 4) == 0.5
    assert coverage(["a b c d"], ["a b c d"], 4) == 1.0 and coverage(["a b"], ["a b"], 4) == 0.0
    for out, _ in (small, measure):
        report = overlap_report(out)
        for d, r in report.items():
            assert 0 < r["public_kind_share"] < 0.5, (d, r)
            assert 0.5 < r["word_cov_public"] <= 1.0, (d, r)
            assert r["ngram_cov_public"] < r["ngram_cov_own"] or d == "legal", (d, r)
    assert report["py_a"]["closest_owner"] == "py_b"


def test_unknown_federation_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FlexmoeError):
        build_demo_corpora(tmp_path / "x", federation="nope")
    assert not (tmp_path / "x").exists()
