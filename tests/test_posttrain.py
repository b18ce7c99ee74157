"""Post-training: chat data and template, assistant-only masking, progressive unfreezing, GRPO,
shared-tensor merging and exact opt-out, and the stock-transformers chat export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flexmoe.errors import FlexmoeError

# --------------------------------------------------------------------------------------------------
# Chat data


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "row, words",
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
        ({"messages": []}, "empty"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "non-string"),
        ({"text": "hello"}, "no list field 'messages'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_chat_validation_names_file_and_line(tmp_path, row, words):
    from flexmoe.chat import read_chat_file

    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    f = _write(tmp_path / "c.jsonl", [good, row])
    with pytest.raises(FlexmoeError) as e:
        read_chat_file(f)
    assert f"{f}:2" in str(e.value) and words in str(e.value)


def test_demo_chat_sets_are_deterministic_and_tasks_held_out(tmp_path):
    from flexmoe.chat import chat_splits
    from flexmoe.chat_data import build_chat_sets, correct, read_tasks

    a = build_chat_sets(tmp_path / "a", n_train=120, n_tasks=20)
    build_chat_sets(tmp_path / "b", n_train=120, n_tasks=20)
    for d in a:
        for split in ("train", "valid", "tasks", "rl"):
            assert (tmp_path / "a" / d / f"{split}.jsonl").read_bytes() == (
                tmp_path / "b" / d / f"{split}.jsonl"
            ).read_bytes()
        train, _ = chat_splits(tmp_path / "a" / d)
        trained = {c[-2]["content"] for c in train}
        for split in ("tasks", "rl"):
            tasks = read_tasks(tmp_path / "a" / d / f"{split}.jsonl")
            assert tasks and not trained & {t["messages"][-1]["content"] for t in tasks}
    # the answer checks accept the reference replies' form and reject wrong answers
    assert correct("3 + 4 = 7. The answer is 7.", "7", "number") and not correct(
        "The answer is 8.", "7", "number"
    )
    assert correct("`'stone'.upper()` evaluates to STONE.", "STONE", "exact")
    assert not correct("`len('stone')` evaluates to 4.", "5", "exact")
    assert correct("The licensee is Acme.", "Acme", "contains") and not correct("Acmeo", "Acme", "contains")


# --------------------------------------------------------------------------------------------------
# Template and masking


@pytest.fixture(scope="module")
def chat_tok(demo_data):
    from flexmoe.chat import add_chat_template
    from flexmoe.data import load_splits
    from flexmoe.tokenizer import train_tokenizer

    tok = train_tokenizer(load_splits([demo_data / "public"]).train[:200], vocab_size=400)
    assert add_chat_template(tok) == 2
    return tok


def test_template_renders_olmo3_style_and_masks_assistant_tokens_only(chat_tok):
    from flexmoe.chat import IM_END, encode_conversation, prompt_ids

    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "It is 6."},
    ]
    text = chat_tok.apply_chat_template(conv, tokenize=False)
    assert text == (
        "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3 + 3?<|im_end|>\n"
        "<|im_start|>assistant\nIt is 6.<|im_end|>\n"
    )
    ids, mask = encode_conversation(chat_tok, conv)
    assert chat_tok.decode(ids) == text  # our encoding renders exactly the template
    end = chat_tok.convert_tokens_to_ids(IM_END)
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    assert chat_tok.decode(trained) == f"4{IM_END}It is 6.{IM_END}"
    assert trained.count(end) == 2 and sum(mask) == len(trained)
    # the generation prompt is the template's, up to the assistant header
    p = prompt_ids(chat_tok, conv[:2])
    assert chat_tok.decode(p) == chat_tok.apply_chat_template(
        conv[:2], tokenize=False, add_generation_prompt=True
    )


def test_chat_rows_label_only_assistant_tokens(chat_tok):
    from flexmoe.chat import chat_rows, encode_conversation
    from flexmoe.training import IGNORE, LabeledRows

    conv = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}]
    ids, mask = encode_conversation(chat_tok, conv)
    rows = chat_rows([conv] * 4, chat_tok, len(ids))
    assert isinstance(rows, LabeledRows) and len(rows) == 4
    assert rows.ids[0].tolist() == ids
    assert [lab != IGNORE for lab in rows.labels[0].tolist()] == mask
    kept = rows.labels[0] != IGNORE
    assert torch.equal(rows.labels[0][kept], rows.ids[0][kept])
    # rows without an assistant token carry no loss (an evaluation batch of them would be NaN): left out
    long = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}]
    rows = chat_rows([long], chat_tok, 8)
    assert 1 <= len(rows) < len(encode_conversation(chat_tok, long)[0]) // 8
    assert bool((rows.labels != IGNORE).any(1).all())


def test_new_chat_rows_start_at_the_mean_embedding(tmp_path, demo_data):
    from conftest import make_anchor_dir
    from transformers import AutoModelForCausalLM

    from flexmoe.chat import add_chat_template
    from flexmoe.data import load_splits
    from flexmoe.tokenizer import load_tokenizer

    anchor = make_anchor_dir(tmp_path / "a", "olmo2", load_splits([demo_data / "public"]).train[:100])
    model, tok = AutoModelForCausalLM.from_pretrained(str(anchor)), load_tokenizer(anchor)
    n = len(tok)
    old_in = model.get_input_embeddings().weight[:n].mean(0).clone()
    add_chat_template(tok, model)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == n + 2
    assert torch.allclose(emb[n], old_in) and torch.allclose(emb[n + 1], old_in)
    assert torch.allclose(head[n], head[:n].mean(0))


# --------------------------------------------------------------------------------------------------
# Progressive unfreezing: exact trainable sets


def _groups(model, stage, freeze):
    from flexmoe.expert.stages import _group, select_parameters

    select_parameters(model, stage, freeze)
    on = {_group(n) for n, p in model.named_parameters() if p.requires_grad}
    off = {_group(n) for n, p in model.named_parameters() if not p.requires_grad}
    return on, off


def test_each_stage_trains_exactly_its_parameter_set(tmp_path, demo_data):
    from conftest import make_anchor_dir

    from flexmoe.data import load_splits
    from flexmoe.expert.stages import expert_model

    docs = load_splits([demo_data / "public"]).train[:100]
    anchor = make_anchor_dir(tmp_path / "a", "olmo2", docs)
    model, _ = expert_model(anchor, owner_docs=docs[:20])
    own = {"owner FFN", "owner router row"}
    everything = {
        "owner FFN",
        "owner router row",
        "public router row",
        "anchor FFN",
        "embeddings and LM head",
        "attention",
        "norms",
    }
    assert _groups(model, "mid", False) == (own, everything - own)
    assert _groups(model, "sft", False) == (
        own | {"embeddings and LM head"},
        everything - own - {"embeddings and LM head"},
    )
    assert _groups(model, "rl", False) == (everything - {"public router row"}, {"public router row"})
    for stage in ("mid", "sft", "rl"):
        assert _groups(model, stage, True) == (own, everything - own)
    # names, not only groups: sft trains the embedding and head matrices and nothing else shared
    from flexmoe.expert.stages import select_parameters

    select_parameters(model, "sft", False)
    shared_on = {
        n
        for n, p in model.named_parameters()
        if p.requires_grad and ".mlp.experts.1." not in n and ".mlp.router.1." not in n
    }
    assert shared_on == {"model.embed_tokens.weight", "lm_head.weight"}


# --------------------------------------------------------------------------------------------------
# GRPO pieces


def test_group_advantages_and_clipped_loss():
    from flexmoe.expert.grpo import clipped_pg_loss, group_advantages

    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4)
    assert torch.equal(adv[1], torch.zeros(4))  # nothing to learn from a group that all agree
    mask = torch.tensor([[True, True, False]])
    logp = torch.zeros(1, 3, requires_grad=True)
    clipped_pg_loss(logp, torch.zeros(1, 3), torch.tensor([2.0]), mask, 0.2).backward()
    assert torch.allclose(
        logp.grad, torch.tensor([[-1.0, -1.0, 0.0]])
    )  # raises the good reply, padding ignored
    # beyond the clip range a positive advantage gives no more gradient
    far = torch.full((1, 3), 0.5, requires_grad=True)
    clipped_pg_loss(far, torch.zeros(1, 3), torch.tensor([1.0]), mask, 0.2).backward()
    assert torch.equal(far.grad, torch.zeros(1, 3))


def test_kl_penalty_is_zero_at_the_reference_and_grows_away_from_it():
    from flexmoe.expert.grpo import kl_penalty

    mask = torch.tensor([[True, True, False], [True, False, False]])
    same = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    assert float(kl_penalty(same, same, mask)) == 0.0
    # one token 1 nat more likely under the policy than under the reference: e^-1 + 1 - 1 = e^-1
    logp = same.clone().requires_grad_(True)
    with torch.no_grad():
        logp[0, 0] += 1.0
    k = kl_penalty(logp, same, mask)
    assert torch.allclose(k, torch.tensor(math.exp(-1) / 2 / 2))  # that reply: 2 tokens; 2 replies
    k.backward()
    assert float(logp.grad[0, 0]) > 0 and float(logp.grad[0, 2]) == 0  # pulled back; padding ignored


# --------------------------------------------------------------------------------------------------
# Merging


def test_mean_merge_counts_the_anchor_and_ties_keeps_lone_changes():
    from flexmoe.compose_shared import merge_mean, merge_ties

    base = torch.zeros(4)
    d1, d2 = torch.tensor([3.0, 0.0, 1.0, -1.0]), torch.tensor([3.0, 0.0, -2.0, 0.0])
    assert torch.allclose(merge_mean(base, [d1, d2], 2), torch.tensor([2.0, 0.0, -1 / 3, -1 / 3]))
    assert torch.allclose(merge_mean(base, [d1], 3), d1 / 4)  # two experts without a change dilute it
    t = merge_ties(base, [d1, d2], 2, density=1.0)
    assert torch.allclose(t, torch.tensor([3.0, 0.0, -2.0, -1.0]))  # sign election, disjoint mean
    assert torch.allclose(merge_ties(base, [d1], 3, density=1.0), d1)  # a lone change is kept whole
    assert torch.count_nonzero(merge_ties(torch.zeros(10), [torch.arange(10.0)], 1, density=0.2)) == 2


def test_disjoint_merge_keeps_lone_changes_whole_and_averages_shared_ones():
    from flexmoe.compose_shared import merge_disjoint

    base = torch.ones(4)
    d1, d2 = torch.tensor([2.0, 0.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, -2.0, 6.0])
    # entry 0: only d1 changed it (kept whole, not diluted by d2 or the anchor); entry 2: both (mean)
    assert torch.equal(merge_disjoint(base, [d1, d2], 3), torch.tensor([3.0, 1.0, 2.0, 7.0]))
    assert torch.equal(merge_disjoint(base, [d1], 3), base + d1)


def test_sum_merge_keeps_every_change_whole():
    from flexmoe.compose_shared import merge_sum

    base = torch.ones(3)
    d1, d2 = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([1.0, -1.0, 0.0])
    assert torch.equal(merge_sum(base, [d1], 3), base + d1)  # no dilution by experts without a change
    assert torch.equal(merge_sum(base, [d1, d2], 2), torch.tensor([3.0, 0.0, 3.0]))  # changes add up


# --------------------------------------------------------------------------------------------------
# End to end on a tiny anchor: anchor SFT, stages, compose, exact opt-out, stock export


@pytest.fixture(scope="module")
def base_anchor(tmp_path_factory, demo_data):
    """A random tiny OLMo 2 anchor (seconds to build; post-training logic does not need a good one)."""
    from conftest import make_anchor_dir

    from flexmoe.data import load_splits

    root = tmp_path_factory.mktemp("base")
    return make_anchor_dir(root / "anchor", "olmo2", load_splits([demo_data / "public"]).train[:100])


@pytest.fixture(scope="module")
def post(tmp_path_factory, base_anchor):
    from flexmoe.anchor_sft import sft_anchor
    from flexmoe.chat_data import build_chat_sets
    from flexmoe.expert.stages import settings_for, train_stage

    root = tmp_path_factory.mktemp("post")
    chat = root / "chat"
    build_chat_sets(chat, n_train=60, n_tasks=8)
    anchor = root / "anchor-sft"
    sft_anchor(base_anchor, chat / "public", anchor, steps=3, batch_size=4, seq_len=64, quiet=True)
    pk = {}
    small = {"steps": 2, "batch_size": 4, "seq_len": 64}
    for d in ("code", "math", "legal"):
        pk[d] = root / d
        train_stage(
            anchor, chat / d, d, pk[d], settings_for("sft", **small), public=chat / "public", quiet=True
        )
    pk["math-frozen"] = root / "math-frozen"
    train_stage(
        anchor,
        chat / "math",
        "math",
        pk["math-frozen"],
        settings_for("sft", freeze_shared=True, **small),
        quiet=True,
    )
    pk["math-rl"] = root / "math-rl"
    rl = settings_for("rl", steps=1, batch_size=2, grpo={"group_size": 2, "max_new_tokens": 4})
    train_stage(anchor, chat / "math", "math", pk["math-rl"], rl, from_package=pk["math"], quiet=True)
    return {"anchor": anchor, "chat": chat, "root": root, **pk}


def test_anchor_sft_publishes_a_chat_template(post):
    from flexmoe.tokenizer import load_tokenizer

    tok = load_tokenizer(post["anchor"])
    assert "<|im_start|>user" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    cfg = json.loads((post["anchor"] / "config.json").read_text())
    assert cfg["vocab_size"] == len(tok)
    meta = json.loads((post["anchor"] / "flexmoe_anchor.json").read_text())
    assert meta["train_config"]["schedule"] == "linear"  # BAR SFT: linear to zero


def test_sft_adds_the_mine_vs_public_routing_loss_only_with_public_rows(post):
    from flexmoe.chat import chat_rows, chat_splits
    from flexmoe.expert.stages import expert_model, settings_for, stage_step
    from flexmoe.tokenizer import load_tokenizer

    tok = load_tokenizer(post["anchor"])
    model, _ = expert_model(post["anchor"], post["math"])
    model.train()
    own = chat_rows(chat_splits(post["chat"] / "math")[0], tok, 64)
    pub = chat_rows(chat_splits(post["chat"] / "public")[0], tok, 64)
    batch = (torch.cat([own.ids[:2], pub.ids[:2]]), torch.cat([own.labels[:2], pub.labels[:2]]))
    s = settings_for("sft")
    assert s.router_aux == 0.1 and s.public_mix == 0.6  # the defaults chosen on validation tasks
    plain = stage_step(settings_for("sft", router_aux=0.0), model, None, tok, pub.ids).loss_fn(model, batch)
    with_aux = stage_step(s, model, None, tok, pub.ids).loss_fn(model, batch)
    no_public = stage_step(s, model, None, tok, None).loss_fn(model, batch)
    assert float(with_aux.detach()) > float(plain.detach()) and torch.isclose(no_public, plain)
    # the extra term trains the owner's router row: its gradient changes
    model.zero_grad()
    plain.backward()
    g_plain = model.model.layers[0].mlp.router[1].weight.grad.clone()
    model.zero_grad()
    with_aux.backward()
    assert not torch.allclose(model.model.layers[0].mlp.router[1].weight.grad, g_plain)


def test_packages_carry_exactly_the_shared_deltas_their_stage_trained(post):
    from flexmoe.expert.package import SHARED_FILE, verify

    m = verify(post["math"])
    assert set(m["shared_deltas"]["tensors"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert SHARED_FILE in m["files"] and m["stage"]["trainable"] == [
        "embeddings and LM head",
        "owner FFN",
        "owner router row",
    ]
    frozen = verify(post["math-frozen"])
    assert "shared_deltas" not in frozen and not (post["math-frozen"] / SHARED_FILE).exists()
    rl = verify(post["math-rl"])
    assert rl["stage"]["from"]["stage"] == "sft" and [s["stage"] for s in rl["stages"]] == ["sft", "rl"]
    assert {"attention", "norms", "anchor FFN"} <= set(rl["stage"]["trainable"])  # rl unfroze everything
    assert m["training"]["schedule"] == "linear" and rl["training"]["schedule"] == "constant"  # as BAR
    # a tampered delta file is refused
    bad = post["root"] / "bad"
    import shutil

    shutil.copytree(post["math"], bad)
    with open(bad / SHARED_FILE, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(FlexmoeError):
        verify(bad)


def _tensors(model_dir: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                out[f"{f.name}:{k}" if f.name.startswith("flexmoe") else k] = (
                    str(t.dtype),
                    tuple(t.shape),
                    t.numpy().tobytes(),
                )
    return out


@pytest.mark.parametrize("method", ["disjoint", "mean", "ties", "sum"])
def test_opt_out_after_post_training_is_bit_identical(post, tmp_path, method):
    from flexmoe.compose import UNSIGNED_OK, ComposeSettings, compose, remove

    a, b, c = post["code"], post["math"], post["legal"]
    full = compose(
        post["anchor"],
        [a, b, c],
        tmp_path / "abc",
        ComposeSettings(shared_merge=method),
        provenance=UNSIGNED_OK,
    )
    assert full["shared_merge"]["method"] == method and set(full["shared_merge"]["deltas"]) == {
        "code",
        "math",
        "legal",
    }
    remove(tmp_path / "abc", "math", tmp_path / "ac-removed")
    compose(
        post["anchor"], [a, c], tmp_path / "ac", ComposeSettings(shared_merge=method), provenance=UNSIGNED_OK
    )
    got, want = _tensors(tmp_path / "ac-removed"), _tensors(tmp_path / "ac")
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want)
    # and the merge really changed shared tensors (so the test could fail)
    anchor = _tensors(post["anchor"])
    assert got["model.embed_tokens.weight"] != anchor["model.embed_tokens.weight"]
    assert not (tmp_path / "ac-removed" / "flexmoe_shared" / "math.safetensors").exists()


def test_mean_merge_is_the_plain_average_over_anchor_and_experts(post, tmp_path):
    from safetensors.torch import load_file

    from flexmoe.compose import UNSIGNED_OK, ComposeSettings, compose

    compose(
        post["anchor"],
        [post["code"], post["math"]],
        tmp_path / "m",
        ComposeSettings(shared_merge="mean"),
        provenance=UNSIGNED_OK,
    )
    base = load_file(str(post["anchor"] / "model.safetensors"))["lm_head.weight"]
    deltas = [
        load_file(str(post[d] / "shared_delta.safetensors"))["lm_head.weight"] for d in ("code", "math")
    ]
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))["lm_head.weight"]
    assert torch.allclose(merged, (base + (base + deltas[0]) + (base + deltas[1])) / 3, atol=1e-6)


def test_sft_changes_only_the_owners_rows_and_the_default_merge_keeps_them_whole(post, tmp_path):
    from safetensors.torch import load_file

    from flexmoe.compose import UNSIGNED_OK, compose
    from flexmoe.expert.package import verify
    from flexmoe.expert.stages import StageSettings, owner_rows, settings_for
    from flexmoe.tokenizer import load_tokenizer

    tok = load_tokenizer(post["anchor"])
    s = settings_for("sft")
    rows = {
        d: owner_rows(s, post["chat"] / d, post["chat"] / "public", tok, len(tok)) for d in ("code", "math")
    }
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    assert all(bool(rows["math"][i]) for i in digits if i != tok.unk_token_id)  # math's own tokens
    assert not any(bool(rows["math"][i]) for i in tok.all_special_ids)  # the template stays the anchor's
    assert 0 < int(rows["math"].sum()) < len(tok) // 2
    assert verify(post["math"])["stage"]["data"]["owner_rows"] == int(rows["math"].sum())
    delta = load_file(str(post["math"] / "shared_delta.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        changed = delta[name].ne(0).any(1)
        assert bool(changed.any()) and not bool((changed & ~rows["math"]).any())
    assert settings_for("sft", shared_rows="all").shared_rows == "all"
    with pytest.raises(FlexmoeError, match="owner, all"):
        settings_for("sft", shared_rows="some")
    with pytest.raises(FlexmoeError, match="owner, all"):
        StageSettings(stage="sft", shared_rows="some")
    assert (
        owner_rows(settings_for("sft", shared_rows="all"), post["chat"] / "math", None, tok, len(tok)) is None
    )
    # the default merge (disjoint): a row only math changed carries math's change whole
    compose(post["anchor"], [post["code"], post["math"]], tmp_path / "m", provenance=UNSIGNED_OK)
    base = load_file(str(post["anchor"] / "model.safetensors"))["lm_head.weight"]
    code = load_file(str(post["code"] / "shared_delta.safetensors"))["lm_head.weight"]
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))["lm_head.weight"]
    only_math = delta["lm_head.weight"].ne(0).any(1) & code.eq(0).all(1)
    assert bool(only_math.any())
    want = base[only_math] + delta["lm_head.weight"][only_math]
    assert torch.allclose(merged[only_math], want, atol=1e-6)


def test_composed_export_has_a_working_chat_template_in_stock_transformers(post, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexmoe.compose import UNSIGNED_OK, compose

    compose(post["anchor"], [post["code"], post["math"]], tmp_path / "m", provenance=UNSIGNED_OK)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert type(model).__name__ == "FlexOlmoForCausalLM"
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    assert int(ids[0, 1]) == tok.convert_tokens_to_ids("<|im_start|>")
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_stage_refuses_an_anchor_without_chat_template(base_anchor, post, tmp_path):
    from flexmoe.expert.stages import settings_for, train_stage

    with pytest.raises(FlexmoeError, match="no chat template"):
        train_stage(base_anchor, post["chat"] / "math", "m", tmp_path / "x", settings_for("sft", steps=1))


def test_cli_runs_a_stage_and_refuses_dp_with_stages(post, tmp_path):
    from typer.testing import CliRunner

    from flexmoe.cli import app

    args = ["expert", "train", "--anchor", str(post["anchor"]), "--data", str(post["chat"] / "legal"),
            "--name", "legal", "--from", str(post["legal"]), "--stage", "sft", "--steps", "1",
            "--batch-size", "4", "--seq-len", "64"]  # fmt: skip
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "legal2")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "legal2" / "expert.json").read_text())
    assert [s["stage"] for s in m["stages"]] == ["sft", "sft"] and m["stage"]["from"]["name"] == "legal"
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--dp-epsilon", "8"])
    assert r.exit_code != 0 and "DP" in str(r.exception)


def test_post_training_block_has_the_issue_schema():
    from flexmoe.posttrain_demo import OWNERS, summarise

    def ev(acc, wf=(9, 10)):
        return {"accuracy": acc, "well_formed_count": list(wf)}

    res = {"anchor_sft": {"public": ev(0.8), **{d: ev(0.2) for d in OWNERS}}}
    for d in OWNERS:
        res[f"{d}-frozen"] = {d: ev(0.2, (5, 10)), "public": ev(0.8, (5, 10))}
        res[f"{d}-progressive"] = {d: ev(0.6), "public": ev(0.8)}
        res[f"{d}-bar"] = {d: ev(0.4), "public": ev(0.8)}
        res[f"oracle-{d}"] = {d: ev(0.4)}
    res["merged"] = {"public": ev(0.77), "code": ev(0.5), "math": ev(0.2), "legal": ev(0.6)}
    res["merged_bar"] = {"public": ev(0.7), "code": ev(0.3), "math": ev(0.2), "legal": ev(0.2)}
    out = summarise(res, True)
    block = out["post_training"]
    assert {"frozen", "progressive", "merged", "optout_bit_identical"} <= set(block)
    assert block["frozen"]["well_formed"] == 0.5 and block["progressive"]["well_formed"] == 0.9
    assert block["progressive"]["task_gain"]["code"] == pytest.approx(0.4)
    assert block["merged"]["retention"] == pytest.approx({"code": 0.75, "math": 0.0, "legal": 1.0})
    assert block["merged"]["oracle_retention"] == pytest.approx({d: 0.5 for d in OWNERS})
    assert block["merged"]["chat_regression"] == pytest.approx(3.0)
    # BAR's merge is measured against BAR's experts' gains (0.2 each), not ours
    bar = out["variants"]["merged_bar"]
    assert bar["experts"] == "bar" and bar["retention"]["code"] == pytest.approx(0.5)
    assert bar["chat_regression"] == pytest.approx(10.0)


def test_remove_refuses_a_tampered_kept_delta(post, tmp_path):
    from flexmoe.compose import UNSIGNED_OK, compose, remove

    compose(
        post["anchor"], [post["code"], post["math"], post["legal"]], tmp_path / "m", provenance=UNSIGNED_OK
    )
    kept = tmp_path / "m" / "flexmoe_shared" / "code.safetensors"
    with open(kept, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(FlexmoeError, match="does not match"):
        remove(tmp_path / "m", "math", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_post_training_demo_runs_end_to_end_at_test_size(tmp_path):
    """The whole section (preset ``test``: numbers meaningless): every recipe, merge, router option and
    evaluation runs, the report has the issue's schema, and opt-out is bit-identical."""
    from flexmoe.posttrain_demo import OWNERS, RECIPES, run_post_train_demo

    report = run_post_train_demo(tmp_path / "w", "test", quiet=True)
    block = report["post_training"]
    assert set(RECIPES) <= set(block) and block["optout_bit_identical"] is True
    assert set(block["merged"]["oracle_retention"]) == set(OWNERS)
    assert set(block["merged_sequence"]["oracle_retention"]) == set(OWNERS)
    details = report["post_training_details"]
    assert {
        "merged_mean",
        "merged_bar",
        "merged_frozen",
        "merged_sequence",
        "router_shared",
        "router_private",
    } <= set(details["merge_variants"])
    assert details["merge_variants"]["merged_sequence"]["experts"] == "progressive"
    assert all(f"oracle-{d}" in details["evaluations"] for d in OWNERS)
    png = (tmp_path / "w" / "post_training.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000  # the task accuracies, plotted
    assert all(f"oracle_sequence-{d}" in details["evaluations"] for d in OWNERS)
    meta = json.loads((tmp_path / "w" / "post" / "models" / "merged" / "flexmoe.json").read_text())
    assert meta["shared_merge"]["method"] == "disjoint"
    assert (tmp_path / "w" / "post" / "models" / "merged" / "signature.json").is_file()


@pytest.mark.parametrize("method", ["disjoint", "mean"])
def test_positions_given_to_one_owner_compute_with_its_own_shared_tensors(post, tmp_path, method):
    """Sequence routing with ``include=[math]`` gives every position to math: embeddings and LM head are
    then the anchor's plus math's delta (not the merge), so the model computes what math's own model
    computes; public alone computes with the anchor's; without sequence routing the merge stays, and
    opt-out drops math's corrections."""
    from flexmoe.anchor import load_anchor
    from flexmoe.compose import UNSIGNED_OK, ComposeSettings, compose, remove
    from flexmoe.expert.stages import expert_model
    from flexmoe.runtime import from_pretrained
    from flexmoe.sequence_routing import SequenceRouting
    from flexmoe.signing import ALLOW_UNSIGNED

    out = tmp_path / "m"
    pk = [post["code"], post["math"], post["legal"]]
    compose(post["anchor"], pk, out, ComposeSettings(shared_merge=method), provenance=UNSIGNED_OK)
    ids = torch.tensor([[5, 17, 40, 41, 42, 43, 7, 9]])
    own, _ = expert_model(post["anchor"], post["math"])
    with torch.no_grad():
        want = own.eval()(ids).logits
        seq = from_pretrained(
            out, include=["math"], trust=ALLOW_UNSIGNED, sequence_routing=True, device="cpu"
        )
        got = seq.model(ids).logits
        plain = from_pretrained(out, include=["math"], trust=ALLOW_UNSIGNED, device="cpu")
        merged = plain.model(ids).logits
        off = SequenceRouting(owner_tensors=False)
        merged_seq = (
            from_pretrained(out, include=["math"], trust=ALLOW_UNSIGNED, sequence_routing=off, device="cpu")
            .model(ids)
            .logits
        )
    assert seq.owner_tensors is not None and seq.owner_tensors.corrections
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(merged, want, atol=1e-3)  # the merge differs (so the test could fail)
    assert torch.allclose(merged_seq, merged, atol=1e-5)  # switched off: the merge
    # every position given to public alone computes with the anchor's own tensors, not the merge
    with torch.no_grad():
        kw = {"trust": ALLOW_UNSIGNED, "sequence_routing": True, "device": "cpu"}
        public = from_pretrained(out, exclude=["code", "math", "legal"], **kw).model(ids).logits
        assert torch.allclose(public, load_anchor(post["anchor"]).eval()(ids).logits, atol=1e-4)
    remove(out, "math", tmp_path / "without")
    compose(
        post["anchor"],
        pk[::2],
        tmp_path / "never",
        ComposeSettings(shared_merge=method),
        provenance=UNSIGNED_OK,
    )
    left, never = (
        from_pretrained(tmp_path / d, trust=ALLOW_UNSIGNED, sequence_routing=True, device="cpu").owner_tensors
        for d in ("without", "never")
    )
    # opt-out: the corrections are those of a composition that never had math
    assert left.corrections.keys() == never.corrections.keys()
    for name, per in never.corrections.items():
        assert per.keys() == left.corrections[name].keys()
        for j, c in per.items():
            assert torch.equal(c.rows, left.corrections[name][j].rows)
            assert torch.equal(c.values, left.corrections[name][j].values)


def test_generate_chat_answers_in_the_template(post, tmp_path):
    """``flexmoe generate --chat`` renders the prompt as a user turn and stops at ``<|im_end|>``: the
    CLI prints exactly the runtime's reply to that conversation (sequence routing on)."""
    import json
    import shutil

    from typer.testing import CliRunner

    from flexmoe.chat import generate as chat_generate
    from flexmoe.chat import reply_text
    from flexmoe.cli import app
    from flexmoe.compose import UNSIGNED_OK, compose
    from flexmoe.runtime import from_pretrained
    from flexmoe.signing import ALLOW_UNSIGNED

    compose(post["anchor"], [post["code"], post["math"]], tmp_path / "m", provenance=UNSIGNED_OK)
    argv = ["generate", str(tmp_path / "m"), "--prompt", "What is 2 + 3?", "--chat", "--max-new-tokens", "6"]
    res = CliRunner().invoke(app, [*argv, "--sequence-routing", "--allow-unsigned"])
    assert res.exit_code == 0, res.output
    c = from_pretrained(tmp_path / "m", trust=ALLOW_UNSIGNED, sequence_routing=True, device="cpu")
    assert c.sequence.prompt_evidence == "centroids"  # every owner shipped its prompt centroid
    [ids] = chat_generate(c.model, c.tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}]], 6)
    assert res.output.strip() == reply_text(c.tokenizer, ids).strip()
    # a post-trained federation (chat, every centroid) is sequence-routed by default, in the CLI too
    auto = from_pretrained(tmp_path / "m", trust=ALLOW_UNSIGNED, sequence_routing=None, device="cpu")
    assert auto.sequence is not None and auto.sequence.prompt_evidence == "centroids"
    res_auto = CliRunner().invoke(app, [*argv, "--allow-unsigned"])
    assert res_auto.exit_code == 0 and res_auto.output == res.output
    from flexmoe.serve.app import Settings, load

    assert load(Settings(tmp_path / "m", allow_unsigned=True)).sequence is not None  # serve's default
    assert load(Settings(tmp_path / "m", allow_unsigned=True, sequence_routing=False)).sequence is None
    # an owner without a centroid (a package from before them): the rows choose, for every owner
    old = tmp_path / "code-old"
    shutil.copytree(post["code"], old)
    m = json.loads((old / "expert.json").read_text())
    del m["prompt_centroid"]
    (old / "expert.json").write_text(json.dumps(m))
    compose(post["anchor"], [old, post["math"]], tmp_path / "m-old", provenance=UNSIGNED_OK)
    c = from_pretrained(tmp_path / "m-old", trust=ALLOW_UNSIGNED, sequence_routing=True, device="cpu")
    assert c.sequence.prompt_evidence == "rows" and c.sequence.prompt_centroids is None
    auto = from_pretrained(tmp_path / "m-old", trust=ALLOW_UNSIGNED, sequence_routing=None, device="cpu")
    assert auto.sequence is None  # not every owner has a centroid: the rows, as the stock export


