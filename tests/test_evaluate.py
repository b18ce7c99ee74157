"""Evaluation: metrics on hand-computed cases, task construction, baselines, the demo at reduced size."""

import json
import math

import pytest
import torch
from transformers import Olmo2Config, Olmo2ForCausalLM

from flexmoe.errors import FlexmoeError
from flexmoe.evaluate import baselines as B
from flexmoe.evaluate.metrics import (
    HFLM,
    exact_match,
    first_number,
    greedy,
    multiple_choice,
    number_finished,
    perplexity,
    wilson,
)
from flexmoe.evaluate.run import EvalSettings, evaluate_lm
from flexmoe.evaluate.tasks import load_tasks
from flexmoe.tokenizer import train_tokenizer

DOCS = ["Answer: 42\n", "the cat sat on the mat.", "a dog ran far away", "zz yy xx"] * 20


class UnigramLM:
    """log_probs are the same fixed distribution at every position."""

    def __init__(self, tokenizer, logp: torch.Tensor):
        self.tokenizer, self.logp = tokenizer, logp

    def token_logprobs(self, ids, mask, prefix_len=None):
        return self.logp[ids[:, 1:]]

    def next_logprobs(self, ids, mask, last):
        return self.logp.expand(len(ids), -1).clone()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DOCS, vocab_size=300)


def test_wilson_interval():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_perplexity_of_uniform_model_is_vocab_size(tok):
    V = len(tok)
    lm = UnigramLM(tok, torch.full((V,), -math.log(V)))
    r = perplexity(lm, DOCS, seq_len=8)
    assert r["perplexity"] == pytest.approx(V, rel=1e-5) and r["tokens"] == r["blocks"] * 7


def test_multiple_choice_sum_vs_length_normalised(tok):
    V = len(tok)
    logp = torch.full((V,), -20.0)
    dog = tok(" dog", add_special_tokens=False)["input_ids"]
    cat = tok(" cat", add_special_tokens=False)["input_ids"]
    logp[dog] = -1.0 / len(dog)  # " dog": -1.0 in total, 4 bytes
    logp[cat] = -0.6 / len(cat)  # " cat cat": -1.2 in total, 8 bytes
    lm = UnigramLM(tok, logp)
    item = {"context": "the", "choices": [" dog", " cat cat"], "answer": 1}
    n_ctx = len(tok("the")["input_ids"])
    by_hand = [float(logp[tok("the" + c)["input_ids"][n_ctx:]].sum()) for c in item["choices"]]
    assert by_hand[0] > by_hand[1]  # the sum prefers the short choice ...
    assert by_hand[1] / 8 > by_hand[0] / 4  # ... per byte, the long one
    s = multiple_choice(lm, [item])
    assert s["acc"].value == 0.0 and s["acc_norm"].value == 1.0 and s["acc"].n == 1


