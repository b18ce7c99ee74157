"""Composition metrics on hand-computed cases (issue 13's definitions, natural log, fractions)."""

import json
import math

import pytest
import torch

from flexmoe.evaluate.composition import composition_metrics, meets_target, owner_metrics
from flexmoe.signing import ALLOW_UNSIGNED

E = math.e


def _table():
    # Perplexities chosen as powers of e so the log-differences are whole numbers by hand:
    # code: anchor e^5, alone e^1 (gain 4), composed e^2 (kept 3 of 4), without e^4.5 (removes 2.5 of 3),
    #       oracle e^1.5 (kept 3.5 of 4).
    # math: anchor e^4, alone e^2 (gain 2), composed e^3 (kept 1 of 2), without e^4 (removes 1 of 1).
    return {
        "anchor": {"public": 10.0, "code": E**5, "math": E**4},
        "composed": {"public": 10.5, "code": E**2, "math": E**3},
        "alone:code": {"code": E**1},
        "alone:math": {"math": E**2},
        "without:code": {"public": 10.5 * 1.01, "code": E**4.5, "math": E**3 * 0.9},
        "without:math": {"public": 10.5, "code": E**2 * 1.05, "math": E**4},
        "oracle:code": {"code": E**1.5},
    }


def test_per_owner_numbers_match_hand_computation():
    out = composition_metrics(_table(), ["code", "math"], routing="router")
    code, maths = out["owners"]["code"], out["owners"]["math"]
    assert code["alone_gain"] == pytest.approx(4.0)
    assert code["retention"] == pytest.approx(3.0 / 4.0)
    assert code["optout_removed"] == pytest.approx(2.5 / 3.0)
    # other domains for code: public (+1%) and math (-10%) -> the largest absolute change is 0.10
    assert code["max_other_change"] == pytest.approx(0.10)
    assert code["oracle_retention"] == pytest.approx(3.5 / 4.0)
    assert maths["alone_gain"] == pytest.approx(2.0)
    assert maths["retention"] == pytest.approx(0.5)
    assert maths["optout_removed"] == pytest.approx(1.0)
    assert maths["max_other_change"] == pytest.approx(0.05)
    assert out["public_change"] == pytest.approx(0.05)
    assert out["routing"] == "router"


def test_exact_block_shape_and_json_round_trip():
    out = composition_metrics(_table(), ["code", "math"])
    assert set(out) == {"owners", "public_change", "routing"}
    for d in ("code", "math"):
        assert set(out["owners"][d]) == {
            "alone_gain",
            "retention",
            "optout_removed",
            "max_other_change",
            "oracle_retention",
        }
    assert json.loads(json.dumps(out)) == out


def test_missing_optional_runs_give_null_not_numbers():
    out = composition_metrics(_table(), ["code", "math", "legal"])
    assert out["owners"]["math"]["oracle_retention"] is None  # no oracle run for math
    legal = out["owners"]["legal"]  # an owner nothing was measured for
    assert all(v is None for v in legal.values())
    no_public = composition_metrics({"anchor": {}, "composed": {}}, ["code"])
    assert no_public["public_change"] is None


def test_zero_denominators_and_bad_values_are_null():
    table = {
        "anchor": {"code": 8.0, "public": 5.0},
        "composed": {"code": 8.0, "public": float("nan")},
        "alone:code": {"code": 8.0},
        "without:code": {"code": 9.0},
    }
    m = owner_metrics(table, "code")
    assert m["alone_gain"] == pytest.approx(0.0)
    assert m["retention"] is None  # gain 0: retention undefined
    assert m["optout_removed"] is None  # composed equals anchor: nothing to remove
    assert m["max_other_change"] is None  # the only other domain has a NaN composed perplexity
    assert composition_metrics(table, ["code"])["public_change"] is None


def test_negative_gain_keeps_sign():
    # an expert that hurts its own domain alone: the gain is negative and retention keeps the sign maths
    table = {"anchor": {"d": E**2}, "alone:d": {"d": E**3}, "composed": {"d": E**1}}
    m = owner_metrics(table, "d")
    assert m["alone_gain"] == pytest.approx(-1.0)
    assert m["retention"] == pytest.approx(-1.0)


def test_targets():
    assert meets_target("retention", 0.95) is True
    assert meets_target("retention", 0.5) is False
    assert meets_target("optout_removed", 1.05) is True
    assert meets_target("optout_removed", 1.75) is False
    assert meets_target("max_other_change", 0.019) is True
    assert meets_target("max_other_change", 0.98) is False
    assert meets_target("public_change", -0.10) is True
    assert meets_target("public_change", 0.03) is False
    assert meets_target("alone_gain", 1.0) is None
    assert meets_target("retention", None) is None