def test_rl_stage_with_a_kl_penalty_runs_and_records_it(post, tmp_path):
    from flexmoe.expert.package import verify
    from flexmoe.expert.stages import settings_for, train_stage

    grpo = {"group_size": 2, "max_new_tokens": 4, "kl_coef": 0.1}
    rl = settings_for("rl", steps=1, batch_size=2, grpo=grpo)
    out = tmp_path / "math-rl-kl"
    train_stage(post["anchor"], post["chat"] / "math", "math", out, rl, from_package=post["math"], quiet=True)
    assert "kl_coef" in json.dumps(verify(out)["stage"])


def test_likelihood_evidence_runs_each_owners_own_model(post, tmp_path):
    """With post-trained owners, an owner's likelihood evidence comes from its own model (its FFN and
    its own embeddings and LM head: the owner tensors), against the anchor itself (public alone computes
    with the anchor's tensors, not the merge); and a previous call's owner, left in ``owner_at``, leaks
    into no evidence pass."""
    from flexmoe.anchor import load_anchor
    from flexmoe.compose import UNSIGNED_OK, ComposeSettings, compose
    from flexmoe.expert.stages import expert_model
    from flexmoe.runtime import from_pretrained
    from flexmoe.sequence_routing import SequenceRouting
    from flexmoe.signing import ALLOW_UNSIGNED

    out = tmp_path / "m"
    pk = [post["code"], post["math"], post["legal"]]
    compose(post["anchor"], pk, out, ComposeSettings(shared_merge="mean"), provenance=UNSIGNED_OK)
    ids = torch.tensor([[5, 17, 40, 41, 42, 43, 7, 9]])

    def token_lp(model):
        lp = model(ids).logits[:, :-1].float().log_softmax(-1)
        return lp.gather(-1, ids[:, 1:, None]).squeeze(-1)

    kw = {"trust": ALLOW_UNSIGNED, "device": "cpu"}
    with torch.no_grad():
        public = token_lp(load_anchor(post["anchor"]).eval())  # public alone: the anchor's own tensors
        own = token_lp(expert_model(post["anchor"], post["math"])[0].eval())
        c = from_pretrained(out, sequence_routing=SequenceRouting(evidence="likelihood"), **kw)
        assert c.owner_tensors is not None
        math = c.names.index("math")
        got = c.sequence.margins(c.model.get_decoder(), ids, None)
    torch.testing.assert_close(got[:, 1:, math], own - public, atol=1e-4, rtol=1e-4)
    for evidence in ("rows", "likelihood"):
        c.sequence.evidence = evidence
        with torch.no_grad():
            clean = c.sequence.margins(c.model.get_decoder(), ids, None)
            c.owner_tensors.owner_at = torch.full((1, 1), math)  # what the last call left
            stale = c.sequence.margins(c.model.get_decoder(), ids, None)
        torch.testing.assert_close(stale, clean, atol=1e-6, rtol=1e-6)
    # sequence routing switched off (the composition metrics' oracle): the merge, whatever was chosen last
    c.sequence, c.owner_tensors.owner_at = None, torch.full((1, 1), math)
    with torch.no_grad():
        merged = token_lp(from_pretrained(out, **kw).model)
        torch.testing.assert_close(token_lp(c.model), merged, atol=1e-5, rtol=1e-5)


