"""Experts that train their own embedding / LM-head rows (``--shared-rows owner``): the row choice, the
deltas the package ships, resume, composition with exact opt-out, bad input."""

import pytest
import torch
from safetensors.torch import load_file
from sharedkit import KW, opt_out_weights, train, weights
from typer.testing import CliRunner

from flexmoe.cli import app
from flexmoe.compose import UNSIGNED_OK, compose
from flexmoe.data import blocks_for, load_splits
from flexmoe.errors import FlexmoeError
from flexmoe.expert.package import SHARED_FILE, TENSOR_FILE
from flexmoe.expert.privacy import DPSettings
from flexmoe.expert.shared import EMBEDDINGS, owner_token_rows, token_counts
from flexmoe.expert.train import train_expert
from flexmoe.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def owners(tiny_anchor, demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared_rows")
    return {
        d: (train(tiny_anchor, demo_data, d, root / d, shared_rows="owner"), root / d)
        for d in ("code", "math")
    }


def test_owner_rows_by_hand():
    own = torch.tensor([10.0, 3.0, 2.0, 50.0, 5.0])
    pub = torch.tensor([0.0, 0.0, 0.0, 50.0, 100.0])
    # shares: own 10/70, 3/70, 2/70, 50/70, 5/70; public (x+1)/155: 1/155, 1/155, 1/155, 51/155, 101/155
    rows = owner_token_rows(own, pub, 4.0, special=[0])
    assert rows.tolist() == [False, True, False, False, False]  # 0 special, 2 too rare, 3-4 public too
    assert owner_token_rows(own, pub, 4.0, special=[]).tolist() == [True, True, False, False, False]


def test_package_ships_only_the_owners_rows(owners, tiny_anchor, demo_data):
    m, out = owners["math"]
    tok = load_tokenizer(tiny_anchor)
    vocab = load_file(str(out / SHARED_FILE))["model.embed_tokens.weight"].shape[0]
    count = lambda d: token_counts(blocks_for(load_splits([demo_data / d]).train, tok, 64), vocab)  # noqa: E731
    rows = owner_token_rows(count("math"), count("public"), 4.0, tok.all_special_ids)
    deltas = load_file(str(out / SHARED_FILE))
    assert set(deltas) == set(EMBEDDINGS) and m["shared_rows"] == {
        "mode": "owner",
        "ratio": 4.0,
        "rows": int(rows.sum()),
    }
    for name in EMBEDDINGS:
        changed = deltas[name].abs().sum(1) > 0
        assert changed.any() and not changed[~rows].any()  # some of the owner's rows, nothing else
    assert m["valid_loss"]["expert"] < m["valid_loss"]["anchor"]


def test_resume_gives_the_same_package(tiny_anchor, demo_data, tmp_path):
    first = train(tiny_anchor, demo_data, "math", tmp_path / "res", shared_rows="owner", stop_after=5)
    assert first == {"finished": False}
    train(tiny_anchor, demo_data, "math", tmp_path / "res", shared_rows="owner", resume=True)
    train(tiny_anchor, demo_data, "math", tmp_path / "full", shared_rows="owner")
    for f in (TENSOR_FILE, SHARED_FILE):
        a, b = load_file(str(tmp_path / "res" / f)), load_file(str(tmp_path / "full" / f))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_composed_rows_and_exact_opt_out(owners, tiny_anchor, tmp_path):
    pk = [owners[d][1] for d in ("code", "math")]
    both, code_only, removed = opt_out_weights(tiny_anchor, pk, tmp_path)
    base = weights(tiny_anchor)
    d_code = load_file(str(pk[0] / SHARED_FILE))["lm_head.weight"]
    d_math = load_file(str(pk[1] / SHARED_FILE))["lm_head.weight"]
    only_math = (d_math.abs().sum(1) > 0) & (d_code.abs().sum(1) == 0)
    # disjoint merge: a row only math changed carries math's change whole
    torch.testing.assert_close(
        both["lm_head.weight"][only_math], (base["lm_head.weight"] + d_math)[only_math]
    )
    assert code_only.keys() == removed.keys()
    for k in code_only:  # opt-out: bit for bit the model that never had math
        assert torch.equal(code_only[k], removed[k]), k
    assert not torch.equal(both["lm_head.weight"], removed["lm_head.weight"])


def test_bad_inputs(tiny_anchor, demo_data, tmp_path):
    with pytest.raises(FlexmoeError, match="pass --public"):
        train_expert(tiny_anchor, [demo_data / "math"], "m", tmp_path / "a", shared_rows="owner", **KW)
    with pytest.raises(FlexmoeError, match="Unknown --shared-rows"):
        train(tiny_anchor, demo_data, "math", tmp_path / "b", shared_rows="some")
    with pytest.raises(FlexmoeError, match="does not combine with --dp-epsilon"):
        train(tiny_anchor, demo_data, "math", tmp_path / "c", shared_rows="all", dp=DPSettings(epsilon=8.0))
    with pytest.raises(FlexmoeError, match="--row-ratio 2.0 is not usable with --shared-rows all"):
        train(tiny_anchor, demo_data, "math", tmp_path / "d", shared_rows="all", row_ratio=2.0)
    with pytest.raises(FlexmoeError, match="--row-ratio 0.0 is not usable"):
        train(tiny_anchor, demo_data, "math", tmp_path / "e", shared_rows="owner", row_ratio=0.0)
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_demo_refuses_unknown_rows_and_experts_trained_with_other_rows(tmp_path):
    """``flexmoe demo --shared-rows``: an unknown mode fails before anything is built; a resumed workdir
    whose experts were trained with other rows is refused, not silently reused."""
    from flexmoe.demo import Steps, demo_preset, train_owner
    from flexmoe.expert.package import MANIFEST
    from flexmoe.fileio import write_json

    r = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "w"), "--shared-rows", "some"])
    assert isinstance(r.exception, FlexmoeError) and "Unknown --shared-rows 'some'" in str(r.exception)
    assert not (tmp_path / "w" / "data").exists()
    package = tmp_path / "w" / "owners" / "code" / "expert"
    package.mkdir(parents=True)
    write_json(package / MANIFEST, {"settings": {"shared_rows": "none"}})
    p = demo_preset("tiny", {"shared_rows": "owner"})
    with pytest.raises(FlexmoeError, match="trained with --shared-rows none, this run asks for owner"):
        train_owner(tmp_path / "w", tmp_path / "data", tmp_path / "anchor", "code", p, Steps(True), True)
    assert train_owner(
        tmp_path / "w", tmp_path / "d", tmp_path / "a", "code", demo_preset("tiny"), Steps(True), True
    )


