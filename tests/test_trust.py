"""Provenance and integrity: signatures, tampering, formats, locks, resume and permissions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import trustkit
from safetensors.torch import load_file, save_file

from flexmoe.compose import UNSIGNED_OK, Provenance, add, compose, load_meta, remove, update
from flexmoe.errors import FlexmoeError
from flexmoe.expert import package as pkg
from flexmoe.fileio import atomic_dir, output_lock, sha256_file
from flexmoe.formats import migrate_expert_manifest, read_expert_manifest
from flexmoe.signing import ALLOW_UNSIGNED, SIGNATURE, Trust, load_private_key

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def kit(trust_root, tmp_path_factory):
    """Signed packages (code, math, law, math v2) and a signed composed model of code + math."""
    root = tmp_path_factory.mktemp("kit")
    key = load_private_key(trust_root / "keys" / "owner")
    a = trust_root / "anchor"
    p = {n: trustkit.package(a, root / n, n, seed=i, key=key) for i, n in enumerate(["code", "math", "law"])}
    p["math2"] = trustkit.package(a, root / "math2", "math", seed=9, key=key)
    model = root / "model"
    compose(a, [p["code"], p["math"]], model, provenance=Provenance(trust=_trust(trust_root), sign_key=key))
    return {"root": root, "anchor": a, "pkg": p, "model": model, "key": key}


def _trust(trust_root, allow_unsigned=False, who="owner"):
    return Trust.from_paths([trust_root / "keys" / f"{who}.pub"], allow_unsigned=allow_unsigned)


def _rehash(path: Path) -> None:
    """What a tamperer does: recompute the manifest's hash so that the self-check passes."""
    m = json.loads((path / "expert.json").read_text())
    m["files"]["expert.safetensors"] = sha256_file(path / "expert.safetensors")
    (path / "expert.json").write_text(json.dumps(m))


def _edit_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "expert.json").read_text())
    m.update(changes)
    (path / "expert.json").write_text(json.dumps(m))


def _edit_tensor(path: Path, name: str, fn) -> None:
    t = load_file(str(path / "expert.safetensors"))
    t[name] = fn(t[name])
    save_file(t, str(path / "expert.safetensors"), metadata={"format": "pt"})


# Each tamper: (id, how to change a copy of a signed package, message expected when composing).
TAMPER = [
    ("renamed", lambda p: _edit_manifest(p, name="legal"), "signature"),
    (
        "tensor-changed-hash-recomputed",
        lambda p: (_edit_tensor(p, "layers.0.up_proj.weight", lambda t: t + 1), _rehash(p)),
        "signature",
    ),
    (
        "foreign-anchor-fingerprint-edited",
        lambda p: _edit_manifest(p, anchor={"fingerprint": "sha256:" + "1" * 64}),
        "signature|different anchor",
    ),
    ("files-empty", lambda p: _edit_manifest(p, files={}), "files"),
    ("unlisted-file", lambda p: (p / "pytorch_model.bin").write_bytes(b"pickle"), "not listed"),
    ("signature-removed", lambda p: (p / SIGNATURE).unlink(), "not signed"),
    (
        "signature-garbled",
        lambda p: (p / SIGNATURE).write_text(json.dumps({"public_key": "x", "signature": "y"})),
        "malformed",
    ),
    ("truncated", lambda p: (p / "expert.safetensors").write_bytes(b"\x00" * 10), "SHA-256|truncated"),
]


@pytest.mark.parametrize("case,tamper,message", TAMPER, ids=[t[0] for t in TAMPER])
def test_tampered_package_is_refused(kit, trust_root, tmp_path, case, tamper, message):
    bad = trustkit.copy(kit["pkg"]["math"], tmp_path / "bad")
    tamper(bad)
    with pytest.raises(FlexmoeError, match=message):
        compose(
            kit["anchor"],
            [kit["pkg"]["code"], bad],
            tmp_path / "out",
            provenance=Provenance(_trust(trust_root)),
        )
    assert not (tmp_path / "out").exists()