def test_exact_match_through_greedy_generation(tok):
    V = len(tok)
    target = tok(" 42", add_special_tokens=False)["input_ids"][0]
    logp = torch.full((V,), -30.0)
    logp[target] = 0.0
    lm = UnigramLM(tok, logp.log_softmax(-1))
    items = [
        {"prompt": "Answer:", "answer": tok.decode([target]).strip().split()[0]},
        {"prompt": "Answer:", "answer": "41"},
    ]
    s = exact_match(lm, items, max_new_tokens=3)
    assert s.value == 0.5 and s.n == 2
    assert first_number("x = 1,250.5 then 3") == "1250.5" and first_number("-3/4") == "-3/4"
    assert first_number("none") is None


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return Olmo2ForCausalLM(
        Olmo2Config(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).eval()


def test_scoring_only_the_continuation_matches_full_logits():
    """HFLM projects to the vocabulary only where a score is read; the numbers must not change."""
    lm = HFLM(_tiny_model(), None)
    ids = torch.randint(3, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    prefix = torch.tensor([5, 1, 11])
    full = lm.token_logprobs(ids, mask)
    part = lm.token_logprobs(ids, mask, prefix)
    for r, (p, n) in enumerate(zip(prefix.tolist(), mask.sum(1).tolist(), strict=True)):
        torch.testing.assert_close(part[r, p - 1 : n - 1], full[r, p - 1 : n - 1])
        assert not part[r, : p - 1].any() and not part[r, n - 1 :].any()
    last = torch.tensor([11, 8, 4])
    lm._split = False
    torch.testing.assert_close(
        HFLM(lm.model, None).next_logprobs(ids, mask, last), lm.next_logprobs(ids, mask, last)
    )


def test_a_head_with_forward_hooks_is_scored_on_the_full_layout():
    """A position-dependent head hook (flexmoe's owner corrections) must see [B, T, V] and apply."""
    model = _tiny_model()
    ids = torch.randint(3, 300, (2, 10))
    mask, prefix = torch.ones_like(ids), torch.tensor([4, 6])
    plain = HFLM(model, None).token_logprobs(ids, mask, prefix)

    def hook(module, args, out):
        assert out.dim() == 3  # [B, T, V]: the hook can tell positions apart
        out = out.clone()
        out[:, 5:, 7] += 3.0  # from position 5 on, token 7 is likelier
        return out

    model.get_output_embeddings().register_forward_hook(hook)
    lm = HFLM(model, None)
    assert not lm._split
    hooked = lm.token_logprobs(ids, mask, prefix)
    moved = (hooked - plain).abs() > 1e-6
    assert moved[:, 5:].all() and not moved[0, 3:5].any()


def test_greedy_stops_only_when_the_number_is_complete(tok):
    assert number_finished("12 is") and number_finished(" 7\n")
    assert (
        not number_finished("12")
        and not number_finished("12.")
        and not number_finished("1,")
        and not number_finished("x")
    )
    V = len(tok)
    logp = torch.full((V,), -30.0)
    logp[tok(" 42", add_special_tokens=False)["input_ids"][0]] = 0.0
    lm = UnigramLM(tok, logp.log_softmax(-1))
    calls = []
    lm.next_logprobs = lambda ids, mask, last, f=lm.next_logprobs: calls.append(1) or f(ids, mask, last)
    short = greedy(lm, ["Answer:", "a"], max_new_tokens=8, done=number_finished)
    assert len(calls) == 2 and all(first_number(g) == "42" for g in short)  # " 42 42": stop after two
    assert [first_number(g) for g in greedy(lm, ["Answer:", "a"], max_new_tokens=8)] == ["42", "42"]


@pytest.mark.parametrize("moe", [False, True])
def test_greedy_from_the_kv_cache_equals_recomputing_the_prefix(tok, moe):
    """Prompts of different lengths (right-padded in one batch), a dense model and an MoE with top-2
    of 3 experts: the cached decode generates exactly the recomputed decode's tokens, and only a model
    declared cacheable takes that path."""
    model = _tiny_model(seed=3)
    if moe:
        model = B._moe_from([model, _tiny_model(seed=4), _tiny_model(seed=5)], top_k=2).eval()
    prompts = ["the cat sat", "a dog ran far away on the mat and", "zz", "Answer: the mat"]
    recomputed = greedy(HFLM(model, tok), prompts, max_new_tokens=12)
    cached = HFLM(model, tok, kv_cache=True)
    assert cached.kv_cache
    cached.next_logprobs = None  # the recomputing path would call it
    assert greedy(cached, prompts, max_new_tokens=12) == recomputed
    assert all(recomputed) and len(set(recomputed)) > 1  # text came out, and not the same for all


def test_soup_of_identical_models_is_the_model():
    m = _tiny_model()
    s = B.soup([m, m, m])
    x = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(s(x).logits, m(x).logits)
    a, b = _tiny_model(0), _tiny_model(1)
    avg = B.soup([a, b])
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(avg.state_dict()[k], (a.state_dict()[k] + b.state_dict()[k]) / 2)


def test_btm_with_one_expert_is_that_expert(tok):
    lm = HFLM(_tiny_model(), tok)
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    btm = B.BTMLM([lm])
    torch.testing.assert_close(btm.token_logprobs(ids, mask), lm.token_logprobs(ids, mask))
    last = torch.tensor([8, 5])
    torch.testing.assert_close(btm.next_logprobs(ids, mask, last), lm.next_logprobs(ids, mask, last))


def test_btm_weights_follow_the_prompt(tok):
    V = len(tok)
    good_tok = 5
    sharp = torch.full((V,), -30.0)
    sharp[good_tok] = 0.0
    a = UnigramLM(tok, sharp.log_softmax(-1))  # predicts token 5 perfectly
    b = UnigramLM(tok, torch.full((V,), -math.log(V)))  # uniform
    ids = torch.full((1, 6), good_tok)
    mask = torch.ones_like(ids)
    btm = B.BTMLM([a, b], tau=0.1, top=2)
    out = btm.token_logprobs(ids, mask, torch.tensor([4]))
    torch.testing.assert_close(
        out[0, -1], a.logp[good_tok], atol=1e-4, rtol=0
    )  # weight on the model that fits
    nxt = btm.next_logprobs(ids, mask, torch.tensor([5]))
    torch.testing.assert_close(nxt[0], a.logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_upcycled_moe_of_identical_models_is_the_model(top_k):
    """Upcycled MoEs renormalise top-k, so they start exactly at their dense parent for any k."""
    m = _tiny_model()
    moe = B._moe_from([m, m, m], top_k=top_k).eval()
    x = torch.randint(0, 300, (2, 10))
    torch.testing.assert_close(moe(x).logits, m(x).logits, atol=1e-5, rtol=1e-5)


def test_flops_model():
    cfg = Olmo2Config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=100352)
    dense = B.train_flops_per_token(cfg, "dense", 4096)
    anchored = B.train_flops_per_token(cfg, "anchored", 4096)
    assert 1.1 < anchored / dense < 1.5  # the paper's "about 1.3x dense fine-tuning"


def test_tasks_come_from_test_split_only(demo_data):
    tasks = load_tasks(demo_data)
    assert {"public_cloze", "code_cloze", "math_cloze", "legal_cloze", "math_answer"} <= set(tasks)
    for items in tasks.values():
        domain = items[0]["domain"]
        test_docs = [
            json.loads(x)["text"] for x in (demo_data / domain / "test.jsonl").read_text().splitlines()
        ]
        for it in items:
            if "choices" in it:
                assert len(it["choices"]) == 4 and 0 <= it["answer"] < 4
                true = it["context"][-60:] + it["choices"][it["answer"]]
                assert any(true in t for t in test_docs)  # the true continuation follows in a test doc
            else:
                assert it["prompt"].endswith("Answer:")
                assert any(it["prompt"][-80:] + " " + it["answer"] in t for t in test_docs)


def test_evaluate_lm_scores_only_what_is_asked(demo_data, tok):
    V = len(tok)
    lm = UnigramLM(tok, torch.full((V,), -math.log(V)))
    r = evaluate_lm(
        lm,
        demo_data,
        EvalSettings(
            seq_len=8, max_blocks=2, max_items=2, domains=("public", "legal"), only_tasks=("legal_cloze",)
        ),
    )
    assert list(r["perplexity"]) == ["public", "legal"] and list(r["tasks"]) == ["legal_cloze"]
    assert r["perplexity"]["legal"] == pytest.approx(V, rel=1e-5)  # uniform model: perplexity = V
    assert r["average"] == r["tasks"]["legal_cloze"]


def test_demo_end_to_end_at_reduced_size(tmp_path):
    from flexmoe.demo import run_demo

    r = run_demo(tmp_path, "test", quiet=True)
    for f in ("report.json", "report.md", "report.png"):
        assert (tmp_path / f).stat().st_size > 0
    rep = json.loads((tmp_path / "report.json").read_text())
    expected = {"public", "flexolmo", "model_soup", "btm", "btx", "unrestricted_moe"}
    expected |= {f"dense_{d}" for d in ("code", "math", "legal")}
    expected |= {f"flexolmo_without_{d}" for d in ("code", "math", "legal")}
    assert expected <= set(rep["models"])
    for m in rep["models"].values():
        assert set(m["perplexity"]) == {"public", "code", "math", "legal"}
        assert all(math.isfinite(v) for v in m["perplexity"].values()) and "average" in m
    assert rep["preset"] == "test" and rep["domains"] == ["public", "code", "math", "legal"]
    env = rep["environment"]  # what the numbers depend on besides the code
    assert env["torch"] == torch.__version__ and env["router_init"] in {"embed", "hidden"}
    assert env["transformers"] and env["python"].count(".") == 2
    assert f"router_init {env['router_init']}" in (tmp_path / "report.md").read_text()
    assert set(rep["seconds"]) >= {"corpora", "anchor", "compose"} and r["findings"]
    # On a CPU with two or more cores the independent trainings and evaluations ran side by side, so
    # every model they score was loaded from disk (the upcycled baselines included).
    from flexmoe.jobs import default_workers

    assert env["workers"] == default_workers("cpu") and 0 < rep["wall_seconds"]
    assert all((tmp_path / "models" / m / "upcycled.json").is_file() for m in ("btx", "unrestricted_moe"))
    priv = rep["privacy"]  # DP experts for one owner, their utility, and the audit of each model
    assert (
        priv["canaries_planted"]
        and set(priv["utility"]) == {"inf", "8"}
        and priv["dp"]["eps8"]["epsilon"] <= 8
    )
    assert {"public", "dense_legal", "flexolmo", "expert_legal", "expert_legal_dp_eps8"} <= set(priv["audit"])
    assert "## Privacy" in (tmp_path / "report.md").read_text()
    comp = rep["composition"]  # issue 13's block, exactly these keys
    assert set(comp) == {"owners", "public_change", "routing"}
    assert set(comp["owners"]) == {"code", "math", "legal"}
    assert all(
        set(o) == {"alone_gain", "retention", "optout_removed", "max_other_change", "oracle_retention"}
        for o in comp["owners"].values()
    )
    assert rep["headline"]["btm"]["cost"]["forward_passes"] == 4
    assert "## Composition" in (tmp_path / "report.md").read_text()
    # Owners sign their packages, the maintainer every composed model: all load under the strict default.
    from flexmoe.signing import MODEL_KIND, PACKAGE_KIND, Trust, verify_dir

    maintainer = Trust.from_paths([tmp_path / "keys" / "maintainer.pub"])
    composed = [m for m in (tmp_path / "models").iterdir() if (m / "flexmoe.json").is_file()]
    assert len(composed) >= 10 and all(verify_dir(m, MODEL_KIND, maintainer) for m in composed)
    for d in ("code", "math", "legal"):
        owner = Trust.from_paths([tmp_path / "owners" / d / "keys" / "owner.pub"])
        for pkg in (tmp_path / "owners" / d).glob("expert*"):
            assert verify_dir(pkg, PACKAGE_KIND, owner)
    # The dense baselines record their recipe: the owners' steps, stream and learning rate.
    from flexmoe.demo import BASELINE_RECIPE, demo_preset, dense_recipe
    from flexmoe.expert.train import EXPERT_PRESETS

    kept = json.loads((tmp_path / "models" / "dense_code" / BASELINE_RECIPE).read_text())
    p = demo_preset("test", {})
    assert kept["lr"] == EXPERT_PRESETS[p.expert].lr == dense_recipe(p).lr
    assert kept["steps"] == p.expert_steps and kept["public_mix"] == p.public_mix
    # Running again skips every finished step (resumable) and gives the same report.
    again = run_demo(tmp_path, "test", quiet=True)
    assert "anchor" not in again["seconds"] and "dp expert legal eps8" not in again["seconds"]
    assert again["models"]["flexolmo"]["perplexity"] == rep["models"]["flexolmo"]["perplexity"]


def test_resumed_demo_refuses_dense_baselines_of_another_recipe(tmp_path):
    """A dense expert kept from an earlier run must have been trained on this run's recipe, or BTM,
    soup and BTX would silently compare on other data or another learning rate."""
    from dataclasses import replace

    from flexmoe.demo import BASELINE_RECIPE, _recipe_record, demo_preset, dense_jobs, dense_recipe
    from flexmoe.fileio import write_json

    p = demo_preset("tiny", {})
    out = tmp_path / "models" / "dense_code"
    out.mkdir(parents=True)
    with pytest.raises(FlexmoeError, match="records no recipe") as e:
        dense_jobs(tmp_path / "models", tmp_path / "anchor", tmp_path / "data", p, True)
    assert "delete" in str(e.value) and "model_soup" in str(e.value)
    write_json(out / BASELINE_RECIPE, _recipe_record(replace(dense_recipe(p), lr=1e-3)))
    with pytest.raises(FlexmoeError, match=r"lr 0.001 \(this run: 0.002\)"):
        dense_jobs(tmp_path / "models", tmp_path / "anchor", tmp_path / "data", p, True)
    assert sorted(x.name for x in out.iterdir()) == [BASELINE_RECIPE]  # nothing touched
