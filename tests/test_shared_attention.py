"""Experts that train their own attention projections (``--shared-attention``): the deltas the package
ships, the stock merge with exact opt-out, the owner's own attention under sequence routing, bad input;
and the dense baselines trained on the owners' stream (domain + public mix)."""

import pytest
import torch
from safetensors.torch import load_file
from sharedkit import opt_out_weights, train, weights
from typer.testing import CliRunner

from flexmoe.anchor import load_config
from flexmoe.cli import app
from flexmoe.compose import UNSIGNED_OK, compose
from flexmoe.errors import FlexmoeError
from flexmoe.expert.package import SHARED_FILE
from flexmoe.expert.privacy import DPSettings
from flexmoe.expert.shared import ATTENTION_PROJECTIONS


@pytest.fixture(scope="module")
def owners(tiny_anchor, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_attention")
    return {
        d: (train(tiny_anchor, demo_data, d, root / d, shared_attention=True), root / d)
        for d in ("code", "math")
    }


def _attention_names(anchor):
    return {n for n in weights(anchor) if any(f".self_attn.{p}.weight" in n for p in ATTENTION_PROJECTIONS)}


def test_package_ships_every_attention_projection_and_nothing_else(owners, tiny_anchor):
    m, out = owners["math"]
    deltas = load_file(str(out / SHARED_FILE))
    want = _attention_names(tiny_anchor)
    assert len(want) == 4 * load_config(tiny_anchor).num_hidden_layers and set(deltas) == want
    assert all(bool(d.any()) for d in deltas.values())  # no norm, embedding or head among them
    assert m["shared_attention"] is True and m["shared_rows"] is None
    assert m["valid_loss"]["expert"] < m["valid_loss"]["anchor"]
    r = CliRunner().invoke(app, ["expert", "inspect", str(out)])
    assert r.exit_code == 0 and "shared tensors trained: attention projections" in r.output, r.output


def test_stock_merge_and_exact_opt_out(owners, tiny_anchor, tmp_path):
    pk = [owners[d][1] for d in ("code", "math")]
    both, code_only, removed = opt_out_weights(tiny_anchor, pk, tmp_path)
    base = weights(tiny_anchor)
    name = sorted(_attention_names(tiny_anchor))[0]
    d_code, d_math = (load_file(str(p / SHARED_FILE))[name] for p in pk)
    # disjoint: entries both owners changed get the mean of the two changes
    torch.testing.assert_close(both[name], base[name] + (d_code + d_math) / 2)
    torch.testing.assert_close(code_only[name], base[name] + d_code)
    assert code_only.keys() == removed.keys()
    assert all(torch.equal(code_only[k], removed[k]) for k in code_only)  # bit for bit


def test_sequence_routing_computes_the_chosen_owners_own_attention(owners, tiny_anchor, demo_data, tmp_path):
    """Text given to math in the model of both owners computes with math's own attention, not the merge:
    its perplexity equals that of the model composed from math alone."""
    from flexmoe.evaluate.metrics import perplexity
    from flexmoe.evaluate.run import load_lm, test_documents
    from flexmoe.signing import ALLOW_UNSIGNED

    pk = [owners[d][1] for d in ("code", "math")]
    compose(tiny_anchor, pk, tmp_path / "both", provenance=UNSIGNED_OK)
    compose(tiny_anchor, pk[1:], tmp_path / "math_only", provenance=UNSIGNED_OK)
    docs = test_documents(demo_data, "math")
    kw = {"device": "cpu", "trust": ALLOW_UNSIGNED}
    ppl = lambda lm: perplexity(lm, docs, 32, max_blocks=4)["perplexity"]  # noqa: E731
    own = ppl(load_lm(tmp_path / "both", include=["math"], sequence_routing=True, **kw))
    alone = ppl(load_lm(tmp_path / "math_only", sequence_routing=True, **kw))
    merged = ppl(load_lm(tmp_path / "both", include=["math"], **kw))
    assert own == pytest.approx(alone, rel=1e-4)
    assert own != pytest.approx(merged, rel=1e-3)  # the merge differs, so the test could fail


def test_bad_inputs(tiny_anchor, demo_data, tmp_path):
    with pytest.raises(FlexmoeError, match="--shared-attention does not combine with --dp-epsilon"):
        train(tiny_anchor, demo_data, "math", tmp_path / "a", shared_attention=True, dp=DPSettings(8.0))
    assert not (tmp_path / "a").exists()
    args = ["expert", "train", "--anchor", str(tiny_anchor), "--data", str(demo_data / "math"), "--name"]
    args += ["math", "--out", str(tmp_path / "b"), "--stage", "mid", "--shared-attention"]
    r = CliRunner().invoke(app, args)
    assert isinstance(r.exception, FlexmoeError) and "for pretraining experts" in str(r.exception)
    assert not (tmp_path / "b").exists()


def test_demo_refuses_experts_trained_with_other_attention(tmp_path):
    from flexmoe.demo import Steps, demo_preset, train_owner
    from flexmoe.expert.package import MANIFEST
    from flexmoe.fileio import write_json

    package = tmp_path / "w" / "owners" / "code" / "expert"
    package.mkdir(parents=True)
    write_json(package / MANIFEST, {"settings": {"shared_rows": "none", "shared_attention": False}})
    p = demo_preset("tiny", {"shared_attention": True})
    with pytest.raises(FlexmoeError, match="trained without --shared-attention, this run asks for it"):
        train_owner(tmp_path / "w", tmp_path / "d", tmp_path / "a", "code", p, Steps(True), True)


def test_dense_baseline_trains_on_the_owners_stream(tiny_anchor, demo_data):
    """With ``public_mix`` the dense expert's training stream is the owners' (domain + that share of
    public sequences), so BTM and the FlexOlmo experts see the same data."""
    from flexmoe.evaluate.baselines import BaselineTraining, dense_blocks
    from flexmoe.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_anchor)
    t = BaselineTraining(seq_len=64, public_mix=0.6)
    alone = dense_blocks(demo_data / "math", tok, BaselineTraining(seq_len=64))
    mixed = dense_blocks(demo_data / "math", tok, t, public=demo_data / "public")
    assert torch.equal(mixed[: len(alone)], alone)
    assert (len(mixed) - len(alone)) / len(mixed) == pytest.approx(0.6, abs=0.01)
    public = dense_blocks(demo_data / "public", tok, BaselineTraining(seq_len=64))
    assert torch.equal(mixed[len(alone)], public[0])  # the extra blocks are public ones
    assert torch.equal(dense_blocks(demo_data / "math", tok, t), alone)  # no public given: the domain
