import shutil

import pytest
import torch
from conftest import make_hf_checkpoint
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexmoe.anchor import fingerprint, inspect, load_anchor, pretrain, unigram_loss
from flexmoe.errors import FlexmoeError


def test_pretrained_anchor_loads_with_stock_transformers(tiny_anchor):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_anchor))
    tok = AutoTokenizer.from_pretrained(str(tiny_anchor))
    assert model.config.model_type == "olmo2"
    ids = tok("Once upon a time", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8
    assert isinstance(tok.decode(out[0]), str)


def test_save_load_logits_equal(tiny_anchor):
    a = load_anchor(tiny_anchor)
    b = AutoModelForCausalLM.from_pretrained(str(tiny_anchor))
    x = torch.randint(0, a.config.vocab_size, (2, 16))
    assert torch.equal(a(x).logits, b(x).logits)


def test_anchor_beats_unigram(demo_data, tmp_path):
    s = pretrain(demo_data / "public", tmp_path / "a", "tiny", steps=60, vocab_size=1024, quiet=True)
    assert s["valid_loss"] < s["unigram_valid_loss"] - 0.3


def test_resume_after_interruption_is_bit_identical(demo_data, tmp_path):
    kw = dict(steps=12, vocab_size=512, quiet=True)
    pretrain(demo_data / "public", tmp_path / "full", "tiny", **kw)
    # Interrupt after 7 steps (checkpoint every 1 step at this length), then resume.
    first = pretrain(demo_data / "public", tmp_path / "resumed", "tiny", stop_after=7, **kw)
    assert first["finished"] is False and not (tmp_path / "resumed").exists()
    with pytest.raises(FlexmoeError, match="--resume"):
        pretrain(demo_data / "public", tmp_path / "resumed", "tiny", **kw)
    pretrain(demo_data / "public", tmp_path / "resumed", "tiny", resume=True, **kw)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".resumed.work").exists()  # work files removed after success


def test_fingerprint_stable_and_sensitive(tiny_anchor, tmp_path):
    fp = fingerprint(tiny_anchor)
    assert fp == fingerprint(tiny_anchor) and fp.startswith("sha256:")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_anchor, copy)
    assert fingerprint(copy) == fp
    w = load_file(str(copy / "model.safetensors"))
    name = sorted(w)[3]
    raw = w[name].view(torch.uint8).flatten()
    raw[5] ^= 1  # flip one bit of one byte
    save_file(w, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert fingerprint(copy) != fp


@pytest.mark.parametrize("model_type", ["olmo2", "llama", "mistral", "qwen2"])
def test_llama_family_loads_inspects_fingerprints(tmp_path, model_type):
    path = make_hf_checkpoint(tmp_path / model_type, model_type)
    info = inspect(path)
    model = load_anchor(path)
    n_params = sum(p.numel() for p in model.parameters())
    assert info["parameters"]["total"] == n_params
    assert info["parameters"]["ffn"] == 2 * 3 * 32 * 64
    assert info["family"] == ("olmo2" if model_type == "olmo2" else "llama")
    assert info["fingerprint"] == fingerprint(path)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(
        str(tmp_path / "g")
    )
    with pytest.raises(FlexmoeError, match="Unsupported anchor architecture 'gpt2'"):
        inspect(tmp_path / "g")


def test_output_exists_needs_force(demo_data, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FlexmoeError, match="already exists"):
        pretrain(demo_data / "public", out, "tiny", steps=2, vocab_size=300, quiet=True)
    assert (out / "keep.txt").read_text() == "precious"


def test_not_a_model_directory(tmp_path):
    with pytest.raises(FlexmoeError, match="no config.json"):
        inspect(tmp_path)
    with pytest.raises(FlexmoeError, match="not a directory"):
        inspect(tmp_path / "missing" / "dir")


def test_unigram_loss_hand_computed():
    train = torch.tensor([[0, 0, 1]])
    valid = torch.tensor([[9, 0, 1]])  # targets are positions 1.. : tokens 0 and 1
    # counts+1 over vocab 3: [3, 2, 1] / 6
    expect = -(torch.tensor(3 / 6).log() + torch.tensor(2 / 6).log()) / 2
    assert unigram_loss(train, valid, 3) == pytest.approx(float(expect))