# --------------------------------------------------------------------------------------------------
# Measured on a tiny composed model: masks stand for the separate models they replace


@pytest.fixture(scope="module")
def federation(demo_data, tmp_path_factory):
    """A random tiny anchor (no pretraining: fast) and two owners' experts trained a few steps."""
    from conftest import make_anchor_dir

    from flexmoe.compose import UNSIGNED_OK, ComposeSettings, compose
    from flexmoe.data import read_documents
    from flexmoe.expert.train import ExpertSpec, train_expert

    root = tmp_path_factory.mktemp("composition")
    anchor = make_anchor_dir(
        root / "anchor", "olmo2", read_documents([demo_data / "public" / "train.jsonl"])[:80]
    )
    pkgs = []
    for d in ("code", "math"):
        spec = ExpertSpec(name=d, router_init="hidden")
        train_expert(anchor, [demo_data / d], d, root / d, steps=3, seq_len=32, quiet=True, spec=spec)
        pkgs.append(root / d)
    compose(anchor, pkgs, root / "model", ComposeSettings(top_k=2), provenance=UNSIGNED_OK)
    return root, pkgs, anchor


def _ppl(model_dir, data, domain, use_bias=False, **kw):
    from flexmoe.evaluate.metrics import HFLM, perplexity
    from flexmoe.evaluate.run import test_documents
    from flexmoe.runtime import from_pretrained

    c = from_pretrained(model_dir, use_bias=use_bias, trust=ALLOW_UNSIGNED, **kw)
    return perplexity(HFLM(c.model, c.tokenizer), test_documents(data, domain), 32, max_blocks=4)[
        "perplexity"
    ]


def test_measured_table_equals_the_separate_models(federation, demo_data, tmp_path):
    from flexmoe.compose import UNSIGNED_OK, ComposeSettings, compose, remove
    from flexmoe.evaluate.composition import CompositionSetup, composition_perplexities

    root, pkgs, tiny_anchor = federation
    setup = CompositionSetup(
        root / "model",
        demo_data,
        anchor=tiny_anchor,
        packages=pkgs,
        seq_len=32,
        max_blocks=4,
        trust=ALLOW_UNSIGNED,  # the fixture's model is unsigned
    )
    table, info = composition_perplexities(setup)
    assert info["owners"] == ["code", "math"]
    assert set(table) == {"anchor", "composed"} | {
        f"{k}:{d}" for k in ("alone", "without", "oracle") for d in ("code", "math")
    }
    assert set(table["without:code"]) == {"public", "code", "math"} and set(table["oracle:math"]) == {"math"}
    # opt-out by mask == the physically removed model, on every domain
    remove(root / "model", "code", tmp_path / "without_code")
    for d in ("public", "math", "code"):
        assert table["without:code"][d] == pytest.approx(
            _ppl(tmp_path / "without_code", demo_data, d), rel=1e-4
        )
    # alone by mask (with the owner's bias) == the owner's package composed alone, as it trained
    assert "(checked" in info["alone"]["math"]
    compose(tiny_anchor, [pkgs[1]], tmp_path / "alone_math", ComposeSettings(top_k=2), provenance=UNSIGNED_OK)
    alone = _ppl(tmp_path / "alone_math", demo_data, "math", use_bias=True)
    assert table["alone:math"]["math"] == pytest.approx(alone, rel=1e-4)
    # the anchor == the composed model with only the public expert routed
    only_public = _ppl(root / "model", demo_data, "code", exclude=["code", "math"])
    assert table["anchor"]["code"] == pytest.approx(only_public, rel=1e-4)
    # and the whole block comes out of the table
    block = composition_metrics(table, info["owners"])
    assert all(math.isfinite(v) for o in block["owners"].values() for v in o.values())
    assert math.isfinite(block["public_change"])


# --------------------------------------------------------------------------------------------------
# The report: json, markdown table and the plot panel


