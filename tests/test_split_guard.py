"""No training, proxy-selection, router-initialisation or calibration path reads a test split.

Test splits are planted beside the training data (in the demo layout and in a flat folder whose files
are not named by split) and every file the process opens is watched with an audit hook."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from flexmoe.data import is_test_split, load_splits, read_training_documents, training_files
from flexmoe.errors import FlexmoeError

SENTINEL = "SENTINEL-TEST-SPLIT-never-train-on-this"
_opened: list[str] | None = None  # test-split files opened while recording


def _hook(event, args):
    if _opened is not None and event == "open" and isinstance(args[0], (str, Path)):
        path = Path(args[0])
        if path.suffix in (".jsonl", ".txt", ".parquet") and is_test_split(path):
            _opened.append(str(path))


sys.addaudithook(_hook)  # audit hooks cannot be removed: recording is switched by ``_opened``


class watch:
    def __enter__(self):
        global _opened
        _opened = []
        return _opened

    def __exit__(self, *exc):
        global _opened
        _opened = None


def _flat(src: Path, dst: Path) -> Path:
    """A folder whose files are not named train/valid (the hash-split branch), plus a planted test split
    and a test/ sub-folder."""
    dst.mkdir(parents=True)
    shutil.copy2(src / "train.jsonl", dst / "part-0.jsonl")
    shutil.copy2(src / "valid.jsonl", dst / "part-1.jsonl")
    rows = [{"text": f"{SENTINEL} {i} " * 20} for i in range(50)]
    (dst / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dst / "test").mkdir()
    (dst / "test" / "more.jsonl").write_text(json.dumps(rows[0]) + "\n")
    return dst


@pytest.fixture(scope="module")
def flat(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    return {d: _flat(demo_data / d, root / d) for d in ("public", "code")}


def test_reader_skips_and_refuses_test_splits(flat):
    files = training_files([flat["public"]])
    assert {f.name for f in files} == {"part-0.jsonl", "part-1.jsonl"}
    assert not any(SENTINEL in d for d in read_training_documents([flat["public"]]))
    splits = load_splits([flat["public"], flat["code"]])
    assert not any(SENTINEL in d for d in splits.train + splits.valid)
    with pytest.raises(FlexmoeError, match="test split"):
        load_splits([flat["public"] / "test.jsonl"])
    # a folder merely named "test" above the given path is not a test split
    assert not is_test_split(Path("/x/test/corpus/part.jsonl"), Path("/x/test/corpus"))


def test_proxy_selection_reads_no_test_split(flat, demo_data, tmp_path):
    from flexmoe.router.proxy import ProxySettings, read_public, select_proxy

    with watch() as opened:
        ids = dict(read_public([demo_data / "public", flat["public"]]))
        select_proxy(
            [flat["code"]],
            [flat["public"], demo_data / "public"],
            tmp_path / "p",
            ProxySettings(features="ngram", quiet=True),
        )
    assert opened == []
    test_ids = {json.loads(x)["id"] for x in (demo_data / "public" / "test.jsonl").read_text().splitlines()}
    assert not test_ids & set(ids) and not any(SENTINEL in t for t in ids.values())
    assert SENTINEL not in (tmp_path / "p" / "proxy.jsonl").read_text()


@pytest.mark.slow
def test_training_router_and_calibration_read_no_test_split(flat, demo_data, tmp_path):
    from conftest import make_anchor_dir

    from flexmoe.anchor import pretrain
    from flexmoe.compose import UNSIGNED_OK, ComposeSettings, compose
    from flexmoe.expert.train import ExpertSpec, train_expert
    from flexmoe.router.calibrate import calibrator
    from flexmoe.router.proxy import ProxySettings, select_proxy
    from flexmoe.router.train import train_router

    docs = read_training_documents([demo_data / "public"])[:80]
    tiny_anchor = make_anchor_dir(tmp_path / "random", "olmo2", docs)
    with watch() as opened:
        pretrain(
            flat["public"], tmp_path / "anchor", "tiny", steps=1, vocab_size=512, quiet=True, embedder=None
        )
        train_expert(
            tiny_anchor,
            [flat["code"]],
            "code",
            tmp_path / "code",
            steps=1,
            seq_len=32,
            spec=ExpertSpec(name="code", router_init="hidden"),
            quiet=True,
            public=[flat["public"]],
        )
        train_expert(
            tiny_anchor,
            [demo_data / "math"],
            "math",
            tmp_path / "math",
            steps=1,
            seq_len=32,
            spec=ExpertSpec(name="math", router_init="hidden"),
            quiet=True,
            public=[demo_data / "public"],
        )
        pkgs = [tmp_path / "code", tmp_path / "math"]
        select_proxy(
            [flat["code"]], [flat["public"]], tmp_path / "proxy", ProxySettings(features="ngram", quiet=True)
        )
        compose(
            tiny_anchor,
            pkgs,
            tmp_path / "cal",
            ComposeSettings(calibrate=calibrator([flat["public"]])),
            provenance=UNSIGNED_OK,
        )
        train_router(
            tmp_path / "cal", [tmp_path / "proxy"], [flat["public"]], tmp_path / "rt", steps=1, quiet=True
        )
    assert opened == []
