"""Read owners' corpora (.txt, .jsonl, .parquet), tokenise, and pack them into training blocks.

A data path is a file or a directory. A ``.txt`` file holds documents separated by blank lines (one
paragraph block = one document; a file without blank lines is one document); ``.jsonl`` holds one JSON
object with a string ``text`` per line; ``.parquet`` a string column ``text``. Text must be UTF-8 (refused
with the file name and byte offset otherwise); lines are streamed and one over 8 MiB is refused.
A directory A directory that holds ``train.*`` and ``valid.*`` files (what
``flexmoe data demo`` writes) gives its own splits; any other directory or file list is training data
from which a deterministic held-out fraction is split off for validation.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flexmoe import validate
from flexmoe.errors import FlexmoeError

SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class Splits:
    """Documents of one corpus, split into training and held-out text."""

    train: list[str]
    valid: list[str]


def _files_in(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    raise FlexmoeError(f"Data path {path} does not exist.", "pass an existing file or directory with --data.")


def read_file(path: Path) -> list[str]:
    """Documents in one file: .txt blocks separated by blank lines; .jsonl/.parquet rows need ``text``."""
    validate.not_pickle(path, "data file")
    if path.suffix == ".txt":
        return validate.text_documents(path)
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise FlexmoeError(f"{path} has unsupported type {path.suffix!r}.", f"use one of {', '.join(SUFFIXES)}.")


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, row in validate.jsonl_rows(path):  # streamed, UTF-8 checked with byte offsets
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise FlexmoeError(
                f"{path}:{lineno} has no string field 'text'.",
                'give every line a "text" field, e.g. {"text": "..."}.',
            )
        if row["text"].strip():
            docs.append(row["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise FlexmoeError(
            f"{path} is not a readable Parquet file ({type(e).__name__}: {str(e)[:200]}).",
            "re-export the file, or remove it from --data.",
        ) from e
    if "text" not in table.column_names:
        raise FlexmoeError(
            f"{path} has no column 'text' (columns: {', '.join(table.column_names)}).",
            "rename the column that holds the documents to 'text'.",
        )
    return [t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip()]


def read_documents(paths: Sequence[Path | str], summary: dict | None = None) -> list[str]:
    """All non-empty documents of the given files and directories, in a stable order.

    ``summary`` (a dict) receives what was read: files and documents per type, and bytes of text."""
    docs: list[str] = []
    for p in paths:
        for f in _files_in(Path(p)):
            got = read_file(f)
            docs.extend(got)
            if summary is not None:
                kind = summary.setdefault(f.suffix, {"files": 0, "documents": 0, "chars": 0})
                kind["files"] += 1
                kind["documents"] += len(got)
                kind["chars"] += sum(map(len, got))
    return docs


def describe_read(summary: dict) -> str:
    """One line saying what was read, e.g. '.txt: 2 files, 40 documents (blank-line separated)'."""
    how = {".txt": "blank-line separated", ".jsonl": "one per line", ".parquet": "one per row"}
    return "; ".join(
        f"{k}: {v['files']} file(s), {v['documents']} documents ({how.get(k, '')}), {v['chars']:,} chars"
        for k, v in sorted(summary.items())
    )


TEST_SPLIT = "test"  # held-out evaluation data: test.jsonl/.txt/.parquet, or anything under a test/ folder


def is_test_split(path: Path, root: Path | None = None) -> bool:
    """Whether ``path`` is test-split data (folders are judged below ``root`` only)."""
    folders = Path(path).relative_to(root).parts[:-1] if root is not None else ()
    return Path(path).stem == TEST_SPLIT or TEST_SPLIT in folders


def training_files(paths: Sequence[Path | str]) -> list[Path]:
    """The files that training, proxy selection, router initialisation and calibration may read: every
    data file of the given paths except test splits. This is the only reader of training-usable data,
    so no training path can see evaluation text; a test split named directly is refused."""
    files = []
    for p in map(Path, paths):
        if p.is_file() and is_test_split(p):
            raise FlexmoeError(
                f"{p} is a test split; training, proxy selection and calibration never read test data.",
                "pass the train split (rename the file if it is not held-out test data).",
            )
        files += [f for f in _files_in(p) if not is_test_split(f, p if p.is_dir() else None)]
    return files


def read_training_documents(paths: Sequence[Path | str], summary: dict | None = None) -> list[str]:
    """All non-empty documents of ``training_files(paths)``, in a stable order (``summary`` as for
    ``read_documents``)."""
    return read_documents(training_files(paths), summary)


def _split_files(path: Path, split: str) -> list[Path]:
    return [path / f"{split}{s}" for s in SUFFIXES if (path / f"{split}{s}").is_file()]


def load_splits(paths: Sequence[Path | str], valid_fraction: float = 0.05) -> Splits:
    """Training and validation documents of a corpus.

    A single directory with ``train.*`` and ``valid.*`` files keeps its own split. Otherwise every
    document is assigned by a hash of its text, so the split does not depend on file order.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise FlexmoeError("No data given.", "pass at least one --data PATH.")
    summary: dict = {}
    if len(paths) == 1 and paths[0].is_dir() and _split_files(paths[0], "train"):
        train = read_documents(_split_files(paths[0], "train"), summary)
        valid = read_documents(_split_files(paths[0], "valid"), summary)
    else:
        train, valid = [], []
        for doc in read_training_documents(paths, summary):
            h = int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big") / 2**64
            (valid if h < valid_fraction else train).append(doc)
    if summary and os.environ.get("RANK", "0") == "0":  # say what was read, once per run
        print(f"read {', '.join(map(str, paths))}: {describe_read(summary)}", file=sys.stderr)
    if not train:
        raise FlexmoeError(
            f"No usable text found in {', '.join(map(str, paths))}.",
            "point --data at .txt/.jsonl/.parquet files with non-empty 'text'.",
        )
    if not valid:
        valid = train[-max(1, len(train) // 20) :]
        train = train[: len(train) - len(valid)] or valid
    return Splits(train=train, valid=valid)


def data_fingerprint(docs: Iterable[str]) -> str:
    """SHA-256 over the documents (a hash, never content): lets a manifest name its data privately."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode()
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return h.hexdigest()


def tokenize(docs: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each document with BOS (from the tokenizer's template) and an explicit EOS."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(docs), add_special_tokens=True)["input_ids"]
    return [x + [eos] if eos is not None else x for x in ids]


def pack(token_lists: Iterable[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate documents and cut them into ``[n_blocks, seq_len]`` blocks; the tail is dropped."""
    flat = [t for ids in token_lists for t in ids]
    n = len(flat) // seq_len
    if n == 0:
        raise FlexmoeError(
            f"The data has {len(flat)} tokens, fewer than one sequence of {seq_len}.",
            "add more text or lower --seq-len.",
        )
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def blocks_for(docs: Sequence[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenise and pack in one step."""
    return pack(tokenize(docs, tokenizer), seq_len)