def _model(ppl: float, acc: float) -> dict:
    right = round(50 * acc)  # the first items right: the models below agree on the easy ones
    task = {
        "value": acc,
        "n": 50,
        "ci95": [acc - 0.1, acc + 0.1],
        "correct": [1] * right + [0] * (50 - right),
    }
    return {
        "perplexity": {"public": ppl, "code": ppl},
        "tasks": {"public_cloze": 100 * acc},
        "average": 100 * acc,
        "details": {
            "perplexity": {
                d: {"perplexity": ppl, "ci95": [ppl - 1, ppl + 1], "documents": 9} for d in ("public", "code")
            },
            "tasks": {"public_cloze": {"acc": task, "acc_norm": task}},
        },
    }


def test_report_carries_the_composition_block_and_headline(tmp_path):
    from flexmoe.evaluate.report import headline, write_report

    block = composition_metrics(_table(), ["code", "math"], routing="router")
    models = {"public": _model(20.0, 0.5), "flexolmo": _model(10.0, 0.7), "btm": _model(9.0, 0.6)}
    costs = {"btm": {"forward_passes": 4, "flops": 4e6}, "flexolmo": {"forward_passes": 1, "flops": 1.5e6}}
    report = {
        "preset": "test",
        "domains": ["public", "code"],
        "models": models,
        "composition": block,
        "headline": headline(models, costs),
    }
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["composition"] == block
    h = saved["headline"]
    assert set(h) == {"public", "btm", "flexolmo"} and h["btm"]["cost"]["forward_passes"] == 4
    # one task at p=0.7, n=50: the average's interval is that task's binomial interval
    half = 1.96 * (0.7 * 0.3 / 50) ** 0.5
    assert h["flexolmo"]["average"]["ci95"] == pytest.approx([100 * (0.7 - half), 100 * (0.7 + half)])
    # paired on the same items: flexolmo right on 35, btm on 30 of them: +10 points, d = 1 on 5 of 50
    paired = h["flexolmo"]["versus"]["btm"]
    d_half = 1.96 * ((5 * 0.9**2 + 45 * 0.1**2) / 49 / 50) ** 0.5
    assert paired["difference"] == pytest.approx(10.0)
    assert paired["ci95"] == pytest.approx([10 - 100 * d_half, 10 + 100 * d_half])
    assert 100 * d_half < 100 * half  # narrower than the average's own interval
    assert "correct" not in h["flexolmo"]["tasks"]["public_cloze"]  # per-item results stay in details
    md = (tmp_path / "report.md").read_text()
    assert "## Composition (routing: router)" in md and "## Headline comparison" in md
    code_row = next(line for line in md.splitlines() if line.startswith("| code |"))
    assert "0.75 MISS" in code_row and "0.88" in code_row  # retention 3/4 misses 0.90; oracle 3.5/4
    assert "| public change | 5.0% MISS |" in md
    assert "| flexolmo | +20.0 [" in md and "FlexOlmo minus each model on the same items" in md
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_eval_composition_cli_prints_the_table_and_writes_json(federation, demo_data, tmp_path):
    from typer.testing import CliRunner

    from flexmoe.cli import app

    root, pkgs, anchor = federation
    args = ["eval", str(root / "model"), "--composition", "--data", str(demo_data), "--anchor", str(anchor)]
    args += ["--allow-unsigned"]  # the fixture's model is unsigned
    args += ["--expert", str(pkgs[0]), "--max-blocks", "2", "--seq-len", "32", "--limit", "5"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    assert "Composition (routing: router)" in r.output and "public change" in r.output
    out = json.loads((tmp_path / "c.json").read_text())
    assert set(out["composition"]["owners"]) == {"code", "math"}  # every expert with a test split
    assert "(checked" in out["how"]["alone"]["code"] and "unchecked" in out["how"]["alone"]["math"]
    r = CliRunner().invoke(app, [*args, "--owner", "legal"])
    assert r.exit_code == 1 and "legal" in str(r.exception)


def test_expert_choice_reaches_every_scoring_path(federation, tmp_path):
    """Continuation scoring projects only some positions (it calls the decoder directly): the expert
    choice must reach it too, so a masked model scores exactly like the physically removed one."""
    from flexmoe.compose import remove
    from flexmoe.evaluate.run import load_lm

    root, _, _ = federation
    remove(root / "model", "code", tmp_path / "without_code")
    masked = load_lm(root / "model", exclude=["code"], device="cpu", trust=ALLOW_UNSIGNED)
    removed = load_lm(tmp_path / "without_code", device="cpu", trust=ALLOW_UNSIGNED)
    full = load_lm(root / "model", device="cpu", trust=ALLOW_UNSIGNED)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 16))
    mask, prefix = torch.ones_like(ids), torch.tensor([5, 9])
    for split in (True, False):
        for lm in (masked, removed, full):
            lm._split = split
        a, b = masked.token_logprobs(ids, mask, prefix), removed.token_logprobs(ids, mask, prefix)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a, full.token_logprobs(ids, mask, prefix))
        last = torch.tensor([15, 10])
        torch.testing.assert_close(
            masked.next_logprobs(ids, mask, last), removed.next_logprobs(ids, mask, last)
        )


