"""`flexmoe eval` on a user's own data: any folder of domains with test splits or a single file, as
perplexity with no task files; --limit; nothing to score is an error; --composition prints the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_anchor_dir
from typer.testing import CliRunner

from flexmoe.cli import app

TEXT = "The quarterly report lists revenue, costs and the outlook for the next year. " * 6


@pytest.fixture(scope="module")
def tiny_anchor(demo_data, tmp_path_factory):
    """A random tiny HF model with the project's tokenizer: scoring needs no trained model."""
    from flexmoe.data import read_documents

    docs = read_documents([demo_data / "public" / "train.jsonl"])[:80]
    return make_anchor_dir(tmp_path_factory.mktemp("evalcli") / "anchor", "olmo2", docs)


def _jsonl(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"{i} {TEXT}"}) + "\n" for i in range(n)))
    return path


def test_eval_scores_a_plain_user_directory_and_a_single_file(tiny_anchor, tmp_path):
    data = tmp_path / "mine"
    _jsonl(data / "reports" / "test.jsonl", 6)
    _jsonl(data / "reports" / "train.jsonl", 3)  # training data next to it is not scored
    (data / "mail").mkdir()
    (data / "mail" / "test.txt").write_text(TEXT)
    (data / "notes").mkdir()  # no test split: not a domain
    run = CliRunner().invoke
    r = run(
        app,
        ["eval", str(tiny_anchor), "--data", str(data), "--out", str(tmp_path / "r.json"), "--limit", "2"],
    )
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "r.json").read_text())
    assert set(out["perplexity"]) == {"mail", "reports"} and out["tasks"] == {} and out["average"] is None
    assert out["details"]["perplexity"]["reports"]["documents"] <= 2  # --limit 2 documents
    lo, hi = out["details"]["perplexity"]["reports"]["ci95"]
    assert lo <= out["perplexity"]["reports"] <= hi
    assert "perplexity" in r.output and "average 0.0" not in r.output
    one = _jsonl(tmp_path / "single.jsonl", 4)
    r = run(app, ["eval", str(tiny_anchor), "--data", str(one), "--out", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    assert list(json.loads((tmp_path / "s.json").read_text())["perplexity"]) == ["single"]


def test_eval_limit_applies_to_tasks(tiny_anchor, demo_data, tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "eval",
            str(tiny_anchor),
            "--data",
            str(demo_data),
            "--limit",
            "3",
            "--max-blocks",
            "2",
            "--out",
            str(tmp_path / "r.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["tasks"] and all(next(iter(s.values()))["n"] == 3 for s in out["details"]["tasks"].values())
    assert all(p["documents"] <= 3 for p in out["details"]["perplexity"].values())


def test_eval_with_nothing_to_score_is_an_error(tiny_anchor, tmp_path):
    (tmp_path / "empty" / "domain").mkdir(parents=True)
    (tmp_path / "empty" / "domain" / "train.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    p = subprocess.run(
        [sys.executable, "-m", "flexmoe", "eval", str(tiny_anchor), "--data", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 1
    assert "Nothing to score" in p.stderr and "Traceback" not in p.stderr + p.stdout
    r = CliRunner().invoke(app, ["eval", str(tiny_anchor), "--data", str(tmp_path / "missing")])
    assert r.exit_code == 1 and "does not exist" in str(r.exception)
    r = CliRunner().invoke(app, ["eval", str(tiny_anchor), "--data", str(tmp_path), "--limit", "0"])
    assert r.exit_code == 1 and "--limit" in str(r.exception)