def test_rows_evidence_reads_the_router_rows_on_the_merged_tensors(post, tmp_path):
    """The rows' evidence (a chat prompt's choice) reads each router row where the rows act, on the
    merged shared tensors; on the anchor's tensors an owner's row misses the rows its owner trained (the
    `small` post-training demo's prompts then went to public alone: task retention 0.2)."""
    from flexmoe.compose import UNSIGNED_OK, compose
    from flexmoe.runtime import from_pretrained
    from flexmoe.sequence_routing import SequenceRouting
    from flexmoe.signing import ALLOW_UNSIGNED

    compose(post["anchor"], [post["code"], post["math"]], tmp_path / "m", provenance=UNSIGNED_OK)
    ids = torch.tensor([[5, 17, 40, 41, 42, 43, 7, 9]])
    margins = {}
    for on in (True, False):
        seq = SequenceRouting(evidence="rows", owner_tensors=on)
        c = from_pretrained(tmp_path / "m", trust=ALLOW_UNSIGNED, sequence_routing=seq, device="cpu")
        assert (c.owner_tensors is not None) == on
        with torch.no_grad():
            margins[on] = c.sequence.margins(c.model, ids, None)
    torch.testing.assert_close(margins[True], margins[False], atol=1e-6, rtol=1e-6)