@pytest.mark.parametrize("evidence", ["rows", "likelihood"])
def test_sequence_routing_is_the_chosen_mask_on_every_path_and_opts_out_exactly(
    federation, tmp_path, evidence
):
    """With ``sequence_routing`` each position routes over public + the owner the prefix favours: the
    logits equal the model routed by that explicit mask, the scoring path that calls the decoder
    directly sees it too, and opting out by mask equals the physically removed model routed alike."""
    from flexmoe.compose import remove
    from flexmoe.evaluate.run import load_lm
    from flexmoe.moe import Routing, routing
    from flexmoe.runtime import from_pretrained
    from flexmoe.sequence_routing import SequenceRouting

    root, _, _ = federation
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 16))
    setting = SequenceRouting(evidence=evidence, confidence=0.25 if evidence == "likelihood" else None)
    seq = from_pretrained(root / "model", device="cpu", trust=ALLOW_UNSIGNED, sequence_routing=setting)
    rows = from_pretrained(root / "model", device="cpu", trust=ALLOW_UNSIGNED)
    with torch.no_grad():
        chosen = seq.sequence.mask(seq.model, ids)
        owners = chosen[..., 1:].sum(-1)  # one owner, none (public only) or all (undecided)
        assert chosen[..., 0].all() and ((owners <= 1) | (owners == chosen.shape[-1] - 1)).all()
        with routing(Routing(mask=chosen)):
            want = rows.model(ids).logits
        torch.testing.assert_close(seq.model(ids).logits, want)

    remove(root / "model", "code", tmp_path / "without_code")
    kw = {"device": "cpu", "trust": ALLOW_UNSIGNED}
    masked, removed = (
        load_lm(root / "model", exclude=["code"], sequence_routing=setting, **kw),
        load_lm(tmp_path / "without_code", sequence_routing=setting, **kw),
    )
    mask, prefix = torch.ones_like(ids), torch.tensor([5, 9])
    full = masked.token_logprobs(ids, mask)
    for split in (True, False):
        for lm in (masked, removed):
            lm._split = split
        a = masked.token_logprobs(ids, mask, prefix)
        torch.testing.assert_close(a, removed.token_logprobs(ids, mask, prefix), atol=1e-5, rtol=1e-5)
        scored = a != 0
        torch.testing.assert_close(a[scored], full[scored], atol=1e-5, rtol=1e-5)


def test_likelihood_evidence_is_each_owners_own_model_against_the_anchor(federation):
    """``evidence="likelihood"``: an owner's margin at position t is the log-probability of token t
    under public + that owner minus under public alone, each computed here by an independent model
    restricted by mask; nothing at the first position, and an excluded owner is never run."""
    from flexmoe.runtime import from_pretrained
    from flexmoe.sequence_routing import SequenceRouting

    root, _, _ = federation
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 12))
    kw = {"device": "cpu", "trust": ALLOW_UNSIGNED}
    c = from_pretrained(root / "model", sequence_routing=SequenceRouting(evidence="likelihood"), **kw)
    owners = c.names[1:]

    def token_lp(model):
        with torch.no_grad():
            lp = model(ids).logits[:, :-1].log_softmax(-1)
        return lp.gather(-1, ids[:, 1:, None]).squeeze(-1)

    anchor = token_lp(from_pretrained(root / "model", exclude=owners, **kw).model)
    with torch.no_grad():
        got = c.sequence.margins(c.model.get_decoder(), ids, None)
    assert got.shape == (2, 12, len(c.names)) and not got[:, 0].any() and not got[..., 0].any()
    for e, name in enumerate(owners, start=1):
        want = token_lp(from_pretrained(root / "model", include=[name], **kw).model) - anchor
        torch.testing.assert_close(got[:, 1:, e], want, atol=1e-4, rtol=1e-4)
        assert want.abs().max() > 1e-3  # the experts do change the likelihood: a real check
    allowed = torch.tensor([n != owners[0] for n in c.names])
    calls = []
    real = c.sequence._token_logprobs
    c.sequence._token_logprobs = lambda *a: calls.append(a[-1]) or real(*a)
    with torch.no_grad():
        c.sequence.margins(c.model.get_decoder(), ids, None, allowed)
    assert calls == [None, *range(2, len(c.names))]  # the anchor, then every allowed owner
    with torch.no_grad():  # a one-token prompt: nothing to weigh yet
        assert not c.sequence.margins(c.model.get_decoder(), ids[:, :1], None).any()


