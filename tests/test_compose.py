"""Maintainer side: compose, add, update, remove; runtime masks; stock-transformers interoperability."""

import json
import shutil

import pytest
import torch
from conftest import make_anchor_dir
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from flexmoe.cli import app
from flexmoe.compose import (
    BIAS_FILE,
    FLEXMOE_JSON,
    UNSIGNED_OK,
    ComposeSettings,
    add,
    compose,
    default_top_k,
    remove,
    update,
)
from flexmoe.data import read_documents
from flexmoe.errors import FlexmoeError
from flexmoe.expert.train import ExpertSpec, train_expert
from flexmoe.runtime import from_pretrained, generate, routing_shares
from flexmoe.signing import ALLOW_UNSIGNED

DOMAINS = ("code", "math", "legal")


@pytest.fixture(scope="module")
def experts(tiny_anchor, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pkgs")
    for d in DOMAINS:
        train_expert(tiny_anchor, [demo_data / d], d, root / d, steps=6, quiet=True)
    # A second version of "math" (more steps), for update.
    train_expert(tiny_anchor, [demo_data / "math"], "math", root / "math_v2", steps=8, quiet=True)
    return root


@pytest.fixture(scope="module")
def model(tiny_anchor, experts, tmp_path_factory):
    """Composed unsigned (the packages are too): every load here passes ALLOW_UNSIGNED."""
    out = tmp_path_factory.mktemp("models") / "all"
    compose(
        tiny_anchor, [experts / d for d in DOMAINS], out, ComposeSettings(top_k=2), provenance=UNSIGNED_OK
    )
    return out


def _weight_files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.suffix == ".safetensors"}