def test_cli_trains_owner_rows_without_a_stage(tiny_anchor, demo_data, tmp_path):
    cmd = (
        f"expert train --anchor {tiny_anchor} --data {demo_data / 'code'} --name code --out {tmp_path / 'x'}"
    )
    cmd += f" --steps 2 --seq-len 64 --router-init hidden --public {demo_data / 'public'} --shared-rows owner"
    args = cmd.split()  # pytest's temporary paths have no spaces
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x" / SHARED_FILE).is_file()
    r = CliRunner().invoke(app, [*args[:-1], "owner", "--row-ratio", "2", "--out", str(tmp_path / "y")])
    assert r.exit_code == 0, r.output
    rows = [load_file(str(tmp_path / d / SHARED_FILE))[EMBEDDINGS[0]].ne(0).any(1).sum() for d in "xy"]
    assert rows[1] > rows[0]  # a lower ratio gives the owner more rows


def test_composition_metrics_remove_the_owners_rows(owners, tiny_anchor, demo_data, tmp_path):
    """Masking an expert cannot take its rows out of the merged embeddings: without:d must be the model
    that never had d, and alone:d the owner's own model (the package composed alone)."""
    from flexmoe.evaluate.composition import CompositionSetup, composition_perplexities
    from flexmoe.evaluate.metrics import HFLM, perplexity
    from flexmoe.evaluate.run import test_documents
    from flexmoe.runtime import from_pretrained
    from flexmoe.signing import ALLOW_UNSIGNED

    pk = [owners[d][1] for d in ("code", "math")]
    compose(tiny_anchor, pk, tmp_path / "both", provenance=UNSIGNED_OK)
    compose(tiny_anchor, pk[:1], tmp_path / "code_only", provenance=UNSIGNED_OK)
    setup = CompositionSetup(
        tmp_path / "both",
        demo_data,
        ["code", "math"],
        anchor=tiny_anchor,
        packages=pk,
        seq_len=32,
        max_blocks=4,
    )
    setup.trust = ALLOW_UNSIGNED
    table, info = composition_perplexities(setup)
    c = from_pretrained(tmp_path / "code_only", trust=ALLOW_UNSIGNED, device="cpu")
    lm = HFLM(c.model, c.tokenizer)
    want = perplexity(lm, test_documents(demo_data, "math"), 32, max_blocks=4)["perplexity"]
    assert table["without:math"]["math"] == pytest.approx(want, rel=1e-5)
    assert "re-merged" in info["without"] and "package" in info["alone"]["math"]


