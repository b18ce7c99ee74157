"""Router: proxy selection (owner side), router-only training and data-free calibration (maintainer)."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from flexmoe.cli import app
from flexmoe.compose import (
    BIAS_FILE,
    CALIBRATION_FILE,
    FLEXMOE_JSON,
    UNSIGNED_OK,
    ComposeSettings,
    compose,
    remove,
)
from flexmoe.data import read_documents
from flexmoe.errors import FlexmoeError
from flexmoe.expert.package import TENSOR_FILE, verify, write_package
from flexmoe.expert.train import ExpertSpec, train_expert
from flexmoe.router.calibrate import calibrator
from flexmoe.router.proxy import PROXY_DOCS, PROXY_JSON, ProxySettings, load_proxy, select_proxy
from flexmoe.router.train import train_router
from flexmoe.runtime import from_pretrained
from flexmoe.signing import ALLOW_UNSIGNED, SIGNATURE, generate_keys

OWNERS = ("code", "legal")
LEGALISH = re.compile(r"licen[cs]e|warrant|copyright", re.I)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _weights(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".safetensors"}


@pytest.fixture(scope="module")
def packages(tiny_anchor, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("rpkgs")
    for d in OWNERS:
        spec = ExpertSpec(name=d, router_init="hidden")
        train_expert(
            tiny_anchor,
            [demo_data / d],
            d,
            root / d,
            steps=4,
            seq_len=64,  # router training and calibration then run at 64 tokens too
            quiet=True,
            spec=spec,
            public=[demo_data / "public"],
        )
    return root


@pytest.fixture(scope="module")
def proxies(packages, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("proxies")
    for d in OWNERS:
        select_proxy(
            [demo_data / d / "train.jsonl"],
            [demo_data / "public"],
            root / d,
            ProxySettings(fraction=0.1, features="ngram", quiet=True),
            package=packages / d,
        )
    return root


@pytest.fixture(scope="module")
def model(tiny_anchor, packages, tmp_path_factory):
    out = tmp_path_factory.mktemp("rmodels") / "plain"
    compose(tiny_anchor, [packages / d for d in OWNERS], out, provenance=UNSIGNED_OK)
    return out


@pytest.fixture(scope="module")
def rt_model(model, proxies, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rmodels") / "rt"
    train_router(
        model, [proxies / d for d in OWNERS], [demo_data / "public"], out, steps=3, seq_len=64, quiet=True
    )
    return out


# --------------------------------------------------------------------------------------------------
# Owner side: proxy selection


def test_classifier_selects_planted_lookalikes(demo_data, tmp_path):
    from flexmoe.corpora.legal import licence_chunks

    # Contracts and statutes only: the public pool holds licence texts too, so licence chunks of the
    # legal owner have real public lookalikes and are not the planted signal.
    licences = set(licence_chunks())
    legal = [t for t in read_documents([demo_data / "legal" / "train.jsonl"]) if t not in licences]
    private, planted = legal[:29], legal[29:39]
    assert len(planted) == 10
    pool = [json.loads(x) for x in (demo_data / "public" / "train.jsonl").read_text().splitlines()][:300]
    pool += [{"id": f"planted-{i}", "text": t} for i, t in enumerate(planted)]
    _jsonl(tmp_path / "priv" / "a.jsonl", [{"text": t} for t in private])
    _jsonl(tmp_path / "pub" / "train.jsonl", pool)
    r = select_proxy(
        [tmp_path / "priv"],
        [tmp_path / "pub"],
        tmp_path / "proxy",
        ProxySettings(fraction=10 / len(pool), features="ngram", quiet=True),
    )
    rows = [json.loads(x) for x in (tmp_path / "proxy" / PROXY_DOCS).read_text().splitlines()]
    assert r["count"] == len(rows) == 10
    assert sum(x["id"].startswith("planted-") for x in rows) >= 9
    assert r["classifier"]["heldout_accuracy"] > 0.9 and r["public_documents"] == len(pool)
    # Only public documents leave: every selected text is in the public pool, none is private.
    texts = {p["text"] for p in pool}
    assert all(x["text"] in texts for x in rows) and not set(private) & {x["text"] for x in rows}
    assert set(json.loads((tmp_path / "proxy" / PROXY_JSON).read_text())) >= {"count", "method", "classifier"}
    # Deterministic: the same inputs select the same documents.
    select_proxy(
        [tmp_path / "priv"],
        [tmp_path / "pub"],
        tmp_path / "again",
        ProxySettings(fraction=10 / len(pool), features="ngram", quiet=True),
    )
    assert (tmp_path / "again" / PROXY_DOCS).read_bytes() == (tmp_path / "proxy" / PROXY_DOCS).read_bytes()


def test_embedder_features(demo_data, tmp_path):
    from flexmoe.anchor import default_embedder

    if default_embedder() is None:
        pytest.skip("flexmoe[embed] not installed")
    legal = read_documents([demo_data / "legal" / "train.jsonl"])
    # The public corpus carries licence files (legal text, rightly picked as legal proxies): the
    # distractors are the public documents that are not legal text.
    public = [t for t in read_documents([demo_data / "public"]) if not LEGALISH.search(t)]
    pool = [{"id": f"p{i}", "text": t} for i, t in enumerate(public[:40])]
    pool += [{"id": f"planted-{i}", "text": t} for i, t in enumerate(legal[30:34])]
    _jsonl(tmp_path / "pub.jsonl", pool)
    _jsonl(tmp_path / "priv.jsonl", [{"text": t} for t in legal[:24]])
    r = select_proxy(
        [tmp_path / "priv.jsonl"],
        [tmp_path / "pub.jsonl"],
        tmp_path / "p",
        ProxySettings(fraction=4 / 44, quiet=True),
    )
    ids = [json.loads(x)["id"] for x in (tmp_path / "p" / PROXY_DOCS).read_text().splitlines()]
    assert r["method"]["features"] == "embed" and sum(i.startswith("planted-") for i in ids) >= 3


def test_proxy_recorded_in_manifest_keeps_the_package_valid(packages, proxies, tmp_path):
    m = verify(packages / "code")  # hashes still verify after the manifest gained its proxy record
    assert m["proxy"]["count"] == load_proxy(proxies / "code")[0]["count"]
    assert (
        m["proxy"]["sha256"] == json.loads((proxies / "code" / PROXY_JSON).read_text())["files"][PROXY_DOCS]
    )
    assert {"heldout_accuracy", "heldout_balanced_accuracy"} <= set(m["proxy"]["classifier"])
    tampered = tmp_path / "t"
    shutil.copytree(packages / "code", tampered)
    raw = bytearray((tampered / TENSOR_FILE).read_bytes())
    raw[-3] ^= 1
    (tampered / TENSOR_FILE).write_bytes(bytes(raw))
    with pytest.raises(FlexmoeError, match="tampered"):
        select_proxy(
            [tampered],
            [tampered],
            tmp_path / "x",
            ProxySettings(features="ngram", quiet=True),
            package=tampered,
        )
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------
# Maintainer side: router training


def test_router_training_changes_only_router_rows(model, rt_model):
    before, after = _weights(model), _weights(rt_model)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".mlp.gate.weight") for k in changed)
    assert all(torch.equal(before[k][0], after[k][0]) for k in changed)  # the public row stays
    assert (model / BIAS_FILE).read_bytes() == (rt_model / BIAS_FILE).read_bytes()
    meta = json.loads((rt_model / FLEXMOE_JSON).read_text())
    rec = meta["router_training"]
    assert rec["experts"] == ["public", *OWNERS] and [p["name"] for p in rec["proxies"]] == list(OWNERS)
    assert rec["config"]["steps"] == 3 and meta["history"][-1]["op"] == "router-train"


def test_stock_transformers_loads_router_trained_model(rt_model):
    hf = AutoModelForCausalLM.from_pretrained(str(rt_model)).eval()
    ours = from_pretrained(rt_model, trust=ALLOW_UNSIGNED)
    x = torch.randint(0, hf.config.vocab_size, (2, 20))
    torch.testing.assert_close(ours.model(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)


def test_opt_out_after_router_training(rt_model, tmp_path):
    remove(rt_model, "legal", tmp_path / "m")
    old, new = _weights(rt_model), _weights(tmp_path / "m")
    assert not any(".experts.2." in k for k in new)
    for k in (k for k in old if k.endswith("mlp.gate.weight")):
        assert torch.equal(new[k], old[k][:2])  # the remaining trained rows stay as trained
    meta = json.loads((tmp_path / "m" / FLEXMOE_JSON).read_text())
    assert meta["router_training"]["experts"] == ["public", *OWNERS] and meta["history"][-1]["op"] == "remove"


# --------------------------------------------------------------------------------------------------
# Data-free calibration


def test_calibration_is_deterministic_and_recomputed_on_opt_out(
    tiny_anchor, packages, model, demo_data, tmp_path
):
    pub = [demo_data / "public"]
    pk = [packages / d for d in OWNERS]
    compose(
        tiny_anchor, pk, tmp_path / "a", ComposeSettings(calibrate=calibrator(pub)), provenance=UNSIGNED_OK
    )
    compose(
        tiny_anchor, pk, tmp_path / "b", ComposeSettings(calibrate=calibrator(pub)), provenance=UNSIGNED_OK
    )
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    changed = {k for k, v in _weights(model).items() if not torch.equal(v, _weights(tmp_path / "a")[k])}
    assert changed and all(k.endswith(".mlp.gate.weight") for k in changed)
    rec = json.loads((tmp_path / "a" / FLEXMOE_JSON).read_text())["router_calibration"]
    share = rec["anchor_share_on_public"]
    assert all(abs(a - t) < 1e-3 for a, t in zip(share["after"], share["target"], strict=True))
    # Opt-out recalibrates from the trained rows: the same bytes as calibrating the smaller set.
    remove(tmp_path / "a", "legal", tmp_path / "rm", ComposeSettings(calibrate=calibrator(pub)))
    compose(
        tiny_anchor,
        pk[:1],
        tmp_path / "fresh",
        ComposeSettings(calibrate=calibrator(pub)),
        provenance=UNSIGNED_OK,
    )
    assert _bytes(tmp_path / "rm") == _bytes(tmp_path / "fresh")
    # One owner: the composed model is that owner's 2-expert training model, nothing to correct.
    assert rec and all(
        abs(s) < 1e-6
        for s in json.loads((tmp_path / "fresh" / FLEXMOE_JSON).read_text())["router_calibration"][
            "public_row_shift"
        ]
    )
    # Without --calibrate a change of experts returns to the trained rows: exactly a plain compose.
    remove(tmp_path / "a", "legal", tmp_path / "plain_rm")
    compose(tiny_anchor, pk[:1], tmp_path / "plain_fresh", provenance=UNSIGNED_OK)
    assert _bytes(tmp_path / "plain_rm") == _bytes(tmp_path / "plain_fresh")
    assert not (tmp_path / "plain_rm" / CALIBRATION_FILE).exists()
    # Router training starts from the trained rows, not from a calibration of them.
    train_router(tmp_path / "a", [], pub, tmp_path / "rt_a", steps=1, seq_len=64, quiet=True)
    gates = [k for k in _weights(model) if k.endswith("mlp.gate.weight")]
    assert all(torch.equal(_weights(model)[k][0], _weights(tmp_path / "rt_a")[k][0]) for k in gates)
    assert not (tmp_path / "rt_a" / CALIBRATION_FILE).exists()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    x = torch.randint(0, hf.config.vocab_size, (2, 16))
    torch.testing.assert_close(
        from_pretrained(tmp_path / "a", trust=ALLOW_UNSIGNED).model(x).logits,
        hf(x).logits,
        atol=1e-5,
        rtol=1e-5,
    )


def _greedy_package(src, out):
    """An over-eager expert: its row leans towards the public direction (claims public text) and its
    FFN is noise (bad on public text)."""
    t = load_file(str(src / TENSOR_FILE))
    for k in [k for k in t if k.endswith(".router.weight") and "public" not in k]:
        t[k] = t[k] + 2.0 * t[k.replace(".router.", ".public_router.")]
    g = torch.Generator().manual_seed(0)
    for k in [k for k in t if k.endswith("down_proj.weight")]:
        # noise, not a rescaled copy: OLMo 2 normalises the FFN output, so a scale alone would not hurt
        t[k] = torch.randn(t[k].shape, generator=g, dtype=t[k].dtype) * 3.0 * t[k].std()
    m = {k: v for k, v in verify(src).items() if k not in ("files", "tensors")}
    write_package(out, t, {**m, "name": "greedy"})
    return out


def test_calibration_stops_an_over_eager_expert_stealing_public_tokens(
    tiny_anchor, packages, demo_data, tmp_path
):
    from flexmoe.runtime import routing_shares

    greedy = _greedy_package(packages / "code", tmp_path / "greedy")
    pk = [packages / "legal", greedy]
    compose(tiny_anchor, pk, tmp_path / "plain", provenance=UNSIGNED_OK)
    compose(
        tiny_anchor,
        pk,
        tmp_path / "cal",
        ComposeSettings(calibrate=calibrator([demo_data / "public"])),
        provenance=UNSIGNED_OK,
    )
    # Over several held-out public documents: the realistic public pool holds some code, which the
    # code-derived greedy expert may claim on any single document.
    docs = read_documents([demo_data / "public" / "valid.jsonl"])[:8]
    plain, cal = (
        from_pretrained(tmp_path / "plain", trust=ALLOW_UNSIGNED),
        from_pretrained(tmp_path / "cal", trust=ALLOW_UNSIGNED),
    )
    before = {k: sum(routing_shares(plain, t)[k] for t in docs) / len(docs) for k in ("public", "greedy")}
    after = {k: sum(routing_shares(cal, t)[k] for t in docs) / len(docs) for k in ("public", "greedy")}
    assert after["public"] > before["public"] + 0.05 and after["greedy"] < before["greedy"], (before, after)
    # Whether that lowers public loss depends on how much better the anchor's FFN is on public text
    # than the experts' (with this 40-step anchor it is not); the demo and benchmarks measure that.


# --------------------------------------------------------------------------------------------------
# Command line and bad input


def test_cli_smoke(model, packages, demo_data, tmp_path):
    run = CliRunner().invoke
    r = run(
        app,
        [
            "expert",
            "proxy",
            "--private",
            str(demo_data / "code" / "train.jsonl"),
            "--public",
            str(demo_data / "public"),
            "--out",
            str(tmp_path / "px"),
            "--fraction",
            "0.05",
            "--features",
            "ngram",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "held-out accuracy" in r.output
    r = run(
        app,
        [
            "router",
            "train",
            str(model),
            "--proxy",
            str(tmp_path / "px"),
            "--public",
            str(demo_data / "public"),
            "--out",
            str(tmp_path / "rt"),
            "--steps",
            "2",
            "--seq-len",
            "64",
            "--sign-key",
            str(generate_keys(tmp_path / "maintainer")[0]),
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rt" / FLEXMOE_JSON).is_file() and (tmp_path / "rt" / SIGNATURE).is_file()
    assert from_pretrained(tmp_path / "rt").names == ["public", *OWNERS]  # signed: loads with no options
    pub = ["--public", str(demo_data / "public")]
    r = run(
        app,
        [
            "remove",
            str(tmp_path / "rt"),
            "--expert",
            "legal",
            "--out",
            str(tmp_path / "rm"),
            "--calibrate",
            *pub,
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rm" / CALIBRATION_FILE).is_file()
    r = run(
        app,
        [
            "add",
            str(tmp_path / "rm"),
            "--expert",
            str(packages / "legal"),
            "--out",
            str(tmp_path / "add"),
            "--allow-unsigned",  # the test package is unsigned; the CLI refuses those by default
            "--calibrate",
            *pub,
        ],
    )
    assert r.exit_code == 0, r.output
    r = run(app, ["expert", "inspect", str(packages / "code")])
    assert r.exit_code == 0 and "proxy set:" in r.output


def test_bad_inputs(model, proxies, packages, demo_data, tmp_path):
    run = CliRunner().invoke
    r = run(app, ["compose", "--anchor", "x", "--expert", "y", "--out", str(tmp_path / "o"), "--calibrate"])
    assert r.exit_code == 1 and "--calibrate needs public text" in str(r.exception or r.output)
    with pytest.raises(FlexmoeError, match="--calibrate needs public data"):
        # An empty list is not "no calibration".
        remove(model, "legal", tmp_path / "o", ComposeSettings(calibrate=calibrator([])))
    bad = tmp_path / "bad_proxy"
    shutil.copytree(proxies / "code", bad)
    with open(bad / PROXY_DOCS, "a") as f:
        f.write('{"id": "x", "text": "smuggled"}\n')
    with pytest.raises(FlexmoeError, match="tampered"):
        train_router(model, [bad], [demo_data / "public"], tmp_path / "o", steps=1)
    with pytest.raises(FlexmoeError, match="not a proxy set"):
        train_router(model, [tmp_path], [demo_data / "public"], tmp_path / "o", steps=1)
    with pytest.raises(FlexmoeError, match="input model"):
        train_router(model, [], [demo_data / "public"], model, steps=1)
    with pytest.raises(FlexmoeError, match="fraction"):
        select_proxy(
            [demo_data / "code"], [demo_data / "public"], tmp_path / "o", ProxySettings(fraction=0.0)
        )
    with pytest.raises(FlexmoeError, match="differs from the package"):
        select_proxy(
            [demo_data / "code"],
            [demo_data / "public"],
            tmp_path / "o",
            ProxySettings(features="ngram", quiet=True),
            name="math",
            package=packages / "code",
        )
    assert not (tmp_path / "o").exists()
