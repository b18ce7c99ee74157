"""The two embedded federations: what each domain is made of, and how a federation is built.

``demo`` (the default of ``flexmoe data demo`` and ``flexmoe demo``) is realistic in the way FlexOlmo's
setting is: its public pool is broad and holds some text of every owner's kind, from other sources or
in another style (pip's source code beside the owner's standard library, worded maths explanations
beside the owner's worked problems, permissive package licences beside the owner's contracts, statutes
and copyleft licences); each owner holds more of its kind, which the public pool lacks.

``measure`` is built differently and is meant only for measurement: no default may be tuned on it. It
has its own public pool and nine owners, among them two Python owners whose module sets overlap
(``py_a`` and ``py_b`` share a third of the standard library's packages, document by document), and
kinds the demo does not have: C headers, CMake scripts, configuration files, scientific docstrings,
Debian copyright files and package records. Most of its owners and their public counterparts are
different files of one real source (``part`` in :mod:`flexmoe.corpora.sources`).

The first source of a domain fills whatever the others cannot (their share, or what their asset holds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flexmoe.corpora import legal, mathprose, public
from flexmoe.corpora import math as math_problems
from flexmoe.corpora._rand import Rand
from flexmoe.corpora.dedup import Deduper
from flexmoe.corpora.sources import Source

GENERATORS: dict[str, Callable[[int, int], Iterator[str]]] = {
    "public": public.generate,
    "math": math_problems.generate,
    "mathprose": mathprose.generate,
    "legal": legal.generate,
}


def _gen(name: str, share: float, label: str) -> Source:
    return Source(f"gen:{name}", share, label, real=False)


@dataclass(frozen=True)
class Domain:
    """One domain: its name, its kind of text (how evaluation tasks cut it) and what it is made of."""

    name: str
    kind: str  # "public" (sentences), "code" (lines), "math" (steps), "legal" (clauses): see evaluate/tasks
    sources: tuple[Source, ...]
    scale: float = 1.0  # of the federation's size per domain
    about: str = ""


@dataclass(frozen=True)
class Federation:
    name: str
    domains: tuple[Domain, ...]  # the public pool first
    size_mb: float  # default text per domain (times each domain's scale)
    seed_offset: int

    @property
    def owners(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.domains[1:])


DEMO = Federation(
    "demo",
    (
        Domain(
            "public",
            "public",
            (
                _gen("public", 0.47, "prose"),
                Source("pydoc_topics", 0.12, "python"),
                Source("pip", 0.13, "python"),
                Source("mpmath_docs", 0.08, "math"),
                _gen("mathprose", 0.08, "math"),
                Source("package_licences", 0.12, "legal"),
            ),
            about="stories and expository prose; the Python language reference; pip's source code; "
            "worded maths (mpmath's function documentation, textbook explanations); licence files of "
            "Python packages",
        ),
        Domain("code", "code", (Source("code", 1.0, "python"),), about="CPython standard-library source"),
        Domain(
            "math", "math", (_gen("math", 1.0, "math"),), about="worked problems ending in 'Answer: <number>'"
        ),
        Domain(
            "legal",
            "legal",
            (_gen("legal", 1.0, "legal"),),
            about="contracts and statutes; GNU, Apache, MPL, BSD, Artistic and CC0 licence texts",
        ),
    ),
    size_mb=2.0,
    seed_offset=0,
)

# Which files of a shared asset go to the public pool: (0, PUBLIC_CUT); owners take the rest.
_PUB = {"capi": 0.2, "cmake": 0.2, "configs": 0.3, "sci_docs": 0.15}
LABEL = {"capi": "c", "cmake": "cmake", "configs": "config", "sci_docs": "sci"}

MEASURE = Federation(
    "measure",
    (
        Domain(
            "public",
            "public",
            (
                _gen("public", 0.30, "prose"),
                Source("readmes", 0.25, "prose"),
                Source("pip", 0.08, "python"),
                _gen("mathprose", 0.05, "math"),
                Source("mpmath_docs", 0.05, "math"),
                Source("package_licences", 0.07, "legal"),
                Source("metadata", 0.04, "records"),
                *(
                    Source(a, 0.04 if a != "configs" else 0.02, LABEL[a], part=(0.0, cut))
                    for a, cut in _PUB.items()
                ),
            ),
            scale=2.0,
            about="stories and expository prose; package READMEs; pip's source; worded maths; package "
            "licences and metadata headers; a share of the C headers, CMake modules, configs and docstrings",
        ),
        Domain(
            "py_a",
            "code",
            (Source("code", 1.0, "python", part=(0.0, 0.35), shared=(0.7, 1.0, 0)),),
            about="standard-library packages of group A plus half of the shared group's documents",
        ),
        Domain(
            "py_b",
            "code",
            (Source("code", 1.0, "python", part=(0.35, 0.7), shared=(0.7, 1.0, 1)),),
            about="standard-library packages of group B plus the other half of the shared group's documents",
        ),
        Domain(
            "c_api",
            "code",
            (Source("capi", 1.0, "c", part=(_PUB["capi"], 1.0)),),
            about="CPython C API headers",
        ),
        Domain(
            "cmake",
            "code",
            (Source("cmake", 1.0, "cmake", part=(_PUB["cmake"], 1.0)),),
            about="CMake modules",
        ),
        Domain(
            "config",
            "code",
            (Source("configs", 1.0, "config", part=(_PUB["configs"], 1.0)),),
            about="package configs",
        ),
        Domain(
            "sci",
            "public",
            (Source("sci_docs", 1.0, "sci", part=(_PUB["sci_docs"], 1.0)),),
            about="SymPy, NetworkX and SciPy docstrings",
        ),
        Domain("legal", "legal", (Source("debian_copyright", 1.0, "legal"),), about="Debian copyright files"),
        Domain("records", "code", (Source("dpkg_status", 1.0, "records"),), about="Debian package records"),
        Domain(
            "math", "math", (_gen("math", 1.0, "math"),), about="worked problems ending in 'Answer: <number>'"
        ),
    ),
    size_mb=1.0,
    seed_offset=50,
)

# A generator whose documents keep repeating what is already there has nothing new left to give.
MAX_MISSES = 2000

FEDERATIONS = {f.name: f for f in (DEMO, MEASURE)}


def domain_documents(
    domain: Domain, seed: int, budget: int, dedup: Deduper
) -> tuple[list[str], dict[str, dict[str, int]]]:
    """A domain's documents (kept by ``dedup``) in a seeded order, and documents/bytes per source.

    Every source but the first takes its share of ``budget``; the first then fills up to ``budget``.
    """
    docs: list[str] = []
    stats: dict[str, dict[str, int]] = {}
    order = list(range(1, len(domain.sources))) + [0]
    for i in order:
        src = domain.sources[i]
        goal = src.share * budget if i else budget - sum(int(s["bytes"]) for s in stats.values())
        got, misses = {"docs": 0, "bytes": 0, "label": src.label}, 0
        for text in src.stream(seed * 10 + i, GENERATORS):
            if got["bytes"] >= goal or misses >= MAX_MISSES:
                break
            if dedup.keep(text, domain.name, within=src.real):
                docs.append(text)
                got["docs"] += 1
                got["bytes"] += len(text.encode("utf-8"))
                misses = 0
            else:
                misses += 1
        stats[src.key] = got
    Rand(seed).shuffle(docs)
    return docs, stats
