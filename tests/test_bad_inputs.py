"""Table-driven bad input over every CLI command: a clear error (exit code 1 or a usage error 2),
a message naming the problem, no traceback, and no output (or temporary) left behind.

Every case fails before any training starts, so the whole table runs in seconds on tiny fixtures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trustkit
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flexmoe.cli import app
from flexmoe.compose import Provenance, compose
from flexmoe.errors import FlexmoeError
from flexmoe.signing import SIGNATURE, Trust, load_private_key

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def env(trust_root, tmp_path_factory):
    """Bad files and directories; placeholders {A} anchor, {M} model (signed by the owner key), {MU}
    the same unsigned, {MT} the signed model with a tensor changed, {P} package, {D} data dir,
    {K} the key directory (owner.pub, other.pub)."""
    root = tmp_path_factory.mktemp("bad")
    a = trust_root / "anchor"
    d = root / "data"
    d.mkdir()
    (d / "good.txt").write_text("first document\nstill first\n\nsecond document\n")
    (d / "train.txt").write_text("\n\n".join(f"{i}: {t}" for i in range(10) for t in trustkit.DOCS))
    (d / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    (d / "utf16.txt").write_bytes("hello world\n".encode("utf-16"))
    (d / "latin1.jsonl").write_bytes(json.dumps({"text": "x"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    (d / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(200))
    pq.write_table(pa.table({"text": ["a parquet doc"]}), d / "good.parquet")
    (d / "truncated.parquet").write_bytes((d / "good.parquet").read_bytes()[:-30])
    with open(d / "huge.txt", "wb") as f:  # a 50 MB file in one line: refused at the 8 MiB limit
        f.write(b"x" * (50 * 2**20))
    (d / "empty").mkdir()
    for domain in ("public", "code"):  # test splits, for eval --composition
        (d / "splits" / domain).mkdir(parents=True)
        (d / "splits" / domain / "test.txt").write_text("\n\n".join(trustkit.DOCS[:4]))
    (d / "model.pkl").write_bytes(b"\x80\x04K\x01.")
    anchors = _bad_anchors(a, root)
    pk = trustkit.package(a, root / "pkg", "code")
    model = root / "model"
    key = load_private_key(trust_root / "keys" / "owner")
    compose(a, [pk], model, provenance=Provenance(Trust(allow_unsigned=True), sign_key=key))
    unsigned = shutil.copytree(model, root / "model_unsigned")
    (unsigned / SIGNATURE).unlink()
    tampered = shutil.copytree(model, root / "model_tampered")
    t = load_file(str(tampered / "model.safetensors"))
    t["lm_head.weight"] = t["lm_head.weight"] * 2
    save_file(t, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    manifests = _bad_packages(pk, root)
    (root / "ro").write_text("a file, not a directory")
    models = {"M": model, "MU": unsigned, "MT": tampered, "K": trust_root / "keys"}
    return {"root": root, "A": a, "D": d, "P": pk, **models, **anchors, **manifests}


def _bad_anchors(a: Path, root: Path) -> dict:
    out = {}

    def variant(name, fn):
        p = shutil.copytree(a, root / f"anchor_{name}")
        fn(p)
        out[f"anchor_{name}"] = p

    w = "model.safetensors"
    variant("truncated", lambda p: (p / w).write_bytes((a / w).read_bytes()[: (a / w).stat().st_size // 2]))
    variant("garbage", lambda p: (p / w).write_bytes(os.urandom(4096)))
    variant("header_only", lambda p: (p / w).write_bytes((a / w).read_bytes()[:200]))
    variant("empty_weights", lambda p: (p / w).write_bytes(b""))
    variant("bad_config", lambda p: (p / "config.json").write_text("{not json"))
    variant("config_array", lambda p: (p / "config.json").write_text("[]"))
    variant("no_config", lambda p: (p / "config.json").unlink())
    variant("pickle", lambda p: ((p / w).unlink(), (p / "pytorch_model.bin").write_bytes(b"\x80\x04.")))
    variant("bad_tokenizer", lambda p: (p / "tokenizer.json").write_text("{}"))
    variant(
        "missing_shard",
        lambda p: (p / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"x": "model-00002-of-00002.safetensors"}})
        ),
    )
    variant("moe_type", lambda p: _edit(p / "config.json", model_type="mixtral"))
    return out


def _edit(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _bad_packages(pk: Path, root: Path) -> dict:
    out = {}

    def variant(name, fn):
        p = shutil.copytree(pk, root / f"pkg_{name}")
        fn(p)
        out[f"pkg_{name}"] = p

    m = pk / "expert.json"
    variant("files_empty", lambda p: _edit(p / "expert.json", files={}))
    variant("not_json", lambda p: (p / "expert.json").write_text("{"))
    variant(
        "latin1", lambda p: (p / "expert.json").write_bytes(m.read_bytes().replace(b'"code"', b'"c\xf6de"'))
    )
    variant("array", lambda p: (p / "expert.json").write_text("[]"))
    variant("future", lambda p: _edit(p / "expert.json", schema_version=7))
    variant("escape_name", lambda p: _edit(p / "expert.json", name="\x1b]0;pwned\x07"))
    variant("tensors_str", lambda p: _edit(p / "expert.json", tensors="all"))
    variant(
        "truncated", lambda p: (p / "expert.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    )
    variant("no_manifest", lambda p: (p / "expert.json").unlink())
    variant("extra_pickle", lambda p: (p / "extra.pt").write_bytes(b"\x80\x04."))
    return out


TRAIN = [
    "expert",
    "train",
    "--anchor",
    "{A}",
    "--name",
    "x",
    "--out",
    "{O}",
    "--router-init",
    "hidden",
    "--seq-len",
    "64",
]
DATA = ["--data", "{D}/train.txt"]

# (id, argv, message regex). {O} is a fresh output path that must not exist afterwards.
CASES = [
    # numbers out of range or not finite
    ("train-steps-0", TRAIN + DATA + ["--steps", "0"], r"--steps 0 is out of range"),
    ("train-steps-neg", TRAIN + DATA + ["--steps", "-1"], r"--steps -1 is out of range"),
    ("train-lr-nan", TRAIN + DATA + ["--lr", "nan"], r"--lr nan is out of range"),
    ("train-lr-inf", TRAIN + DATA + ["--lr", "inf"], r"--lr inf is out of range"),
    ("train-lr-neg", TRAIN + DATA + ["--lr", "-0.1"], r"--lr -0.1 is out of range"),
    ("train-batch-0", TRAIN + DATA + ["--batch-size", "0"], r"--batch-size 0"),
    ("train-seq-0", TRAIN + DATA + ["--seq-len", "0"], r"--seq-len 0"),
    ("train-bias-pos", TRAIN + DATA + ["--bias-init", "0.5"], r"--bias-init 0.5"),
    ("train-mix-1", TRAIN + DATA + ["--public-mix", "1.5"], r"--public-mix 1.5"),
    ("train-eps-0", TRAIN + DATA + ["--dp-epsilon", "0"], r"--dp-epsilon 0"),
    ("train-eps-nan", TRAIN + DATA + ["--dp-epsilon", "nan"], r"--dp-epsilon nan"),
    ("train-delta-1", TRAIN + DATA + ["--dp-epsilon", "8", "--dp-delta", "1"], r"--dp-delta 1"),
    ("train-seed-neg", TRAIN + DATA + ["--seed", "-3"], r"--seed -3"),
    ("train-steps-text", TRAIN + DATA + ["--steps", "many"], r"Invalid value|not a valid integer"),
    (
        "anchor-steps-0",
        ["anchor", "train", "--data", "{D}/good.txt", "--out", "{O}", "--steps", "0"],
        r"--steps 0",
    ),
    (
        "anchor-vocab-0",
        ["anchor", "train", "--data", "{D}/good.txt", "--out", "{O}", "--vocab-size", "0"],
        "vocab",
    ),
    (
        "generate-max-new-0",
        ["generate", "{M}", "--prompt", "x", "--max-new-tokens", "0"],
        r"--max-new-tokens 0",
    ),
    ("generate-temp-nan", ["generate", "{M}", "--prompt", "x", "--temperature", "nan"], r"--temperature nan"),
    (
        "compose-topk-0",
        ["compose", "--anchor", "{A}", "--expert", "{P}", "--out", "{O}", "--top-k", "0"],
        "top-k",
    ),
    (
        "router-steps-0",
        ["router", "train", "{M}", "--public", "{D}/good.txt", "--out", "{O}", "--steps", "0"],
        "steps",
    ),
    (
        "router-lr-nan",
        ["router", "train", "{M}", "--public", "{D}/good.txt", "--out", "{O}", "--lr", "nan"],
        "--lr",
    ),
    (
        "router-share-1",
        ["router", "train", "{M}", "--public", "{D}", "--out", "{O}", "--proxy-share", "1"],
        "share",
    ),
    ("eval-blocks-0", ["eval", "{M}", "--data", "{D}", "--max-blocks", "0"], r"--max-blocks 0"),
    ("data-size-0", ["data", "demo", "--out", "{O}", "--size-mb", "0"], r"--size-mb 0"),
    ("data-size-nan", ["data", "demo", "--out", "{O}", "--size-mb", "nan"], r"--size-mb nan"),
    (
        "proxy-fraction-0",
        [
            "expert",
            "proxy",
            "--private",
            "{D}/good.txt",
            "--public",
            "{D}/good.txt",
            "--out",
            "{O}",
            "--fraction",
            "0",
        ],
        r"--fraction 0",
    ),  # fmt: skip
    (
        "extraction-threshold",
        ["audit", "extraction", "{M}", "--data", "{D}/good.txt", "--threshold", "2"],
        "thresh",
    ),
    (
        "membership-tokens-0",
        [
            "audit",
            "membership",
            "{M}",
            "--members",
            "{D}/good.txt",
            "--non-members",
            "{D}/good.txt",
            "--max-tokens",
            "0",
        ],
        r"--max-tokens 0",
    ),  # fmt: skip
    (
        "exposure-candidates-0",
        ["audit", "exposure", "{M}", "--canaries", "{D}/x.json", "--candidates", "0"],
        "cand",
    ),
    (
        "canaries-steps-0",
        [
            "audit",
            "canaries",
            "--anchor",
            "{A}",
            "--data",
            "{D}/good.txt",
            "--workdir",
            "{O}",
            "--steps",
            "0",
        ],
        r"--steps 0",
    ),  # fmt: skip
    (
        "router-init-n-docs-0",
        ["anchor", "router-init", "{A}", "--public", "{D}/good.txt", "--n-docs", "0"],
        "n-docs",
    ),
    # names and texts reaching a terminal
    ("name-escape", TRAIN[:4] + ["--name", "a\x1b[31mred", "--out", "{O}"] + DATA, r"control character"),
    ("name-empty", TRAIN[:4] + ["--name", "", "--out", "{O}"] + DATA, r"not valid"),
    ("name-path", TRAIN[:4] + ["--name", "../etc", "--out", "{O}"] + DATA, r"not valid"),
    ("name-long", TRAIN[:4] + ["--name", "x" * 65, "--out", "{O}"] + DATA, r"not valid"),
    ("description-escape", TRAIN + DATA + ["--description", "ok\x1b[2J"], r"control character"),
    # text files that are not UTF-8 text, too large, corrupt, pickle
    ("txt-binary", TRAIN + ["--data", "{D}/binary.txt"], r"binary\.txt is not (UTF-8 )?text.*byte offset"),
    ("txt-latin1", TRAIN + ["--data", "{D}/latin1.txt"], r"latin1\.txt is not UTF-8 text.*byte offset 3"),
    ("txt-utf16", TRAIN + ["--data", "{D}/utf16.txt"], r"utf16\.txt is not (UTF-8 )?text"),
    (
        "jsonl-latin1",
        TRAIN + ["--data", "{D}/latin1.jsonl"],
        r"latin1\.jsonl is not UTF-8 text.*byte offset 2",
    ),
    (
        "parquet-corrupt",
        TRAIN + ["--data", "{D}/corrupt.parquet"],
        r"corrupt\.parquet is not a readable Parquet",
    ),
    (
        "parquet-truncated",
        TRAIN + ["--data", "{D}/truncated.parquet"],
        r"truncated\.parquet is not a readable",
    ),
    ("txt-huge-line", TRAIN + ["--data", "{D}/huge.txt"], r"huge\.txt: line 1 .* longer than 8 MiB"),
    ("data-missing", TRAIN + ["--data", "{D}/nope.txt"], r"does not exist"),
    ("data-empty-dir", TRAIN + ["--data", "{D}/empty"], r"No usable text"),
    ("data-pickle", TRAIN + ["--data", "{D}/model.pkl"], r"pickle"),
    ("anchor-data-latin1", ["anchor", "train", "--data", "{D}/latin1.txt", "--out", "{O}"], r"not UTF-8"),
    ("public-binary", TRAIN + DATA + ["--public", "{D}/binary.txt"], r"binary\.txt is not"),
    (
        "proxy-latin1",
        ["expert", "proxy", "--private", "{D}/latin1.txt", "--public", "{D}/good.txt", "--out", "{O}"],
        r"not UTF-8",
    ),  # fmt: skip
    (
        "membership-utf16",
        ["audit", "membership", "{M}", "--members", "{D}/utf16.txt", "--non-members", "{D}/good.txt"],
        r"utf16\.txt is not",
    ),  # fmt: skip
    # corrupt or foreign anchors
    *[
        (f"{cmd}-{v}", argv, msg)
        for v, msg in [
            ("anchor_truncated", r"corrupt or truncated"),
            ("anchor_garbage", r"corrupt or truncated"),
            ("anchor_header_only", r"corrupt or truncated"),
            ("anchor_empty_weights", r"corrupt or truncated"),
            ("anchor_bad_config", r"config\.json (is unreadable|is not valid JSON)"),
            ("anchor_config_array", r"config\.json"),
            ("anchor_no_config", r"no config\.json|config\.json does not exist"),
            ("anchor_pickle", r"pickle"),
            ("anchor_missing_shard", r"missing"),
            ("anchor_moe_type", r"mixture-of-experts|Unsupported"),
        ]
        for cmd, argv in [
            ("inspect", ["anchor", "inspect", "{" + v + "}"]),
            (
                "train",
                [
                    "expert",
                    "train",
                    "--anchor",
                    "{" + v + "}",
                    "--name",
                    "x",
                    "--out",
                    "{O}",
                    "--seq-len",
                    "64",
                ]
                + DATA,
            ),
            (
                "compose",
                ["compose", "--anchor", "{" + v + "}", "--expert", "{P}", "--out", "{O}", "--allow-unsigned"],
            ),
        ]
    ],
    (
        "train-anchor_bad_tokenizer",
        TRAIN[:2]
        + ["--anchor", "{anchor_bad_tokenizer}", "--name", "x", "--out", "{O}", "--seq-len", "64"]
        + DATA,
        r"tokenizer",
    ),  # fmt: skip
    ("anchor-missing-dir", ["anchor", "inspect", "/nonexistent/anchor"], r"not a directory"),
    # crafted or broken packages
    *[
        (f"{cmd}-{v}", argv, msg)
        for v, msg in [
            ("pkg_files_empty", r"files"),
            ("pkg_not_json", r"not valid JSON"),
            ("pkg_latin1", r"UTF-8"),
            ("pkg_array", r"not a JSON object"),
            ("pkg_future", r"schema version 7"),
            ("pkg_escape_name", r"control character"),
            ("pkg_tensors_str", r"malformed"),
            ("pkg_truncated", r"SHA-256|truncated"),
            ("pkg_no_manifest", r"not an expert package"),
            ("pkg_extra_pickle", r"not listed"),
        ]
        for cmd, argv in [
            ("inspect", ["expert", "inspect", "{" + v + "}"]),
            (
                "compose",
                ["compose", "--anchor", "{A}", "--expert", "{" + v + "}", "--out", "{O}", "--allow-unsigned"],
            ),
            ("add", ["add", "{M}", "--expert", "{" + v + "}", "--out", "{O}", "--allow-unsigned"]),
        ]
    ],
    ("compose-unsigned", ["compose", "--anchor", "{A}", "--expert", "{P}", "--out", "{O}"], r"not signed"),
    ("sign-missing-key", ["expert", "sign", "{P}", "--key", "{D}/nokey"], r"does not exist"),
    ("sign-bad-key", ["expert", "sign", "{P}", "--key", "{D}/good.txt"], r"not an unencrypted PEM"),
    (
        "router-bad-sign-key",
        ["router", "train", "{M}", "--public", "{D}/train.txt", "--out", "{O}", "--sign-key", "{D}/good.txt"],
        r"not an unencrypted PEM",
    ),
    ("train-bad-sign-key", TRAIN + DATA + ["--sign-key", "{D}/good.txt"], r"not an unencrypted PEM"),
    (
        "compose-trust-missing",
        ["compose", "--anchor", "{A}", "--expert", "{P}", "--out", "{O}", "--trust", "{D}/empty"],
        r"no public key",
    ),  # fmt: skip
    ("keys-exists", ["keys", "generate", "--out", "{D}/good.txt"], r"already exists"),
    # composed models
    ("remove-unknown", ["remove", "{M}", "--expert", "nobody", "--out", "{O}"], r"No expert named"),
    ("remove-public", ["remove", "{M}", "--expert", "public", "--out", "{O}"], r"cannot be removed"),
    ("remove-last", ["remove", "{M}", "--expert", "code", "--out", "{O}"], r"only owner expert"),
    (
        "update-not-in",
        ["update", "{M}", "--expert", "{pkg_no_manifest}", "--out", "{O}"],
        r"not an expert package",
    ),
    (
        "add-duplicate",
        ["add", "{M}", "--expert", "{P}", "--out", "{O}", "--allow-unsigned"],
        r"already in the model",
    ),
    (
        "add-out-is-input",
        ["add", "{M}", "--expert", "{P}", "--out", "{M}", "--allow-unsigned"],
        r"already exists",
    ),
    ("generate-not-model", ["generate", "{A}", "--prompt", "x"], r"not a flexmoe model"),
    (
        "expert-kl-without-rl",
        [
            "expert",
            "train",
            "--anchor",
            "{A}",
            "--data",
            "{D}/good.txt",
            "--name",
            "x",
            "--out",
            "{O}",
            "--kl",
            "0.1",
        ],
        r"--kl 0.1 is not usable.*--stage rl",
    ),
    (
        "eval-sequence-evidence-alone",
        ["eval", "{M}", "--data", "{D}", "--sequence-evidence", "rows"],
        r"--sequence-evidence rows without --sequence-routing.*add --sequence-routing",
    ),
    (
        "route-sequence-evidence-unknown",
        ["route", "{M}", "--text", "x", "--sequence-routing", "--sequence-evidence", "vibes"],
        r"Unknown sequence-routing evidence 'vibes'.*likelihood, rows",
    ),
    (
        "generate-chat-no-template",
        ["generate", "{M}", "--prompt", "x", "--chat"],
        r"no chat template.*--stage sft",
    ),
    # a composed model is verified on every load: unsigned, untrusted or changed is refused
    (
        "generate-unsigned",
        ["generate", "{MU}", "--prompt", "x"],
        r"model_unsigned is not signed.*--allow-unsigned",
    ),
    ("route-unsigned", ["route", "{MU}", "--text", "x"], r"not signed.*--trust MAINTAINER.pub"),
    ("eval-unsigned", ["eval", "{MU}", "--data", "{D}/good.txt"], r"not signed"),
    ("eval-composition-unsigned", ["eval", "{MU}", "--data", "{D}/splits", "--composition"], r"not signed"),
    (
        "audit-membership-unsigned",
        ["audit", "membership", "{MU}", "--members", "{D}/good.txt", "--non-members", "{D}/good.txt"],
        r"not signed",
    ),
    ("serve-unsigned", ["serve", "{MU}"], r"not signed"),
    (
        "generate-untrusted",
        ["generate", "{M}", "--prompt", "x", "--trust", "{K}/other.pub"],
        r"not among the --trust keys.*maintainer",
    ),
    ("serve-untrusted", ["serve", "{M}", "--trust", "{K}/other.pub"], r"not among the --trust keys"),
    ("generate-tampered", ["generate", "{MT}", "--prompt", "x"], r"does not match the files"),
    (
        "generate-tampered-allowed",
        ["generate", "{MT}", "--prompt", "x", "--allow-unsigned"],
        r"does not match the files",
    ),
    (
        "generate-trust-missing",
        ["generate", "{M}", "--prompt", "x", "--trust", "{D}/empty"],
        r"no public key",
    ),
    ("route-not-model", ["route", "{D}", "--text", "x"], r"not a flexmoe model"),
    ("generate-unknown-expert", ["generate", "{M}", "--prompt", "x", "--include", "nobody"], r"nobody"),
    ("eval-no-tasks", ["eval", "{M}", "--data", "{D}/empty"], r"no tasks|No|does not exist"),
    (
        "export-lm-eval-no-tasks",
        ["export-lm-eval", "--data", "{D}/empty", "--out", "{O}"],
        r"no tasks/ folder",
    ),
    (
        "router-no-proxy-data",
        ["router", "train", "{M}", "--public", "{D}/binary.txt", "--out", "{O}"],
        r"binary",
    ),
    ("demo-bad-preset", ["demo", "--workdir", "{O}", "--preset", "huge"], r"Unknown demo preset"),
    # outputs that exist or cannot be written
    (
        "out-exists",
        ["compose", "--anchor", "{A}", "--expert", "{P}", "--out", "{M}", "--allow-unsigned"],
        r"exists",
    ),
    ("out-parent-file", TRAIN[:6] + ["--out", "{root}/ro/pkg"] + DATA, r"parent"),
    (
        "compose-out-parent-file",
        ["compose", "--anchor", "{A}", "--expert", "{P}", "--out", "{root}/ro/m", "--allow-unsigned"],
        r"parent",
    ),  # fmt: skip
    ("resume-finished", TRAIN[:6] + ["--out", "{P}", "--resume"] + DATA, r"already finished"),
    ("data-demo-out-file", ["data", "demo", "--out", "{root}/ro/x"], r"parent"),
]


def _fill(argv: list[str], env: dict, out: Path) -> list[str]:
    values = {k: str(v) for k, v in env.items()} | {"O": str(out)}
    return [re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], a) for a in argv]


@pytest.mark.parametrize("case,argv,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly(env, tmp_path, case, argv, message):
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, _fill(argv, env, out))
    err = result.exception
    text = result.output + (str(err) if err is not None and not isinstance(err, SystemExit) else "")
    assert result.exit_code in (1, 2), (result.exit_code, text)
    # Clean means a FlexmoeError (main() prints it on one line), an OSError that main() also prints on
    # one line, or a usage error from the parser: never any other exception (a traceback).
    assert err is None or isinstance(err, FlexmoeError | SystemExit), repr(err)
    assert re.search(message, text, re.S), text
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before
    assert not [p for p in env["root"].rglob(".*") if re.search(r"\.(tmp-|lock$|work$)", p.name)]


def test_console_script_prints_one_line_without_traceback(env, tmp_path):
    """The real entry point: exit code 1, one 'error:' line, no traceback, no escape reaches stderr."""
    argv = _fill(["expert", "inspect", "{pkg_escape_name}"], env, tmp_path / "o")
    r = subprocess.run(
        [sys.executable, "-m", "flexmoe", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and "\x1b]" not in r.stderr
    assert r.stderr.startswith("error:") and "control character" in r.stderr


def test_txt_documents_split_on_blank_lines_and_summary_says_so(env):
    from flexmoe.data import describe_read, read_documents

    summary: dict = {}
    docs = read_documents([env["D"] / "good.txt"], summary)
    assert docs == ["first document\nstill first", "second document"]
    assert "2 documents (blank-line separated)" in describe_read(summary)


def test_lm_eval_export_writes_task_configs(demo_data, tmp_path):
    import yaml

    from flexmoe.evaluate.harness import export_lm_eval
    from flexmoe.evaluate.tasks import load_tasks

    names = export_lm_eval(demo_data, tmp_path / "lm")
    tasks = load_tasks(demo_data)
    assert names == [f"flexmoe_{t}" for t in tasks]
    for t, items in tasks.items():
        cfg = yaml.safe_load((tmp_path / "lm" / f"flexmoe_{t}.yaml").read_text())
        rows = [
            json.loads(x) for x in Path(cfg["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()
        ]
        assert len(rows) == len(items) and cfg["task"] == f"flexmoe_{t}"
        kind = "multiple_choice" if "choices" in items[0] else "generate_until"
        assert cfg["output_type"] == kind
    group = yaml.safe_load((tmp_path / "lm" / "flexmoe_demo.yaml").read_text())
    assert group["task"] == names
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tmp_path / "lm"))
    assert set(names) <= set(tm.all_tasks)