def test_calibrated_prompt_choice_reads_each_owner_on_its_own_public_level(monkeypatch):
    """A loud row (high margins on every text) wins the rows' prompt choice; calibrated, the owner whose
    evidence stands out most from its own public level wins among the allowed owners, and a prompt no
    owner claims stays public."""
    from flexmoe.sequence_routing import SequenceRouting

    s = SequenceRouting(evidence="rows")
    margins = torch.tensor([[[0.0, 5.0, 3.0]] * 3, [[0.0, -1.0, -2.0]] * 3])  # [B=2, S=3, E=3]
    monkeypatch.setattr(s, "margins", lambda *args, **kw: margins)
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert s.prompt_choice(None, ids).tolist() == [[True, True, False], [True, False, False]]
    s.prompt_scale = torch.tensor([[0.0, 4.0, -2.0], [1.0, 1.0, 1.0]])  # owner 1 is loud on public text
    assert s.prompt_choice(None, ids).tolist() == [[True, False, True], [True, False, False]]
    only_1 = torch.tensor([True, True, False])
    assert s.prompt_choice(None, ids, allowed=only_1).tolist() == [[True, True, False], [True, False, False]]


def test_runtime_calibrates_the_prompt_choice_on_public_chat(post, tmp_path):
    from flexmoe.chat import prompt_ids, read_chat_file
    from flexmoe.compose import UNSIGNED_OK, compose
    from flexmoe.errors import FlexmoeError
    from flexmoe.runtime import from_pretrained
    from flexmoe.signing import ALLOW_UNSIGNED

    compose(post["anchor"], [post["code"], post["math"]], tmp_path / "m", provenance=UNSIGNED_OK)
    convs = read_chat_file(post["chat"] / "public" / "train.jsonl")[:6]
    from flexmoe.sequence_routing import SequenceRouting

    # these owners shipped prompt centroids, so a chat prompt is chosen by them: the rows' scale would
    # be computed and never read, and the calibration says so instead
    by_centroids = from_pretrained(tmp_path / "m", trust=ALLOW_UNSIGNED, sequence_routing=True, device="cpu")
    with pytest.raises(FlexmoeError, match="by centroids"):
        by_centroids.calibrate_prompts(convs)
    assert by_centroids.sequence.prompt_scale is None
    rows = SequenceRouting(prompt_evidence="rows")
    c = from_pretrained(tmp_path / "m", trust=ALLOW_UNSIGNED, sequence_routing=rows, device="cpu")
    c.calibrate_prompts(convs)
    with torch.no_grad():
        m = torch.cat(
            [
                c.sequence.row_margins(
                    c.model.get_decoder(), torch.tensor([prompt_ids(c.tokenizer, x[:-1])]), None
                )[0]
                for x in convs
            ]
        )
    want = torch.stack([m.mean(0), m.std(0)])
    want[:, 0] = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(c.sequence.prompt_scale, want, atol=1e-5, rtol=1e-5)
    plain = from_pretrained(tmp_path / "m", trust=ALLOW_UNSIGNED, device="cpu")
    with pytest.raises(FlexmoeError, match="needs sequence routing"):
        plain.calibrate_prompts(convs)
    # the CLI: generate --prompt-calibration (serve takes the same option)
    from typer.testing import CliRunner

    from flexmoe.cli import app

    public = post["chat"] / "public" / "train.jsonl"
    argv = ["generate", str(tmp_path / "m"), "--prompt", "What is 2 + 3?", "--chat", "--allow-unsigned"]
    res = CliRunner().invoke(app, [*argv, "--sequence-routing", "--prompt-calibration", str(public)])
    assert isinstance(res.exception, FlexmoeError) and "drop --prompt-calibration" in res.exception.fix
    res = CliRunner().invoke(app, [*argv, "--no-sequence-routing", "--prompt-calibration", str(public)])
    assert isinstance(res.exception, FlexmoeError) and "needs sequence routing" in str(res.exception)