# Tampering that an unsigned package cannot hide either (the checks beyond signatures).
def _nan(p):
    _edit_tensor(p, "layers.1.down_proj.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))
    _rehash(p)


def _inf(p):
    _edit_tensor(p, "layers.0.router.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("inf")))
    _rehash(p)


def _foreign_row(p):
    """A package trained against another anchor (its own published public row), fingerprint edited."""
    for i in range(2):
        _edit_tensor(p, f"layers.{i}.public_router.weight", lambda t: torch.randn_like(t))
    _rehash(p)


UNSIGNED = [
    ("foreign-anchor-fingerprint-edited", _foreign_row, "not one this anchor published"),
    ("nan-weights", _nan, "NaN or infinite"),
    ("inf-weights", _inf, "NaN or infinite"),
    ("files-empty", lambda p: _edit_manifest(p, files={}), "files"),
    ("future-schema", lambda p: _edit_manifest(p, schema_version=99), "schema version 99"),
    ("manifest-not-object", lambda p: (p / "expert.json").write_text("[1, 2]"), "not a JSON object"),
    ("manifest-not-json", lambda p: (p / "expert.json").write_text("{oops"), "not valid JSON"),
    (
        "manifest-latin1",
        lambda p: (p / "expert.json").write_bytes('{"name": "caf\xe9"}'.encode("latin-1")),
        "UTF-8",
    ),
    (
        "shape-wrong-type",
        lambda p: _edit_manifest(p, tensors={"a": {"shape": "big", "dtype": 1}}),
        "malformed",
    ),
    ("name-escape", lambda p: _edit_manifest(p, name="evil\x1b[2J"), "control character"),
    ("name-missing", lambda p: _edit_manifest(p, name=None), "malformed"),
    ("fingerprint-not-hash", lambda p: _edit_manifest(p, anchor={"fingerprint": "x"}), "malformed"),
]


@pytest.mark.parametrize("case,tamper,message", UNSIGNED, ids=[t[0] for t in UNSIGNED])
def test_checks_beyond_signatures(kit, trust_root, tmp_path, case, tamper, message):
    bad = trustkit.copy(kit["pkg"]["math"], tmp_path / "bad")
    (bad / SIGNATURE).unlink()
    tamper(bad)
    prov = Provenance(_trust(trust_root, allow_unsigned=True))
    with pytest.raises(FlexmoeError, match=message):
        compose(kit["anchor"], [kit["pkg"]["code"], bad], tmp_path / "out", provenance=prov)
    assert not (tmp_path / "out").exists()


def test_forged_dp_record_is_refused_and_true_one_accepted(trust_root, tmp_path):
    pytest.importorskip("opacus")
    from flexmoe.expert.privacy import epsilon_after

    eps = epsilon_after("rdp", 1.1, 0.01, 100, 1e-5)
    dp = {"epsilon": eps, "target_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp",
          "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 100}  # fmt: skip
    good = trustkit.package(trust_root / "anchor", tmp_path / "good", "dp", dp=dp)
    assert pkg.verify(good)["dp"]["epsilon"] == eps
    for forged in ({**dp, "epsilon": eps / 4}, {**dp, "noise_multiplier": 5.0}, {**dp, "steps": 10}):
        bad = trustkit.package(
            trust_root / "anchor", tmp_path / f"bad{len(list(tmp_path.iterdir()))}", "dp", dp=forged
        )
        with pytest.raises(FlexmoeError, match="accountant gives"):
            pkg.verify(bad)


def test_untrusted_signer_and_unsigned_are_refused_unless_allowed(kit, trust_root, tmp_path):
    other = load_private_key(trust_root / "keys" / "other")
    stranger = trustkit.package(kit["anchor"], tmp_path / "s", "law", key=other)
    with pytest.raises(FlexmoeError, match="not among the --trust keys"):
        compose(kit["anchor"], [stranger], tmp_path / "o1", provenance=Provenance(_trust(trust_root)))
    unsigned = trustkit.package(kit["anchor"], tmp_path / "u", "law")
    with pytest.raises(FlexmoeError, match="not signed"):
        compose(kit["anchor"], [unsigned], tmp_path / "o2", provenance=Provenance(Trust()))
    m = compose(kit["anchor"], [unsigned], tmp_path / "o3", provenance=Provenance(Trust(allow_unsigned=True)))
    assert m["experts"][1]["signer"] is None
    # The Python API refuses unsigned packages by default, as the CLI does; the error names the opt-in.
    with pytest.raises(FlexmoeError, match="UNSIGNED_OK"):
        compose(kit["anchor"], [unsigned], tmp_path / "o4")
    with pytest.raises(FlexmoeError, match="not signed"):
        add(kit["model"], unsigned, tmp_path / "o5")
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()
    # A signed package needs no opt-in (any valid signature, trust on first use).
    assert compose(kit["anchor"], [kit["pkg"]["code"]], tmp_path / "o6")["experts"][1]["signer"]


def test_signed_model_records_signers_and_detects_tampering(kit, tmp_path):
    meta = load_meta(kit["model"])
    assert meta["schema_version"] == 1 and {e["signer"] for e in meta["experts"][1:]} != {None}
    bad = trustkit.copy(kit["model"], tmp_path / "m")
    m = json.loads((bad / "flexmoe.json").read_text())
    m["experts"][1]["name"] = "renamed"
    (bad / "flexmoe.json").write_text(json.dumps(m))
    with pytest.raises(FlexmoeError, match="signature"):
        load_meta(bad)
    from flexmoe.runtime import from_pretrained

    with pytest.raises(FlexmoeError, match="signature"):
        from_pretrained(bad)


# --------------------------------------------------------------------------------------------------
# Loading a composed model: the maintainer's signature is verified on every load


def _unsigned_model(kit, out: Path) -> Path:
    compose(kit["anchor"], [kit["pkg"]["code"], kit["pkg"]["math"]], out, provenance=UNSIGNED_OK)
    return out


def test_unsigned_model_is_refused_on_load_unless_allowed(kit, tmp_path):
    from flexmoe.runtime import from_pretrained

    model = _unsigned_model(kit, tmp_path / "u")
    with pytest.raises(FlexmoeError, match="is not signed") as e:
        from_pretrained(model, device="cpu")
    assert str(model) in str(e.value) and "--allow-unsigned" in str(e.value) and "--trust" in str(e.value)
    assert "ALLOW_UNSIGNED" in str(e.value) and "UNSIGNED_OK" not in str(e.value)  # the model's option
    with pytest.raises(FlexmoeError, match="is not signed"):
        load_meta(model)
    assert from_pretrained(model, device="cpu", trust=ALLOW_UNSIGNED).names == ["public", "code", "math"]
    # The maintainer's own changes of its model still accept it (an unsigned input is its choice).
    assert remove(model, "math", tmp_path / "r", provenance=UNSIGNED_OK)["experts"][1]["name"] == "code"


def test_signed_model_loads_by_default_and_pins_to_the_trusted_key(kit, trust_root):
    from flexmoe.runtime import from_pretrained

    assert from_pretrained(kit["model"], device="cpu").names == ["public", "code", "math"]
    assert from_pretrained(kit["model"], device="cpu", trust=_trust(trust_root)).names
    with pytest.raises(FlexmoeError, match="not among the --trust keys.*maintainer's public key"):
        from_pretrained(kit["model"], device="cpu", trust=_trust(trust_root, who="other"))


@pytest.mark.parametrize("allow_unsigned", [False, True])
def test_tampered_model_tensor_is_refused_on_load(kit, tmp_path, allow_unsigned):
    from flexmoe.runtime import from_pretrained

    bad = trustkit.copy(kit["model"], tmp_path / "m")
    weights = bad / "model.safetensors"
    t = load_file(str(weights))
    name = next(n for n in t if n.endswith("mlp.experts.1.up_proj.weight"))
    t[name] = t[name] + 1
    save_file(t, str(weights), metadata={"format": "pt"})
    with pytest.raises(FlexmoeError, match="does not match the files"):
        from_pretrained(bad, device="cpu", trust=Trust(allow_unsigned=allow_unsigned))


def test_cli_generate_verifies_the_model(kit, trust_root, tmp_path):
    from typer.testing import CliRunner

    from flexmoe.cli import app

    unsigned = _unsigned_model(kit, tmp_path / "u")
    gen = ["generate", "--prompt", "document 1", "--max-new-tokens", "2"]
    keys = trust_root / "keys"
    run = CliRunner().invoke
    r = run(app, [*gen, str(unsigned)])
    assert r.exit_code == 1 and isinstance(r.exception, FlexmoeError) and "not signed" in str(r.exception)
    assert run(app, [*gen, str(unsigned), "--allow-unsigned"]).exit_code == 0
    assert run(app, [*gen, str(kit["model"])]).exit_code == 0  # signed: no option needed
    assert run(app, [*gen, str(kit["model"]), "--trust", str(keys / "owner.pub")]).exit_code == 0
    r = run(app, [*gen, str(kit["model"]), "--trust", str(keys / "other.pub")])
    assert r.exit_code == 1 and "not among the --trust keys" in str(r.exception)
    r = run(app, ["route", str(kit["model"]), "--text", "x", "--json", "--trust", str(keys)])
    assert r.exit_code == 0 and set(json.loads(r.output)) == {"public", "code", "math"}
    # The console script: one 'error:' line naming the model and the option, no traceback.
    p = subprocess.run(
        [sys.executable, "-m", "flexmoe", *gen, str(unsigned)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error:") and "not signed" in p.stderr and "--allow-unsigned" in p.stderr


def test_composed_anchor_fingerprint_is_recomputed(kit, tmp_path):
    bad = trustkit.copy(kit["model"], tmp_path / "m")
    (bad / SIGNATURE).unlink()
    m = json.loads((bad / "flexmoe.json").read_text())
    m["anchor"]["fingerprint"] = "sha256:" + "2" * 64
    (bad / "flexmoe.json").write_text(json.dumps(m))
    with pytest.raises(FlexmoeError, match="do not match the anchor fingerprint"):
        add(bad, kit["pkg"]["law"], tmp_path / "out", provenance=UNSIGNED_OK)
    assert not (tmp_path / "out").exists()


def test_add_update_remove_keep_signatures_and_pin_signers(kit, trust_root, tmp_path):
    prov = Provenance(_trust(trust_root), sign_key=kit["key"])
    add(kit["model"], kit["pkg"]["law"], tmp_path / "a", provenance=prov)
    update(tmp_path / "a", kit["pkg"]["math2"], tmp_path / "u", provenance=prov)
    remove(tmp_path / "u", "law", tmp_path / "r", provenance=prov)
    for d in ("a", "u", "r"):
        assert (tmp_path / d / SIGNATURE).is_file()
        load_meta(tmp_path / d)
    # Trust on first use: "math" was signed by owner; an update signed by another key is refused.
    other = load_private_key(trust_root / "keys" / "other")
    imposter = trustkit.package(kit["anchor"], tmp_path / "imp", "math", seed=5, key=other)
    with pytest.raises(FlexmoeError, match="only the key that signed an expert can update it"):
        update(tmp_path / "a", imposter, tmp_path / "x", provenance=Provenance(Trust()))
    assert not (tmp_path / "x").exists()


def test_sign_existing_package_and_tampered_one_is_not_signed(kit, tmp_path):
    p = trustkit.package(kit["anchor"], tmp_path / "p", "late")
    kid = pkg.sign_package(p, kit["key"])
    assert pkg.check(p, Trust())[1] == kid
    bad = trustkit.package(kit["anchor"], tmp_path / "b", "late")
    _edit_tensor(bad, "layers.0.up_proj.weight", lambda t: t * 2)
    with pytest.raises(FlexmoeError, match="SHA-256"):
        pkg.sign_package(bad, kit["key"])
    assert not (bad / SIGNATURE).exists()


def test_unversioned_manifest_migrates(kit, tmp_path):
    p = trustkit.copy(kit["pkg"]["code"], tmp_path / "old")
    raw = json.loads((p / "expert.json").read_text())
    raw.pop("schema_version")
    assert migrate_expert_manifest(raw)["schema_version"] == 1
    (p / "expert.json").write_text(json.dumps(raw))
    (p / SIGNATURE).unlink()
    assert read_expert_manifest(p)["schema_version"] == 1


def test_permissions_are_normal(kit, trust_root):
    old = os.umask(0o022)
    os.umask(old)
    if old != 0o022:
        pytest.skip("umask is not 022")
    for d in (kit["model"], kit["pkg"]["code"]):
        assert oct(d.stat().st_mode & 0o777) == oct(0o755)
        for f in d.iterdir():
            assert oct(f.stat().st_mode & 0o777) == oct(0o644), f
    assert (trust_root / "keys" / "owner").stat().st_mode & 0o777 == 0o600


def test_transformers_loads_composed_model_and_tokenizer_config_is_portable(kit):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((kit["model"] / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"]
    assert "rope_theta" in json.loads((kit["model"] / "config.json").read_text())
    assert type(AutoModelForCausalLM.from_pretrained(str(kit["model"]))).__name__ == "FlexOlmoForCausalLM"


# --------------------------------------------------------------------------------------------------
# Nothing lost: locks, stale temporaries, resume


def _hold_lock(out: Path, seconds: float) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from flexmoe.fileio import output_lock
        with output_lock({str(out)!r}):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": SRC}, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_while_first_holds_the_output(kit, tmp_path):
    out = tmp_path / "model"
    holder = _hold_lock(out, 60)
    try:
        with pytest.raises(FlexmoeError, match=r"Another flexmoe process \(pid \d+\) is writing"):
            compose(kit["anchor"], [kit["pkg"]["code"]], out, provenance=UNSIGNED_OK)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    compose(
        kit["anchor"], [kit["pkg"]["code"]], out, provenance=UNSIGNED_OK
    )  # the lock dies with its holder (kill -9 too)
    assert out.is_dir() and not list(tmp_path.glob(".model.*"))


def test_two_concurrent_composes_one_wins_nothing_silently_lost(kit, tmp_path):
    out = tmp_path / "model"
    args = lambda names: [  # noqa: E731
        sys.executable, "-m", "flexmoe", "compose", "--anchor", str(kit["anchor"]), "--out", str(out),
        *[x for n in names for x in ("--expert", str(kit["pkg"][n]))],
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [subprocess.Popen(args(n), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (["code"], ["math"])]  # fmt: skip
    results = [(p.wait(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    ok = [i for i, (rc, _) in enumerate(results) if rc == 0]
    assert len(ok) == 1, results
    loser = results[1 - ok[0]]
    assert loser[0] == 1 and "Traceback" not in loser[1]
    assert "is writing" in loser[1] or "already exists" in loser[1]
    winner = ["code", "math"][ok[0]]
    assert [e["name"] for e in load_meta(out, ALLOW_UNSIGNED)["experts"]] == ["public", winner]


def test_stale_temporaries_cleaned_and_moved_aside_output_restored(tmp_path):
    out = tmp_path / "pkg"
    (tmp_path / ".pkg.tmp-99999-abc").mkdir()
    (tmp_path / ".pkg.tmp-99999-abc" / "half.safetensors").write_bytes(b"x")
    (tmp_path / ".pkg.old-99999").mkdir()  # killed between moving the old output aside and renaming
    (tmp_path / ".pkg.old-99999" / "precious").write_text("keep")
    with output_lock(out):
        pass
    assert (out / "precious").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_final_rename_rechecks_the_output(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(FlexmoeError, match="appeared while this run was writing"):
        with atomic_dir(out) as tmp:
            (tmp / "f").write_text("new")
            out.mkdir()  # another program created it meanwhile
    assert not list(out.iterdir()) and not list(tmp_path.glob(".o.tmp-*"))


def test_unwritable_output_is_refused_before_work(kit, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FlexmoeError, match="parent"):
        compose(kit["anchor"], [kit["pkg"]["code"]], tmp_path / "file" / "model", provenance=UNSIGNED_OK)


def test_resume_never_overwrites_and_refuses_other_data(trust_root, tmp_path):
    from flexmoe.expert.train import ExpertSpec, ExpertTrainSettings, train_expert

    a = trust_root / "anchor"
    (tmp_path / "code.txt").write_text("\n\n".join(f"def f{i}(x): return x + {i}" for i in range(200)))
    (tmp_path / "math.txt").write_text("\n\n".join(f"{i} + {i} = {2 * i}" for i in range(200)))
    out = tmp_path / "pkg"
    kw = dict(spec=ExpertSpec("code", router_init="hidden"), steps=4, batch_size=2, seq_len=32, quiet=True)
    assert not train_expert(a, [tmp_path / "code.txt"], "code", out, stop_after=1, **kw)["finished"]
    with pytest.raises(FlexmoeError, match="other data"):
        train_expert(a, [tmp_path / "math.txt"], "code", out, resume=True, **kw)
    m = train_expert(a, [tmp_path / "code.txt"], "code", out, resume=True, **kw)
    assert m["finished"] and not (tmp_path / ".pkg.work").exists()
    before = sha256_file(out / "expert.safetensors")
    with pytest.raises(FlexmoeError, match="already finished"):
        train_expert(a, [tmp_path / "code.txt"], "code", out, resume=True, **kw)
    with pytest.raises(FlexmoeError, match="already finished"):  # the same through the settings
        train_expert(a, [tmp_path / "code.txt"], "code", out, settings=ExpertTrainSettings(resume=True, **kw))
    assert sha256_file(out / "expert.safetensors") == before
    shutil.rmtree(out)


def test_expert_train_refused_while_another_run_writes_the_same_output(trust_root, tmp_path):
    from flexmoe.expert.train import ExpertSpec, train_expert

    (tmp_path / "d.txt").write_text("\n\n".join(trustkit.DOCS))
    out = tmp_path / "pkg"
    holder = _hold_lock(out, 60)
    try:
        with pytest.raises(FlexmoeError, match="is writing"):
            train_expert(
                trust_root / "anchor",
                [tmp_path / "d.txt"],
                "x",
                out,
                spec=ExpertSpec("x", router_init="hidden"),
            )
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists() and not (tmp_path / ".pkg.work").exists()


def test_embedder_pointing_at_pickle_is_refused(tmp_path):
    from flexmoe.router_init import embed_documents

    (tmp_path / "model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(FlexmoeError, match="pickle"):
        embed_documents(["x"], str(tmp_path / "model.bin"))
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(FlexmoeError, match="pickle"):
        embed_documents(["x"], str(tmp_path / "emb"))


def test_cli_sign_inspect_compose_with_trust(kit, trust_root, tmp_path):
    from typer.testing import CliRunner

    from flexmoe.cli import app

    p = trustkit.package(kit["anchor"], tmp_path / "p", "late")
    run = CliRunner().invoke
    r = run(app, ["expert", "inspect", str(p)])
    assert r.exit_code == 0 and "unsigned" in r.output
    assert run(app, ["expert", "sign", str(p), "--key", str(trust_root / "keys" / "owner")]).exit_code == 0
    r = run(app, ["expert", "inspect", str(p)])
    assert r.exit_code == 0 and "signed by ed25519:" in r.output
    r = run(app, ["keys", "generate", "--out", str(tmp_path / "m.key")])
    assert r.exit_code == 0 and (tmp_path / "m.key.pub").is_file()
    argv = ["compose", "--anchor", str(kit["anchor"]), "--expert", str(p), "--out", str(tmp_path / "m")]
    argv += ["--trust", str(trust_root / "keys"), "--sign-key", str(tmp_path / "m.key")]
    r = run(app, argv)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / SIGNATURE).is_file()


def test_kill_9_while_writing_keeps_the_previous_output_and_next_run_cleans_up(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights").write_text("previous")
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from flexmoe.fileio import atomic_dir
        with atomic_dir(Path({str(out)!r}), force=True) as tmp:
            (tmp / "weights").write_text("half")
            print("writing", flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()  # SIGKILL: no clean-up code runs
    proc.wait()
    proc.stdout.close()
    assert (out / "weights").read_text() == "previous"
    assert list(tmp_path.glob(".model.tmp-*"))  # the killed run's temporary directory is still there
    with atomic_dir(out, force=True) as tmp:  # the next writer takes the lock and cleans it up
        (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
