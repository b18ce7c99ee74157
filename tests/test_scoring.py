"""Scoring: multiple choice with lm-evaluation-harness conventions (hand-tokenised cases with the
project's byte-level BPE tokenizer) and perplexity intervals over documents."""

import pytest
import torch

from flexmoe.evaluate.metrics import choice_tokens, multiple_choice, split_choice
from flexmoe.tokenizer import train_tokenizer

DOCS = ["Answer: 42\n", "the cat sat on the mat.", "a dog ran far away", "zz yy xx"] * 20


class UnigramLM:
    """The same next-token distribution at every position: a choice's score is the sum of its tokens'."""

    def __init__(self, tokenizer, logp):
        self.tokenizer, self.logp = tokenizer, logp

    def token_logprobs(self, ids, mask, prefix_len=None):
        return self.logp[ids[:, 1:]]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, vocab_size=300)


def test_trailing_whitespace_moves_onto_the_continuation():
    assert split_choice("the cat ", "sat") == ("the cat", " sat")
    assert split_choice("x = 1\n", "y = 2") == ("x = 1", "\ny = 2")
    assert split_choice("a \n\t", "b") == ("a", " \n\tb")
    assert split_choice("the cat", " sat") == ("the cat", " sat")


def test_continuation_keeps_its_first_word(tok):
    # By hand: "the cat sat on the mat." is <bos> the Ġcat Ġsat Ġon Ġthe Ġmat . ; "the cat " alone ends
    # in a lone "Ġ" token, so cutting "the cat " + choice at len(enc("the cat ")) dropped "Ġsat".
    names = tok.convert_ids_to_tokens
    assert names(tok("the cat ")["input_ids"]) == ["<|bos|>", "the", "Ġcat", "Ġ"]
    ctx, cont = choice_tokens(tok, *split_choice("the cat ", "sat on the mat."))
    assert names(ctx) == ["<|bos|>", "the", "Ġcat"]
    assert names(cont) == ["Ġsat", "Ġon", "Ġthe", "Ġmat", "."]
    assert ctx + cont == tok("the cat sat on the mat.")["input_ids"]
    # A newline boundary (code and maths contexts end with one): the newline is scored with the line.
    ctx, cont = choice_tokens(tok, *split_choice("the cat\n", "sat"))
    assert names(ctx) == ["<|bos|>", "the", "Ġcat"] and names(cont) == ["Ċ", "sat"]


def test_first_word_decides_the_answer(tok):
    # Two choices that differ only in their first word: cut at the wrong boundary they tie.
    V = len(tok)
    logp = torch.full((V,), -5.0)
    sat, zz = tok.convert_tokens_to_ids(["Ġsat", "Ġzz"])
    logp[sat], logp[zz] = -0.1, -9.0
    lm = UnigramLM(tok, logp)
    item = {"context": "the cat ", "choices": ["zz on the mat.", "sat on the mat."], "answer": 1}
    s = multiple_choice(lm, [item])
    assert s["acc"].value == 1.0 and s["acc_norm"].value == 1.0


def test_scores_are_sums_of_continuation_logprobs_and_norm_is_per_character(tok):
    V = len(tok)
    logp = torch.full((V,), -50.0)
    a = choice_tokens(tok, "the cat", " éé")[1]  # 3 characters, 5 bytes
    b = choice_tokens(tok, "the cat", " zzz")[1]  # 4 characters, 4 bytes
    shared = set(a) & set(b)  # the leading "Ġ" of both: free, so the sums below are exact
    only_a, only_b = [t for t in a if t not in shared], [t for t in b if t not in shared]
    assert not set(only_a) & set(only_b)
    logp[list(shared)] = 0.0
    logp[only_a] = -3.0 / len(only_a)  # the sum over " éé" is -3.0
    logp[only_b] = -3.3 / len(only_b)  # the sum over " zzz" is -3.3
    lm = UnigramLM(tok, logp)
    # acc (sum): " éé" wins. Per character: -1.0 vs -0.825, " zzz" wins (per byte " éé" would: -0.6).
    item = {"context": "the cat ", "choices": ["éé", "zzz"], "answer": 1}
    s = multiple_choice(lm, [item])
    assert s["acc"].value == 0.0 and s["acc_norm"].value == 1.0
    assert s["acc"].n == 1