def test_composition_with_sequence_routing_keeps_alone_and_oracle_by_rows(federation, demo_data, tmp_path):
    from typer.testing import CliRunner

    from flexmoe.cli import app

    root, pkgs, anchor = federation
    args = ["eval", str(root / "model"), "--composition", "--data", str(demo_data), "--anchor", str(anchor)]
    args += ["--allow-unsigned", "--expert", str(pkgs[0]), "--max-blocks", "2", "--seq-len", "32"]
    args += ["--limit", "5"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "rows.json")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*args, "--sequence-routing", "--out", str(tmp_path / "seq.json")])
    assert r.exit_code == 0, r.output
    assert "Composition (routing: sequence)" in r.output
    by_rows, by_seq = (json.loads((tmp_path / f).read_text()) for f in ("rows.json", "seq.json"))
    assert by_seq["composition"]["routing"] == "sequence"
    r = CliRunner().invoke(
        app, [*args, "--sequence-routing", "--sequence-evidence", "rows", "--out", str(tmp_path / "sr.json")]
    )
    assert r.exit_code == 0, r.output
    by_seq_rows = json.loads((tmp_path / "sr.json").read_text())
    assert by_seq_rows["composition"]["routing"] == "sequence-rows"
    for key in ("anchor", "alone:code", "alone:math", "oracle:code", "oracle:math"):
        assert by_seq["perplexity"][key] == pytest.approx(by_rows["perplexity"][key], rel=1e-5), key
    hf = tmp_path / "hf"  # a plain HF model cannot be sequence-routed: a clear error, no traceback
    from conftest import make_hf_checkpoint

    make_hf_checkpoint(hf, "olmo2")
    r = CliRunner().invoke(app, ["eval", str(hf), "--data", str(demo_data), "--sequence-routing"])
    assert r.exit_code == 1 and "--sequence-routing" in str(r.exception)


def test_sequence_routing_generates_with_the_prefill_choice_for_decode_steps(federation):
    """HF generate: the prefill is routed per position; each decode step (whatever transformers calls
    the cache argument) reuses the choice at the end of the prefill instead of a wrong-shaped pass."""
    from flexmoe.runtime import from_pretrained

    root, _, _ = federation
    c = from_pretrained(root / "model", device="cpu", trust=ALLOW_UNSIGNED, sequence_routing=True)
    assert c.sequence.prompt_evidence is None  # a base model: the prompt is chosen by the likelihood
    seen, real = [], c.sequence.mask_for_call

    def spy(*args):
        mask = real(*args)
        seen.append(None if mask is None else tuple(mask.shape))
        return mask

    c.sequence.mask_for_call = spy
    ids = torch.tensor([[1, 5, 9, 13], [0, 7, 8, 21]])
    attn = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    out = c.model.generate(
        input_ids=ids, attention_mask=attn, max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 7)
    E = len(c.names)
    assert [s for s in seen if s is not None] == [(2, 4, E), (2, E), (2, E)]


def test_route_attributes_what_sequence_routing_served(federation):
    """``route --sequence-routing``: each expert's share is that of the per-position choice (the owners
    not chosen at a position get nothing there), not that of the rows alone."""
    from typer.testing import CliRunner

    from flexmoe.cli import app
    from flexmoe.moe import Routing, routing
    from flexmoe.runtime import from_pretrained, shares

    root, _, _ = federation
    text = "def add(a, b):\n    return a + b  # 2 + 3 = 5"
    args = ["route", str(root / "model"), "--text", text, "--json", "--allow-unsigned"]
    r = CliRunner().invoke(app, [*args, "--sequence-routing"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    c = from_pretrained(root / "model", device="cpu", trust=ALLOW_UNSIGNED, sequence_routing=True)
    ids = c.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        chosen = c.sequence.mask(c.model, ids)
        c.sequence = None
        with routing(Routing(mask=chosen, record=True)) as rec:
            c.model(input_ids=ids)
    want = shares(c.names, rec.weights.reshape(-1, len(c.names)).sum(0))
    assert got == pytest.approx(want, abs=1e-6)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-6)