def test_stock_transformers_loads_with_same_logits(model):
    hf = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    assert type(hf).__name__ == "FlexOlmoForCausalLM"
    assert (
        hf.config.num_experts == 4
        and hf.config.num_experts_per_tok == 2
        and hf.config.norm_topk_prob is False
    )
    ours = from_pretrained(model, trust=ALLOW_UNSIGNED)
    x = torch.randint(0, hf.config.vocab_size, (2, 24))
    torch.testing.assert_close(ours.model(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)


def test_config_copied_from_anchor(model, tiny_anchor):
    a = json.loads((tiny_anchor / "config.json").read_text())
    c = json.loads((model / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "rms_norm_eps", "vocab_size"):
        assert c[key] == a[key]
    assert c["rope_theta"] == c["rope_parameters"]["rope_theta"]
    assert (model / "tokenizer.json").is_file()


def test_flexmoe_json_records_everything(model, tiny_anchor, experts):
    from flexmoe.anchor import fingerprint
    from flexmoe.fileio import sha256_file

    meta = json.loads((model / FLEXMOE_JSON).read_text())
    assert meta["anchor"]["fingerprint"] == fingerprint(tiny_anchor)
    assert [e["name"] for e in meta["experts"]] == ["public", *DOMAINS]
    assert [e["position"] for e in meta["experts"]] == [0, 1, 2, 3]
    assert meta["experts"][1]["manifest"] == json.loads((experts / "code" / "expert.json").read_text())
    assert meta["weights_sha256"] == {"model.safetensors": sha256_file(model / "model.safetensors")}
    assert meta["history"][0]["op"] == "compose"


def test_remove_equals_compose_without(model, tiny_anchor, experts, tmp_path):
    remove(model, "math", tmp_path / "removed")
    compose(
        tiny_anchor,
        [experts / "code", experts / "legal"],
        tmp_path / "fresh",
        ComposeSettings(top_k=2),
        provenance=UNSIGNED_OK,
    )
    assert _weight_files(tmp_path / "removed") == _weight_files(tmp_path / "fresh")
    assert (tmp_path / "removed" / "config.json").read_bytes() == (
        tmp_path / "fresh" / "config.json"
    ).read_bytes()
    meta = json.loads((tmp_path / "removed" / FLEXMOE_JSON).read_text())
    assert meta["history"][-1]["op"] == "remove" and meta["history"][-1]["expert"] == "math"
    assert "math" not in [e["name"] for e in meta["experts"]]


def test_add_and_update_keep_other_experts_identical(model, experts, tiny_anchor, tmp_path):
    remove(model, "legal", tmp_path / "three")
    add(tmp_path / "three", experts / "legal", tmp_path / "four", provenance=UNSIGNED_OK)
    assert _weight_files(tmp_path / "four") == _weight_files(model)  # same set, same order -> same bytes
    update(model, experts / "math_v2", tmp_path / "upd", provenance=UNSIGNED_OK)
    old, new = (
        load_file(str(model / "model.safetensors")),
        load_file(str(tmp_path / "upd" / "model.safetensors")),
    )
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(".experts.2." in k or k.endswith("mlp.gate.weight") for k in changed)
    for k in (k for k in old if k.endswith("mlp.gate.weight")):
        keep = [0, 1, 3]
        assert torch.equal(old[k][keep], new[k][keep])
    meta = json.loads((tmp_path / "upd" / FLEXMOE_JSON).read_text())
    assert meta["experts"][2]["manifest"]["training"]["steps"] == 8


def test_exclude_equals_physical_removal(model, tmp_path):
    remove(model, "code", tmp_path / "nocode")
    masked = from_pretrained(model, exclude=["code"], trust=ALLOW_UNSIGNED)
    removed = from_pretrained(tmp_path / "nocode", trust=ALLOW_UNSIGNED)
    x = torch.randint(0, 1000, (2, 20))
    torch.testing.assert_close(masked.model(x).logits, removed.model(x).logits, atol=1e-5, rtol=1e-5)
    assert generate(masked, "The cat", 12) == generate(removed, "The cat", 12)
    # the GPU default (a static KV cache) decodes the same tokens as the dynamic cache
    assert generate(masked, "The cat", 12, static_cache=True) == generate(removed, "The cat", 12)
    only = from_pretrained(model, include=["math", "legal"], trust=ALLOW_UNSIGNED)
    torch.testing.assert_close(only.model(x).logits, masked.model(x).logits, atol=1e-5, rtol=1e-5)


def test_routing_shares(model):
    shares = routing_shares(
        from_pretrained(model, trust=ALLOW_UNSIGNED), "def add(a, b):\n    return a + b\n"
    )
    assert set(shares) == {"public", *DOMAINS}
    assert sum(shares.values()) == pytest.approx(1.0)
    masked = routing_shares(from_pretrained(model, exclude=["legal"], trust=ALLOW_UNSIGNED), "x = 1")
    assert masked["legal"] == 0.0
    r = CliRunner().invoke(app, ["route", str(model), "--text", "Section 2(a)", "--json", "--allow-unsigned"])
    assert r.exit_code == 0 and set(json.loads(r.output)) == set(shares)


def test_sharded_output_loads_and_matches(model, tiny_anchor, experts, tmp_path):
    compose(
        tiny_anchor,
        [experts / d for d in DOMAINS],
        tmp_path / "sharded",
        ComposeSettings(top_k=2, max_shard_bytes=1 << 20),
        provenance=UNSIGNED_OK,
    )
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all(
        (tmp_path / "sharded" / s).stat().st_size <= (1 << 20) + 200_000 for s in shards
    )
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded")).eval()
    b = AutoModelForCausalLM.from_pretrained(str(model)).eval()
    x = torch.randint(0, 1000, (1, 16))
    assert torch.equal(a(x).logits, b(x).logits)


def test_default_top_k_rule_and_clamp(tiny_anchor, experts, tmp_path):
    assert [default_top_k(e) for e in (2, 3, 4, 5, 8)] == [2, 2, 2, 3, 4]
    # A keyword override of a ComposeSettings field is the same as passing the settings.
    with pytest.warns(UserWarning, match="exceeds"):
        meta = compose(tiny_anchor, [experts / "code"], tmp_path / "k", top_k=9, provenance=UNSIGNED_OK)
    assert meta["top_k"] == 2
    with pytest.raises(FlexmoeError, match="below 1"):
        compose(tiny_anchor, [experts / "code"], tmp_path / "k0", top_k=0, provenance=UNSIGNED_OK)


def test_bias_is_kept_beside_the_hf_weights(model):
    b = load_file(str(model / BIAS_FILE))
    assert all(v.shape == (4,) and v[0] == 0 and (v <= 0).all() for v in b.values())


def test_bad_inputs_leave_everything_untouched(model, tiny_anchor, experts, tmp_path):
    other = tmp_path / "other_anchor"
    shutil.copytree(tiny_anchor, other)
    w = load_file(str(other / "model.safetensors"))
    w["model.norm.weight"] = w["model.norm.weight"] + 1
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FlexmoeError, match="different anchor"):
        compose(other, [experts / "code"], tmp_path / "x", provenance=UNSIGNED_OK)
    tampered = tmp_path / "tampered"
    shutil.copytree(experts / "code", tampered)
    raw = bytearray((tampered / "expert.safetensors").read_bytes())
    raw[-5] ^= 1
    (tampered / "expert.safetensors").write_bytes(bytes(raw))
    with pytest.raises(FlexmoeError, match="tampered"):
        compose(tiny_anchor, [experts / "math", tampered], tmp_path / "x", provenance=UNSIGNED_OK)
    with pytest.raises(FlexmoeError, match="Duplicate"):
        compose(tiny_anchor, [experts / "math", experts / "math_v2"], tmp_path / "x", provenance=UNSIGNED_OK)
    assert not (tmp_path / "x").exists()
    before = _weight_files(model)
    with pytest.raises(FlexmoeError, match="No expert named 'nope'"):
        remove(model, "nope", tmp_path / "y")
    with pytest.raises(FlexmoeError, match="cannot be removed"):
        remove(model, "public", tmp_path / "y")
    with pytest.raises(FlexmoeError, match="already in the model"):
        add(model, experts / "code", tmp_path / "y", provenance=UNSIGNED_OK)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FlexmoeError, match="already exists"):
        remove(model, "code", tmp_path / "exists")
    with pytest.raises(FlexmoeError, match="input model"):
        remove(model, "code", model, force=True)
    assert _weight_files(model) == before and not (tmp_path / "y").exists()
    r = CliRunner().invoke(app, ["remove", str(model), "--expert", "nope", "--out", str(tmp_path / "z")])
    assert r.exit_code == 1


