"""Owner side: anchored expert training, the package, resume, distributed equivalence, bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_anchor_dir
from safetensors.torch import load_file
from typer.testing import CliRunner

from flexmoe.cli import app
from flexmoe.data import read_documents
from flexmoe.errors import FlexmoeError
from flexmoe.expert.package import MANIFEST, TENSOR_FILE, package_bytes, verify
from flexmoe.expert.train import PUBLIC_MIX, ExpertSpec, train_expert

STEPS = 30


@pytest.fixture(scope="module")
def code_expert(tiny_anchor, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "code"
    manifest = train_expert(tiny_anchor, [demo_data / "code"], "code", out, steps=STEPS, quiet=True)
    return out, manifest


def test_expert_beats_anchor_on_its_domain(code_expert):
    _, m = code_expert
    assert m["valid_loss"]["expert"] < m["valid_loss"]["anchor"] - 0.1


def test_package_holds_only_the_expert(code_expert, tiny_anchor):
    out, m = code_expert
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, TENSOR_FILE]  # no pickle, no data
    t = load_file(str(out / TENSOR_FILE))
    cfg = json.loads((tiny_anchor / "config.json").read_text())
    L, H, I = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]
    assert len(t) == 6 * L
    assert t["layers.0.gate_proj.weight"].shape == (I, H) and t["layers.0.down_proj.weight"].shape == (H, I)
    assert t["layers.0.router.weight"].shape == (H,)
    assert all(float(t[f"layers.{i}.router.bias"]) <= 0 for i in range(L))
    assert package_bytes(out) < (tiny_anchor / "model.safetensors").stat().st_size
    for key in (
        "name",
        "description",
        "contact",
        "license",
        "anchor",
        "router_init",
        "training",
        "tokens_seen",
        "files",
        "data",
        "created",
        "flexmoe_version",
        "dp",
    ):
        assert key in m, key
    assert m["anchor"]["fingerprint"].startswith("sha256:") and m["tokens_seen"] == STEPS * 8 * 256
    assert len(m["data"]["fingerprint"]) == 64


def test_manifest_records_the_settings_and_the_best_step(code_expert):
    _, m = code_expert
    st = m["settings"]
    assert st["preset"] == "tiny" and st["steps"] == STEPS and st["early_stop"] == 3 and st["dp"] is None
    assert m["training"]["early_stop"] == 3 and m["training"]["eval_every"] == STEPS // 10
    valid = [h for h in m["history"] if "valid_loss" in h]
    assert len(valid) == 10 or m["stopped_early"]
    best = min(valid, key=lambda h: h["valid_loss"])
    assert m["best_step"] == best["step"]
    # Early stopping ends the run once 3 validations in a row are no better than the best.
    assert m["stopped_early"] == (valid[-1]["step"] < STEPS)


def test_inspect_cli_verifies(code_expert):
    r = CliRunner().invoke(app, ["expert", "inspect", str(code_expert[0])])
    assert r.exit_code == 0, r.output
    assert "hashes verified: OK" in r.output and "code" in r.output


def test_tampered_or_truncated_package_is_refused(code_expert, tmp_path):
    out = tmp_path / "pkg"
    shutil.copytree(code_expert[0], out)
    data = bytearray((out / TENSOR_FILE).read_bytes())
    data[-10] ^= 0xFF
    (out / TENSOR_FILE).write_bytes(bytes(data))
    with pytest.raises(FlexmoeError, match="tampered or truncated"):
        verify(out)
    (out / TENSOR_FILE).write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(FlexmoeError, match="tampered or truncated"):
        verify(out)
    (out / TENSOR_FILE).unlink()
    with pytest.raises(FlexmoeError, match="missing"):
        verify(out)
    r = CliRunner().invoke(app, ["expert", "inspect", str(out)])
    assert r.exit_code != 0


def test_public_mix_fraction():
    from flexmoe.expert.train import mixed_public_blocks

    pub = torch.arange(12).view(6, 2)
    mixed = mixed_public_blocks(pub, n_own=14, fraction=0.3)  # 6 public of 20 in all
    assert mixed.shape == (6, 2) and torch.equal(mixed, pub)
    assert len(mixed_public_blocks(pub, n_own=10, fraction=0.5)) == 10  # repeated when short


def test_fsdp_on_one_process_resumes_to_the_plain_result(tiny_anchor, demo_data, tmp_path):
    """FSDP2 with one rank (the single-GPU path) checkpoints sharded state and resumes exactly."""
    import torch.distributed as dist

    kw = dict(steps=6, quiet=True, spec=ExpertSpec(name="m", router_init="hidden"), seq_len=64)
    try:
        train_expert(tiny_anchor, [demo_data / "math"], "m", tmp_path / "plain", **kw)
        part = train_expert(
            tiny_anchor, [demo_data / "math"], "m", tmp_path / "fsdp", stop_after=3, fsdp=True, **kw
        )
        assert part == {"finished": False}
        m = train_expert(
            tiny_anchor, [demo_data / "math"], "m", tmp_path / "fsdp", resume=True, fsdp=True, **kw
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert m["training"]["fsdp"] is True
    a = load_file(str(tmp_path / "plain" / TENSOR_FILE))
    b = load_file(str(tmp_path / "fsdp" / TENSOR_FILE))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_resume_gives_the_same_expert(tiny_anchor, demo_data, tmp_path):
    kw = dict(
        steps=8, quiet=True, spec=ExpertSpec(name="m", router_init="hidden"), public=[demo_data / "public"]
    )
    train_expert(tiny_anchor, [demo_data / "math"], "m", tmp_path / "full", **kw)
    first = train_expert(tiny_anchor, [demo_data / "math"], "m", tmp_path / "res", stop_after=3, **kw)
    assert first == {"finished": False} and not (tmp_path / "res").exists()
    m = train_expert(tiny_anchor, [demo_data / "math"], "m", tmp_path / "res", resume=True, **kw)
    assert m["data"]["public_mix"]["fraction"] == PUBLIC_MIX and m["data"]["public_mix"]["blocks"] > 0
    a = load_file(str(tmp_path / "full" / TENSOR_FILE))
    b = load_file(str(tmp_path / "res" / TENSOR_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "extra,port", [([], 29517), (["--fsdp", "--activation-checkpointing"], 29518)], ids=["ddp", "fsdp2"]
)
def test_two_gloo_processes_match_one(tiny_anchor, demo_data, tmp_path, extra, port):
    """Data parallelism (DDP, or FSDP2 shards with activation checkpointing) changes nothing but speed."""
    args = [
        "expert",
        "train",
        "--anchor",
        str(tiny_anchor),
        "--data",
        str(demo_data / "legal"),
        "--name",
        "lg",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--router-init",
        "hidden",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "flexmoe", *args, "--out", str(tmp_path / "one")], check=True, env=env
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(port),
            "-m",
            "flexmoe",
            *args,
            *extra,
            "--out",
            str(tmp_path / "two"),
        ],
        check=True,
        env=env,
    )
    a = load_file(str(tmp_path / "one" / TENSOR_FILE))
    b = load_file(str(tmp_path / "two" / TENSOR_FILE))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    ref = train_expert  # and the per-step loss curves agree too
    ma, mb = (json.loads((tmp_path / d / MANIFEST).read_text()) for d in ("one", "two"))
    assert ref and ma["valid_loss"]["expert"] == pytest.approx(mb["valid_loss"]["expert"], abs=1e-4)


@pytest.mark.parametrize("model_type", ["olmo2", "llama", "mistral", "qwen2"])
def test_every_supported_family_trains(model_type, demo_data, tmp_path):
    docs = read_documents([demo_data / "public" / "train.jsonl"])[:80]
    anchor = make_anchor_dir(tmp_path / "anchor", model_type, docs)
    m = train_expert(
        anchor,
        [demo_data / "code"],
        "c",
        tmp_path / "exp",
        steps=4,
        seq_len=64,
        quiet=True,
        spec=ExpertSpec(name="c", router_init="hidden"),
    )
    assert m["finished"] and m["anchor"]["model_type"] == model_type
    assert m["valid_loss"]["expert"] < m["valid_loss"]["anchor"]
    verify(tmp_path / "exp")


def test_frozen_tensor_change_is_caught(tiny_anchor, demo_data, tmp_path, monkeypatch):
    import flexmoe.expert.train as expert_train

    real = expert_train.project_biases_

    def corrupt(model):
        real(model)
        with torch.no_grad():
            model.model.norm.weight.add_(1e-3)  # a frozen tensor

    # patched where the training stage looks it up (its after-step hook, called every step)
    monkeypatch.setattr(expert_train, "project_biases_", corrupt)
    with pytest.raises(FlexmoeError, match="Frozen anchor tensors changed"):
        train_expert(
            tiny_anchor,
            [demo_data / "math"],
            "m",
            tmp_path / "x",
            steps=2,
            quiet=True,
            spec=ExpertSpec(name="m", router_init="random"),
        )
    assert not (tmp_path / "x").exists()


def test_bad_inputs(tiny_anchor, demo_data, tmp_path):
    with pytest.raises(FlexmoeError, match="exceeds the anchor's limit"):
        train_expert(tiny_anchor, [demo_data / "code"], "c", tmp_path / "a", seq_len=100_000, quiet=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.jsonl").write_text('{"text": "   "}\n')
    with pytest.raises(FlexmoeError, match="No usable text"):
        train_expert(tiny_anchor, [tmp_path / "empty"], "c", tmp_path / "b", quiet=True)
    with pytest.raises(FlexmoeError, match="not valid"):
        train_expert(tiny_anchor, [demo_data / "code"], "bad name!", tmp_path / "c", quiet=True)
    with pytest.raises(FlexmoeError, match="Unknown router init"):
        train_expert(
            tiny_anchor,
            [demo_data / "code"],
            "c",
            tmp_path / "d",
            steps=1,
            quiet=True,
            spec=ExpertSpec(name="c", router_init="magic"),
        )
    existing = tmp_path / "prev"
    existing.mkdir()
    (existing / "expert.json").write_text("{}")
    with pytest.raises(FlexmoeError, match="already exists"):
        train_expert(tiny_anchor, [demo_data / "code"], "c", existing, quiet=True)
    assert (existing / "expert.json").read_text() == "{}"


def test_moe_anchor_is_refused(tmp_path):
    from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

    cfg = FlexOlmoConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_experts=2,
        num_experts_per_tok=1,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    FlexOlmoForCausalLM(cfg).save_pretrained(str(tmp_path / "moe"))
    with pytest.raises(FlexmoeError, match="not a dense decoder"):
        train_expert(tmp_path / "moe", [tmp_path], "c", tmp_path / "out", quiet=True)