def test_paired_difference_on_the_same_items():
    from flexmoe.evaluate.metrics import Score
    from flexmoe.evaluate.report import paired_difference

    s = Score.of([True, False, True, True])
    assert (s.value, s.n, s.correct) == (0.75, 4, [1, 0, 1, 1])
    # a right on items 0-3, b on 0-1: differences 0, 0, 1, 1: mean 0.5, sample variance 1/3
    a = {"t": {"acc_norm": Score.of([1, 1, 1, 1]).as_dict()}}
    b = {"t": {"acc_norm": Score.of([1, 1, 0, 0]).as_dict()}}
    half = 1.96 * (1 / 3 / 4) ** 0.5
    r = paired_difference(a, b)
    assert r["difference"] == pytest.approx(50) and r["ci95"] == pytest.approx(
        [50 - 100 * half, 50 + 100 * half]
    )
    # the same model twice: no difference and no doubt, however wide its own interval
    assert paired_difference(a, a)["ci95"] == [0.0, 0.0]
    # two tasks (exact match pairs too) are averaged: variances 1/12 and (0.5 / 2) over 2 tasks
    a2 = a | {"m": {"exact_match": Score.of([1, 0]).as_dict()}}
    b2 = b | {"m": {"exact_match": Score.of([0, 0]).as_dict()}}
    r2 = paired_difference(a2, b2)
    assert r2["difference"] == pytest.approx(50) and r2["tasks"] == 2
    assert r2["ci95"][1] - 50 == pytest.approx(100 * 1.96 * (1 / 12 + 1 / 4) ** 0.5 / 2)
    # without per-item results (reports from before them) no paired interval is claimed
    assert paired_difference({"t": {"acc_norm": {"value": 1.0, "n": 4, "ci95": [0, 1]}}}, b) is None


def test_merging_verdict_reads_the_paired_interval():
    from flexmoe.evaluate.metrics import Score
    from flexmoe.evaluate.report import merging_verdict

    def model(correct):
        return {"details": {"tasks": {"t": {"acc_norm": Score.of(correct).as_dict()}}}}

    flex = [1] * 40 + [0] * 10
    models = {
        "flexolmo": model(flex),
        "model_soup": model([0] * 50),  # right nowhere: far behind
        "btx": model(flex[:-1] + [1]),  # one item apart: inside the interval
    }
    line = merging_verdict(models, "flexolmo")
    assert "model_soup +80.0 [" in line and "btx -2.0 [" in line
    assert line.endswith("NOT met against btx.")
    models["btx"] = model([0] * 25 + [1] * 25)
    assert merging_verdict(models, "flexolmo").endswith("met.")
    assert "NOT" not in merging_verdict(models, "flexolmo")
    # reports without per-item results claim nothing
    models["btm"] = {"details": {"tasks": {"t": {"acc_norm": {"value": 0.5, "n": 50, "ci95": [0, 1]}}}}}
    assert merging_verdict(models, "flexolmo") is None


def test_bootstrap_interval_over_documents():
    from flexmoe.evaluate.metrics import bootstrap_ppl

    # Identical documents: no spread, the interval collapses onto the point.
    lo, hi = bootstrap_ppl(torch.full((20,), 10.0), torch.full((20,), 5.0))
    assert lo == pytest.approx(7.389056, rel=1e-5) and hi == pytest.approx(lo)
    # Two kinds of document (loss 1 and 3 per token): the interval lies strictly between e^1 and e^3
    # and contains the pooled point e^2; documents with no scored token are ignored.
    nll = torch.tensor([1.0, 3.0] * 50 + [0.0])
    tokens = torch.tensor([1.0, 1.0] * 50 + [0.0])
    lo, hi = bootstrap_ppl(nll, tokens)
    assert 2.718 < lo < 7.389 < hi < 20.09


def test_perplexity_counts_documents(tok):
    from flexmoe.evaluate.metrics import perplexity

    V = len(tok)
    lm = UnigramLM(tok, torch.full((V,), -torch.log(torch.tensor(float(V)))))
    r = perplexity(lm, DOCS, seq_len=8)
    assert r["perplexity"] == pytest.approx(V, rel=1e-5)
    assert r["ci95"][0] == pytest.approx(V, rel=1e-4) and r["ci95"][1] == pytest.approx(V, rel=1e-4)
    assert 1 < r["documents"] <= len(DOCS) and r["tokens"] == r["blocks"] * 7