def test_server_leaves_a_centroid_model_uncalibrated(post, tmp_path, caplog):
    """serve --prompt-calibration applies to every model it loads, swapped-in ones too: one whose
    prompts the centroids choose is loaded uncalibrated with a warning instead of failing the load."""
    from flexmoe.compose import UNSIGNED_OK, compose
    from flexmoe.serve.app import Settings, load

    compose(post["anchor"], [post["code"], post["math"]], tmp_path / "m", provenance=UNSIGNED_OK)
    public = post["chat"] / "public" / "train.jsonl"
    s = Settings(tmp_path / "m", allow_unsigned=True, sequence_routing=True, prompt_calibration=public)
    with caplog.at_level("WARNING", logger="flexmoe.serve"):
        c = load(s)
    assert not c.prompt_chosen_by_rows and c.sequence.prompt_scale is None
    assert "--prompt-calibration not applied" in caplog.text


def test_nearest_centroid_by_hand():
    """Each prompt goes to the nearest allowed class; public is routable beside any owner; a prompt
    nearest public goes to public alone; an excluded owner is never chosen."""
    from flexmoe.prompt_centroids import nearest

    table = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    feats = torch.tensor([[9.0, 1.0], [1.0, 8.0], [1.0, 1.0]])
    assert nearest(feats, table).tolist() == [[True, True, False], [True, False, True], [True, False, False]]
    no_2 = torch.tensor([True, True, False])
    assert nearest(feats, table, no_2).tolist() == [[True, True, False], [True, False, False]] + [
        [True, False, False]
    ]
    per_row = torch.tensor([[True, False, True], [True, True, True], [True, True, True]])
    assert nearest(feats, table, per_row)[0].tolist() == [True, False, False]


