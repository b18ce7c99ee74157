"""Privacy audits: edit distance, exposure, membership AUC on hand-computed cases; extraction on a model
that memorised a document; canary planting; the audit CLI end to end on tiny models."""

import json
import math

import pytest
import torch
from conftest import make_anchor_dir
from transformers import Olmo2Config, Olmo2ForCausalLM
from typer.testing import CliRunner

from flexmoe.audit.canaries import (
    PREFIX,
    exposure,
    exposure_from_scores,
    load_canaries,
    make_canaries,
    plant,
    plant_jsonl,
    save_canaries,
)
from flexmoe.audit.extraction import ExtractionConfig, extraction_attack, levenshtein, similarity
from flexmoe.audit.membership import auc, auc_interval, membership_auc
from flexmoe.cli import app
from flexmoe.data import read_documents
from flexmoe.evaluate.metrics import HFLM
from flexmoe.tokenizer import train_tokenizer

SECRET_DOC = (
    "Client 4471 of Lakeside Bank holds account 88-1093-552; the vault code is 7 3 9 1 and the "
    "branch manager is Ms. Okafor, reachable on extension 2210 every weekday."
)
OTHER_DOC = (
    "The committee met on a rainy Tuesday to review the quarterly budget, and after a long debate "
    "it approved new funding for the public library and the river walk."
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds synchronisation on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(
        [SECRET_DOC, OTHER_DOC] * 20 + [f"{PREFIX} 1 2 3 4 5 6 7 8 9 0"] * 5, vocab_size=300
    )


def _tiny(tok, seed=0):
    torch.manual_seed(seed)
    return Olmo2ForCausalLM(
        Olmo2Config(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )


@pytest.fixture(scope="module")
def memorised(tok, tmp_path_factory):
    """A tiny model trained on SECRET_DOC until it has it by heart, saved as an HF directory."""
    from flexmoe.data import tokenize

    model = _tiny(tok).train()
    ids = torch.tensor(tokenize([SECRET_DOC], tok))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.01:
            break
    out = tmp_path_factory.mktemp("mem") / "model"
    model.eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------------------------
# Hand-computed cases


def test_levenshtein_and_similarity():
    assert levenshtein(list(b"kitten"), list(b"sitting")) == 3
    assert levenshtein([], [1, 2]) == 2 and levenshtein([1, 2, 3], [1, 2, 3]) == 0
    assert levenshtein([1, 2, 3, 4], [2, 3, 4, 5]) == 2  # one deletion, one insertion
    assert similarity(list(b"kitten"), list(b"sitting")) == pytest.approx(1 - 3 / 7)
    assert similarity([], []) == 1.0


def test_exposure_by_hand():
    cands = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # N = 7 random secrets' NLLs
    mid = exposure_from_scores(2.5, cands, space_bits=20)
    assert mid["beaten_by"] == 2 and mid["exposure"] == pytest.approx(math.log2(8 / 3)) and not mid["at_cap"]
    top = exposure_from_scores(0.5, cands, space_bits=20)
    assert top["exposure"] == pytest.approx(3.0) and top["at_cap"]  # log2(N + 1): at least 3 bits
    assert top["extrapolated"] > 3.0  # the normal fit looks past the cap
    assert exposure_from_scores(9.0, cands, 20)["exposure"] == pytest.approx(0.0)


def test_membership_auc_by_hand():
    assert auc([5.0, 6.0, 7.0], [1.0, 2.0]) == 1.0  # perfectly separated
    assert auc([1.0, 2.0], [5.0, 6.0]) == 0.0
    assert auc([3.0, 3.0], [3.0, 3.0]) == 0.5  # identical scores: chance
    assert auc([3.0, 1.0], [2.0]) == 0.5
    assert auc([2.0, 4.0], [1.0, 3.0]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    lo, hi = auc_interval(0.75, 100, 100)
    assert lo < 0.75 < hi and hi - lo < 0.2


class FixedLossLM:
    """token_logprobs: -1 per token for documents that start like a member, -3 otherwise."""

    def __init__(self, tokenizer, member_first_tokens):
        self.tokenizer, self.first = tokenizer, set(member_first_tokens)

    def token_logprobs(self, ids, mask, prefix_len=None):
        member = torch.tensor([int(r[1]) in self.first for r in ids])
        return torch.where(member[:, None], -1.0, -3.0).expand(len(ids), ids.shape[1] - 1).clone()


def test_membership_auc_on_a_model_with_separated_losses(tok):
    members = ["alpha beta gamma", "alpha delta"]
    non_members = ["zeta eta theta", "zeta iota"]
    first = {tok(m)["input_ids"][1] for m in members}
    r = membership_auc(FixedLossLM(tok, first), members, non_members)
    assert r["auc"] == 1.0 and r["member_loss"] == pytest.approx(1.0) and r["non_member_loss"] == 3.0
    same = membership_auc(FixedLossLM(tok, set()), members, non_members)
    assert same["auc"] == 0.5


# --------------------------------------------------------------------------------------------------
# Canaries


def test_canaries_planting_and_files(tmp_path):
    cs = make_canaries(repeats=(1, 10), per_repeat=2, controls=2, length=6, seed=3)
    assert [c.repeats for c in cs] == [1, 1, 10, 10, 0, 0] and len({c.secret for c in cs}) == 6
    assert all(c.text.startswith(PREFIX) and len(c.secret.split()) == 6 for c in cs)
    docs = plant(["a", "b", "c"], cs, seed=0)
    assert len(docs) == 3 + 2 * 1 + 2 * 10 and docs.count(cs[2].text) == 10 and cs[4].text not in docs
    assert [d for d in docs if d in "abc"] == ["a", "b", "c"]  # the owner's documents keep their order
    src = tmp_path / "train.jsonl"
    src.write_text('{"id": "x", "text": "one"}\n{"id": "y", "text": "two"}\n')
    assert plant_jsonl(src, tmp_path / "planted.jsonl", cs) == 22
    rows = [json.loads(x) for x in (tmp_path / "planted.jsonl").read_text().splitlines()]
    assert {"id": "x", "text": "one"} in rows and sum(r["text"] == cs[0].text for r in rows) == 1
    save_canaries(tmp_path / "c.json", cs, 6)
    again, length = load_canaries(tmp_path / "c.json")
    assert again == cs and length == 6


class MemorisingLM:
    """Log-probability 0 for every token of one memorised text (position by position), -2 elsewhere."""

    def __init__(self, tokenizer, text):
        self.tokenizer, self.ids = tokenizer, tokenizer(text)["input_ids"]

    def token_logprobs(self, ids, mask, prefix_len=None):
        target = torch.full(ids.shape, -1)
        n = min(len(self.ids), ids.shape[1])
        target[:, :n] = torch.tensor(self.ids[:n])
        return torch.where(ids[:, 1:] == target[:, 1:], 0.0, -2.0)


def test_exposure_of_a_memorised_canary(tok):
    cs = make_canaries(repeats=(100,), per_repeat=1, controls=3, length=8, seed=1)
    r = exposure(MemorisingLM(tok, cs[0].text), cs, length=8, candidates=200)
    planted = r["canaries"]["r100-0"]
    assert planted["at_cap"] and planted["exposure"] == pytest.approx(math.log2(201))
    assert r["space_bits"] == pytest.approx(8 * math.log2(10)) and r["cap_bits"] == pytest.approx(
        math.log2(201)
    )
    # Controls share digits with the canary only by chance: far below the cap.
    assert r["mean_by_repeats"]["0"] < 4 and set(r["mean_by_repeats"]) == {"0", "100"}


# --------------------------------------------------------------------------------------------------
# Extraction


def test_extraction_finds_the_memorised_document_only(memorised, tok):
    from flexmoe.evaluate.run import load_lm

    cfg = ExtractionConfig(prefix_tokens=8, suffix_tokens=16, samples=2, documents=10, batch_size=4)
    lm = load_lm(memorised)
    hit = extraction_attack(lm, [SECRET_DOC], cfg)
    assert hit["rate"] == 1.0 and hit["extracted"] == 1 and hit["mean_best_similarity"] >= 0.9
    miss = extraction_attack(lm, [OTHER_DOC], cfg)
    assert miss["rate"] == 0.0 and miss["ci95"][0] == 0.0
    fresh = extraction_attack(HFLM(_tiny(tok, seed=1), tok), [SECRET_DOC], cfg)
    assert fresh["rate"] == 0.0 and fresh["mean_best_similarity"] < 0.5


def test_audit_cli_extraction_membership_exposure(memorised, tmp_path):
    (tmp_path / "secret.jsonl").write_text(json.dumps({"text": SECRET_DOC}) + "\n")
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": OTHER_DOC}) + "\n")
    runner = CliRunner()
    r = runner.invoke(
        app,
        ["audit", "extraction", str(memorised), "--data", str(tmp_path / "secret.jsonl"), "--documents", "1"]
        + [
            "--prefix-tokens",
            "8",
            "--suffix-tokens",
            "16",
            "--samples",
            "2",
            "--out",
            str(tmp_path / "x.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "extracted 1 of 1" in r.output and json.loads((tmp_path / "x.json").read_text())["rate"] == 1.0
    r = runner.invoke(
        app,
        ["audit", "membership", str(memorised), "--members", str(tmp_path / "secret.jsonl")]
        + ["--non-members", str(tmp_path / "other.jsonl")],
    )
    assert r.exit_code == 0 and "membership AUC 1.000" in r.output, r.output
    cs = make_canaries(repeats=(1,), per_repeat=1, controls=1, length=4)
    save_canaries(tmp_path / "canaries.json", cs, 4)
    r = runner.invoke(
        app,
        [
            "audit",
            "exposure",
            str(memorised),
            "--canaries",
            str(tmp_path / "canaries.json"),
            "--candidates",
            "20",
        ],
    )
    assert r.exit_code == 0 and "controls (never planted)" in r.output, r.output
    r = runner.invoke(app, ["audit", "extraction", str(memorised), "--data", str(tmp_path / "secret.jsonl")])
    assert r.exit_code != 0 and "No document has 288 tokens" in str(r.exception)


def test_canary_audit_end_to_end(demo_data, tmp_path):
    pytest.importorskip("opacus")
    docs = read_documents([demo_data / "public" / "train.jsonl"])[:80]
    anchor = make_anchor_dir(tmp_path / "anchor", "olmo2", docs)
    args = ["audit", "canaries", "--anchor", str(anchor), "--data", str(demo_data / "legal")]
    args += ["--workdir", str(tmp_path / "w"), "--steps", "2", "--batch-size", "4", "--seq-len", "64"]
    args += ["--repeats", "1,10", "--per-repeat", "1", "--candidates", "30", "--extraction-documents", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "w" / "audit.json").read_text())
    assert set(rep["models"]) == {"public", "dense", "expert", "dp_eps8"}
    for m in rep["models"].values():
        assert set(m) == {"exposure", "membership", "extraction"}
        assert set(m["exposure"]["mean_by_repeats"]) == {"0", "1", "10"}
        assert 0.0 <= m["membership"]["auc"] <= 1.0 and m["extraction"]["documents"] == 2
    manifest = json.loads((tmp_path / "w" / "experts" / "dp_eps8" / "expert.json").read_text())
    assert manifest["dp"]["target_epsilon"] == 8.0
    planted = (tmp_path / "w" / "data" / "train.jsonl").read_text()
    secrets = json.loads((tmp_path / "w" / "canaries.json").read_text())["canaries"]
    assert all(planted.count(c["secret"]) == c["repeats"] for c in secrets)
    stamp = (tmp_path / "w" / "experts" / "expert" / "expert.json").stat().st_mtime_ns
    again = CliRunner().invoke(app, args)  # resumable: every step's output exists and is kept
    assert again.exit_code == 0
    assert (tmp_path / "w" / "experts" / "expert" / "expert.json").stat().st_mtime_ns == stamp