def test_llama_family_composite_loads_with_remote_code(demo_data, tmp_path):
    docs = read_documents([demo_data / "public" / "train.jsonl"])[:80]
    anchor = make_anchor_dir(tmp_path / "anchor", "qwen2", docs)
    spec = ExpertSpec(name="c", router_init="hidden")
    train_expert(
        anchor, [demo_data / "code"], "c", tmp_path / "c", steps=2, seq_len=64, quiet=True, spec=spec
    )
    compose(anchor, [tmp_path / "c"], tmp_path / "m", provenance=UNSIGNED_OK)
    assert (tmp_path / "m" / "modeling_flexmoe.py").is_file()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), trust_remote_code=True).eval()
    ours = from_pretrained(tmp_path / "m", trust=ALLOW_UNSIGNED)
    x = torch.randint(0, 300, (2, 12))
    torch.testing.assert_close(ours.model(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)


def test_export_of_the_runtime_model_gives_its_weights(model, tmp_path):
    from flexmoe.compose import export, load_meta, runtime_job

    meta = load_meta(model, trust=ALLOW_UNSIGNED)
    c = from_pretrained(model, trust=ALLOW_UNSIGNED)
    base = {"anchor": meta["anchor"], "history": meta["history"]}
    names, manifests = [e["name"] for e in meta["experts"]], [e["manifest"] for e in meta["experts"]]
    job = runtime_job(c.model, names, manifests, meta["anchor"]["config"], model, base)
    out = export(job, tmp_path / "exported")
    assert out["top_k"] == meta["top_k"] and [e["name"] for e in out["experts"]] == names
    assert (
        _weight_files(tmp_path / "exported")["model.safetensors"] == _weight_files(model)["model.safetensors"]
    )
