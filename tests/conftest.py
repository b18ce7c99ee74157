"""Shared fixtures: small demo corpora, a tiny pretrained anchor, and tiny random HF checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo corpora at a reduced size (shared by every test that needs real text)."""
    from flexmoe.corpora import build_demo_corpora

    out = tmp_path_factory.mktemp("data") / "demo"
    build_demo_corpora(out, size_mb=0.3)
    return out


@pytest.fixture(scope="session")
def tiny_anchor(tmp_path_factory, demo_data) -> Path:
    """An OLMo 2 anchor pretrained for a few steps on the public split (quick, not good)."""
    from flexmoe.anchor import pretrain

    out = tmp_path_factory.mktemp("anchor") / "anchor"
    pretrain(demo_data / "public", out, "tiny", steps=40, vocab_size=1024, quiet=True)
    return out


def make_hf_checkpoint(path: Path, model_type: str, seed: int = 0, vocab: int = 256) -> Path:
    """A random-weight tiny dense decoder of the given type, saved as an HF checkpoint."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def make_anchor_dir(path: Path, model_type: str, docs: list[str], seed: int = 0) -> Path:
    """A random tiny anchor of any supported family, with tokenizer and published router init."""
    from flexmoe.anchor import load_anchor, publish_router_init
    from flexmoe.tokenizer import train_tokenizer

    tok = train_tokenizer(docs, vocab_size=320)
    make_hf_checkpoint(path, model_type, seed=seed, vocab=len(tok))
    tok.save_pretrained(str(path))
    publish_router_init(path, load_anchor(path), tok, docs, embedder=None, seq_len=64, n_docs=50)
    return path


@pytest.fixture(scope="session")
def trust_root(tmp_path_factory) -> Path:
    """A random 2-layer anchor and an owner's key pair, shared by the trust and bad-input tests."""
    import trustkit

    from flexmoe.signing import generate_keys

    root = tmp_path_factory.mktemp("trust")
    trustkit.anchor(root)
    generate_keys(root / "keys" / "owner")
    generate_keys(root / "keys" / "other")
    return root