def test_alone_without_packages_is_re_merged_down_to_the_owner(owners, tiny_anchor, demo_data, tmp_path):
    """No packages at hand (``flexmoe eval --composition`` on a model alone): a mask would keep the other
    owners' merged rows, so alone:d is the model with every other owner removed, which is exactly what
    d's package composes to."""
    from flexmoe.evaluate.composition import CompositionSetup, composition_perplexities
    from flexmoe.evaluate.metrics import perplexity
    from flexmoe.evaluate.run import load_lm, test_documents
    from flexmoe.signing import ALLOW_UNSIGNED

    pk = [owners[d][1] for d in ("code", "math")]
    compose(tiny_anchor, pk, tmp_path / "both", provenance=UNSIGNED_OK)
    compose(tiny_anchor, pk[1:], tmp_path / "math_only", top_k=2, provenance=UNSIGNED_OK)
    setup = CompositionSetup(tmp_path / "both", demo_data, ["code", "math"], anchor=tiny_anchor, seq_len=32)
    setup.max_blocks, setup.trust = 4, ALLOW_UNSIGNED
    table, info = composition_perplexities(setup)
    lm = load_lm(tmp_path / "math_only", use_bias=True, device="cpu", trust=ALLOW_UNSIGNED)
    want = perplexity(lm, test_documents(demo_data, "math"), 32, max_blocks=4)["perplexity"]
    assert table["alone:math"]["math"] == pytest.approx(want, rel=1e-5)
    assert "re-merged down" in info["alone"]["math"]


def test_prompt_calibration_is_refused_for_a_base_model(owners, tiny_anchor, tmp_path):
    from flexmoe.runtime import from_pretrained
    from flexmoe.signing import ALLOW_UNSIGNED

    compose(tiny_anchor, [owners[d][1] for d in ("code", "math")], tmp_path / "m", provenance=UNSIGNED_OK)
    c = from_pretrained(tmp_path / "m", trust=ALLOW_UNSIGNED, sequence_routing=True, device="cpu")
    with pytest.raises(FlexmoeError, match="for chat models"):
        c.calibrate_prompts([[{"role": "user", "content": "hello"}]])


def test_sequence_oracle_of_merged_rows_uses_the_owners_own_rows(owners, tiny_anchor, demo_data, tmp_path):
    """Under sequence routing the oracle of a model with merged rows is sequence routing over public + d
    (d's positions on d's own rows, as the runtime computes once d is chosen), not the rows on the merge."""
    from flexmoe.evaluate.composition import CompositionSetup, composition_perplexities
    from flexmoe.evaluate.metrics import perplexity
    from flexmoe.evaluate.run import load_lm, test_documents
    from flexmoe.signing import ALLOW_UNSIGNED

    pk = [owners[d][1] for d in ("code", "math")]
    compose(tiny_anchor, pk, tmp_path / "both", provenance=UNSIGNED_OK)
    setup = CompositionSetup(tmp_path / "both", demo_data, ["code", "math"], anchor=tiny_anchor, packages=pk)
    setup.seq_len, setup.max_blocks, setup.trust, setup.sequence_routing = 32, 4, ALLOW_UNSIGNED, True
    table, info = composition_perplexities(setup)
    docs = test_documents(demo_data, "math")
    kw = {"device": "cpu", "trust": ALLOW_UNSIGNED}
    seq = load_lm(tmp_path / "both", include=["math"], sequence_routing=True, **kw)
    rows = load_lm(tmp_path / "both", include=["math"], **kw)
    want, merged = (perplexity(lm, docs, 32, max_blocks=4)["perplexity"] for lm in (seq, rows))
    assert "sequence" in info["oracle"]
    assert table["oracle:math"]["math"] == pytest.approx(want, rel=1e-5)
    assert want != pytest.approx(merged, rel=1e-4)  # the two oracles differ, so the test could fail