def test_prompt_centroids_are_published_carried_and_choose_the_prompts_owner(post, tmp_path):
    """The post-trained anchor publishes the public centroid, every sft package its owner's (rl carries
    it on), compose carries them into flexmoe.json, and the runtime chooses a chat prompt's owner by the
    nearest one, from the prompt's features in the public-alone pass: the anchor's features, which the
    owners measured theirs in (checked equal on a model with merged shared tensors). Removing an owner
    removes its centroid."""
    from flexmoe.anchor import load_anchor
    from flexmoe.chat import chat_splits, prompt_ids, prompt_turns, read_chat_file
    from flexmoe.compose import UNSIGNED_OK, compose, remove
    from flexmoe.formats import read_anchor_meta, read_expert_manifest
    from flexmoe.prompt_centroids import FIELD, anchor_features
    from flexmoe.runtime import from_pretrained
    from flexmoe.signing import ALLOW_UNSIGNED

    pub = read_anchor_meta(post["anchor"])[FIELD]
    assert pub["prompts"] == len(chat_splits(post["chat"] / "public")[0]) and len(pub["mean"]) == 32
    owners = {d: read_expert_manifest(post[d])[FIELD] for d in ("code", "math", "math-rl")}
    assert owners["math-rl"] == owners["math"] and owners["code"]["mean"] != owners["math"]["mean"]
    compose(post["anchor"], [post["code"], post["math"]], tmp_path / "m", provenance=UNSIGNED_OK)
    c = from_pretrained(tmp_path / "m", trust=ALLOW_UNSIGNED, sequence_routing=True, device="cpu")
    assert c.sequence.prompt_evidence == "centroids"
    want = torch.tensor([pub["mean"], owners["code"]["mean"], owners["math"]["mean"]], dtype=torch.float64)
    torch.testing.assert_close(c.sequence.prompt_centroids, want)

    convs = [read_chat_file(post["chat"] / d / "valid.jsonl")[0] for d in ("public", "code", "math")]
    feats = anchor_features(load_anchor(post["anchor"], torch.float32), c.tokenizer, convs)
    ids = [prompt_ids(c.tokenizer, prompt_turns(x)) for x in convs]
    n = max(map(len, ids))  # one batch, left-padded as generate pads
    batch = torch.tensor([[0] * (n - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids])
    dec = c.model.get_decoder()
    with torch.no_grad():
        seen = c.sequence.anchor_pass(dec, batch, mask, lambda _i, _b, h: h, merged=False)
    from flexmoe.prompt_centroids import pooled

    torch.testing.assert_close(pooled(seen, mask), feats, atol=1e-5, rtol=1e-5)
    c.sequence.prompt_centroids = feats.clone()  # each prompt its own class: each goes to itself
    with torch.no_grad():
        chosen = c.sequence.prompt_choice(dec, batch, mask)
        no_math = c.sequence.prompt_choice(dec, batch, mask, allowed=torch.tensor([True, True, False]))
    assert chosen.tolist() == [[True, False, False], [True, True, False], [True, False, True]]
    assert not no_math[:, 2].any()

    remove(tmp_path / "m", "math", tmp_path / "no-math", provenance=UNSIGNED_OK)
    c2 = from_pretrained(tmp_path / "no-math", trust=ALLOW_UNSIGNED, sequence_routing=True, device="cpu")
    torch.testing.assert_close(c2.sequence.prompt_centroids, want[:2])


def test_package_with_a_malformed_prompt_centroid_is_refused(post, tmp_path):
    import json
    import shutil

    from flexmoe.errors import FlexmoeError
    from flexmoe.expert.package import check

    bad = tmp_path / "code"
    shutil.copytree(post["code"], bad)
    m = json.loads((bad / "expert.json").read_text())
    m["prompt_centroid"]["mean"] = m["prompt_centroid"]["mean"][:-1]
    (bad / "expert.json").write_text(json.dumps(m))
    with pytest.raises(FlexmoeError, match="prompt_centroid is malformed"):
        check(bad)


def test_expert_centroid_adds_the_sft_stages_centroid_to_an_older_package(post, base_anchor, tmp_path):
    """``flexmoe expert centroid`` gives a package without a centroid exactly what its sft stage would
    have written (same anchor, same conversations) and the hashes still hold; a wrong anchor and too
    few conversations are clear errors."""
    import json
    import shutil

    from typer.testing import CliRunner

    from flexmoe.chat import read_chat_file
    from flexmoe.cli import app
    from flexmoe.errors import FlexmoeError
    from flexmoe.expert.package import check
    from flexmoe.formats import read_expert_manifest

    old = tmp_path / "code"
    shutil.copytree(post["code"], old)
    m = json.loads((old / "expert.json").read_text())
    want = m.pop("prompt_centroid")
    (old / "expert.json").write_text(json.dumps(m))
    res = CliRunner().invoke(app, ["expert", "inspect", str(old)])
    assert "prompt centroid: none" in res.output
    assert "shared tensors trained: embeddings" in res.output  # sft: the owner's rows, not its FFN
    argv = ["expert", "centroid", str(old), "--anchor", str(post["anchor"])]
    res = CliRunner().invoke(app, [*argv, "--chat", str(post["chat"] / "code")])
    assert res.exit_code == 0, res.output
    assert "signature" not in res.output  # it had none to drop
    assert read_expert_manifest(old)["prompt_centroid"] == want
    check(old)  # the hashes hold
    res = CliRunner().invoke(app, ["expert", "inspect", str(old)])
    assert f"prompt centroid: from {want['prompts']} chat prompts" in res.output
    res = CliRunner().invoke(
        app, ["expert", "centroid", str(old), "--anchor", str(post["root"] / "code"), "--chat", str(old)]
    )
    assert isinstance(res.exception, FlexmoeError)  # an expert package is no anchor
    res = CliRunner().invoke(app, [*argv[:3], "--anchor", str(base_anchor), "--chat", str(old)])
    assert isinstance(res.exception, FlexmoeError) and "another anchor" in str(res.exception)
    few = tmp_path / "few.jsonl"
    convs = read_chat_file(post["chat"] / "code" / "train.jsonl")[:5]
    few.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    res = CliRunner().invoke(app, [*argv, "--chat", str(few)])
    assert isinstance(res.exception, FlexmoeError) and "needs 20" in str(res.exception)


def test_anchor_centroid_publishes_what_anchor_sft_wrote(post, base_anchor, tmp_path):
    """``flexmoe anchor centroid`` writes the public centroid that ``anchor train --stage sft`` writes
    (same anchor, same conversations) and keeps the rest of flexmoe_anchor.json; a base anchor (no chat
    template) is a clear error."""
    import shutil

    from typer.testing import CliRunner

    from flexmoe.cli import app
    from flexmoe.errors import FlexmoeError
    from flexmoe.formats import read_anchor_meta, write_anchor_meta
    from flexmoe.prompt_centroids import FIELD

    anchor = tmp_path / "anchor-sft"
    shutil.copytree(post["anchor"], anchor)
    meta = read_anchor_meta(anchor)
    want = meta.pop(FIELD)
    write_anchor_meta(anchor, meta)
    res = CliRunner().invoke(app, ["anchor", "centroid", str(anchor), "--chat", str(post["chat"] / "public")])
    assert res.exit_code == 0, res.output
    after = read_anchor_meta(anchor)
    assert after[FIELD] == want and after["valid_loss"] == meta["valid_loss"]
    res = CliRunner().invoke(
        app, ["anchor", "centroid", str(base_anchor), "--chat", str(post["chat"] / "public")]
    )
    assert isinstance(res.exception, FlexmoeError) and "no chat anchor" in str(res.exception)
