"""Compose independently trained experts into one mixture-of-experts model, with no joint training;
add, update and remove experts later without retraining anyone.

Output for OLMo 2 anchors: a stock Hugging Face ``flex_olmo`` checkpoint in the per-expert layout
(expert 0 = the anchor FFN, router rows stacked in expert order, ``norm_topk_prob=false``), which
``AutoModelForCausalLM.from_pretrained`` and vLLM load. Llama-family anchors have no stock format with
FlexOlmo routing (Mixtral and Qwen-MoE renormalise the top-k weights, which changes the semantics), so
they get the same tensor layout with a small modelling file loaded through ``trust_remote_code``.

Beside the weights: ``flexmoe.json`` (anchor fingerprint, each expert's manifest and position, hashes
of the weight files, the history of operations) and ``flexmoe_bias.safetensors`` (the learned
non-positive router biases, which the HF format has no slot for; only flexmoe's runtime reads them,
and only when asked to).

Every operation streams tensors one at a time through the same canonical order and shard writer, so
``remove`` gives exactly the bytes ``compose`` would give without that expert.
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flexmoe import compose_shared as cs
from flexmoe import formats, prompt_centroids, signing
from flexmoe import routing_methods as methods
from flexmoe.anchor import FAMILIES, fingerprint, fingerprint_tensors, resolve
from flexmoe.checkpoint import DEFAULT_SHARD_BYTES, ShardWriter, StateReader, TensorReader, weight_hashes
from flexmoe.errors import FlexmoeError
from flexmoe.expert import package as pkg
from flexmoe.fileio import atomic_dir, check_output_dir, claims_output, read_json, write_json
from flexmoe.moe import decoder_layers
from flexmoe.router_init import ROUTER_FILE
from flexmoe.routing_methods import Request, restore_trained, write_routed
from flexmoe.routing_stats import load_anchor_stats

FLEXMOE_JSON = formats.MODEL_META
MODEL_KIND = signing.MODEL_KIND
BIAS_FILE = "flexmoe_bias.safetensors"
PUBLIC = "public"
FFN = ("gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",  # the chat template of a post-trained anchor (transformers 5 keeps it here)
)
REMOTE_CODE = Path(__file__).parent / "hf_remote" / "modeling_flexmoe.py"
CALIBRATION_FILE = "flexmoe_calibration.safetensors"  # the trained public row of a calibrated model


def default_top_k(num_experts: int) -> int:
    """Half the experts, rounded up, but at least 2 (the paper: 4 of 8; owners trained with 2 of 2)."""
    return min(num_experts, max(2, math.ceil(num_experts / 2)))


def resolve_top_k(top_k: int | None, num_experts: int) -> int:
    if top_k is None:
        return default_top_k(num_experts)
    if top_k < 1:
        raise FlexmoeError(f"--top-k {top_k} is below 1.", f"use 1 to {num_experts}.")
    if top_k > num_experts:
        warnings.warn(f"top-k {top_k} exceeds the {num_experts} experts; using {num_experts}.", stacklevel=2)
        return num_experts
    return top_k


# --------------------------------------------------------------------------------------------------
# Where an expert's tensors come from: the anchor (position 0), a package, or an existing composed model.


@dataclass
class Expert:
    """One expert of a composed model: its name, manifest, and per-layer tensor getters."""

    name: str
    manifest: dict
    ffn: Callable[[int, str], torch.Tensor]  # (layer, proj) -> weight
    row: Callable[[int], torch.Tensor]  # layer -> router row [H]
    bias: Callable[[int], float]  # layer -> bias (<= 0)
    signer: str | None = None  # key id that signed the package (None: unsigned)
    delta_file: Path | None = None  # post-trained experts: their shared tensors' deltas (compose_shared)
    package: Path | None = None  # read from a package (not from a model): its shipped routing statistics


def anchor_expert(reader: TensorReader, public_row: Callable[[int], torch.Tensor], manifest: dict) -> Expert:
    return Expert(
        PUBLIC,
        manifest,
        lambda i, p: reader.get(f"model.layers.{i}.mlp.{p}.weight"),
        public_row,
        lambda i: 0.0,
    )


def public_manifest(anchor: Path, anchor_fp: str) -> dict:
    """The public expert's entry: the anchor, and the public prompt centroid it was published with
    (``flexmoe.prompt_centroids``; chat anchors)."""
    m = {"name": PUBLIC, "description": "the public anchor FFN", "anchor": {"fingerprint": anchor_fp}}
    centroid = prompt_centroids.published(anchor)
    return m if centroid is None else {**m, prompt_centroids.FIELD: centroid}


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, copied out of the file mapping so no page stays resident."""
    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name).clone()


def package_expert(path: Path, checked: tuple[dict, str | None]) -> Expert:
    """An expert read lazily from its package, one tensor at a time (bounded memory).

    ``checked`` is the (manifest, signer) of ``pkg.check`` (verification hashes the whole file: once).
    """
    manifest, signer = checked
    f = Path(path) / pkg.TENSOR_FILE
    return Expert(
        manifest["name"],
        manifest,
        lambda i, p: read_tensor(f, f"layers.{i}.{p}.weight"),
        lambda i: read_tensor(f, f"layers.{i}.router.weight"),
        lambda i: float(read_tensor(f, f"layers.{i}.router.bias")),
        signer,
        Path(path) / pkg.SHARED_FILE if manifest.get("shared_deltas") else None,
        Path(path),
    )


def composed_expert(reader: TensorReader, meta: dict, biases: dict[str, torch.Tensor], e: int) -> Expert:
    info = meta["experts"][e]
    delta = reader.path / cs.SHARED_DIR / f"{info['name']}.safetensors"
    return Expert(
        info["name"],
        info["manifest"],
        lambda i, p: reader.get(f"model.layers.{i}.mlp.experts.{e}.{p}.weight"),
        lambda i: reader.get(f"model.layers.{i}.mlp.gate.weight")[e],
        lambda i: float(biases[f"model.layers.{i}.mlp.bias"][e]),
        info.get("signer"),
        delta if e and delta.is_file() else None,
    )


# --------------------------------------------------------------------------------------------------
# Checks before anything is written


def check_packages(
    anchor_fp: str, config: dict, packages: Sequence[Path], trust: signing.Trust | None = None
) -> list[tuple[dict, str | None]]:
    """Verify signatures, hashes, anchor fingerprint, shapes and names of every package; return their
    (manifest, signer) pairs."""
    checked = [pkg.check(p, trust) for p in packages]
    manifests = [m for m, _ in checked]
    H, I, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    expect = {"gate_proj": [I, H], "up_proj": [I, H], "down_proj": [H, I]}
    for path, m in zip(packages, manifests, strict=True):
        if m["anchor"]["fingerprint"] != anchor_fp:
            raise FlexmoeError(
                f"Expert {m['name']!r} ({path}) was trained against a different anchor "
                f"({m['anchor']['fingerprint'][:23]}..., this anchor is {anchor_fp[:23]}...).",
                "compose it with the anchor it was trained against, or have the owner retrain it.",
            )
        for i in range(L):
            for proj, shape in expect.items():
                got = m["tensors"].get(f"layers.{i}.{proj}.weight", {}).get("shape")
                if got != shape:
                    raise FlexmoeError(
                        f"Expert {m['name']!r}: layer {i} {proj} has shape {got}, expected {shape}.",
                        "the package does not fit this anchor.",
                    )
    names = [m["name"] for m in manifests]
    dupes = sorted({n for n in names if names.count(n) > 1} | ({PUBLIC} & set(names)))
    if dupes:
        raise FlexmoeError(
            f"Duplicate or reserved expert name(s): {', '.join(dupes)}.",
            "give every expert a unique name (not 'public').",
        )
    return checked


def check_published_row(anchor: Path, packages: Sequence[Path], layers: int) -> None:
    """A package's public router row must be one the anchor published (embed or hidden): a package
    trained against a foreign anchor whose manifest fingerprint was edited is caught here even unsigned."""
    if not (Path(anchor) / ROUTER_FILE).is_file():
        return
    published = load_file(str(Path(anchor) / ROUTER_FILE))
    rows = [published[k] for k in ("embed.public", "hidden.public") if k in published]
    for p in packages:
        f = Path(p) / pkg.TENSOR_FILE
        got = [read_tensor(f, f"layers.{i}.public_router.weight") for i in range(layers)]
        if not any(all(torch.equal(r[i].to(g.dtype), g) for i, g in enumerate(got)) for r in rows):
            raise FlexmoeError(
                f"{p}: its public router row is not one this anchor published (trained against another "
                "anchor, or with other router-init files).",
                "compose it with the anchor it was trained against, or have the owner retrain it.",
            )


def public_rows(packages: Sequence[Path], layers: int) -> Callable[[int], torch.Tensor]:
    """The public router row every owner trained against; refuses packages that disagree on it."""

    def rows(p: Path) -> list[torch.Tensor]:
        return [
            read_tensor(Path(p) / pkg.TENSOR_FILE, f"layers.{i}.public_router.weight") for i in range(layers)
        ]

    first = rows(packages[0])
    for p in packages[1:]:
        if any(not torch.equal(a, b) for a, b in zip(first, rows(p), strict=True)):
            raise FlexmoeError(
                f"{p} was trained with a different public router row than {packages[0]} "
                "(different --router-init methods or router-init files).",
                "compose experts trained with the same router-init method and anchor files.",
            )
    return lambda i: first[i]


# --------------------------------------------------------------------------------------------------
# Writing


def moe_config(anchor_config: dict, num_experts: int, top_k: int) -> dict:
    """The composed model's config.json: every value copied from the anchor's config, never defaults."""
    cfg = dict(anchor_config)
    family = FAMILIES[anchor_config["model_type"]]
    cfg.update(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=False,
        output_router_logits=False,
        router_aux_loss_coef=0.0,
    )
    rope = cfg.get("rope_parameters") or {
        "rope_type": "default",
        "rope_theta": cfg.get("rope_theta", 10000.0),
    }
    cfg["rope_parameters"], cfg["rope_theta"] = rope, rope.get("rope_theta", cfg.get("rope_theta"))
    if family == "olmo2":
        cfg.update(model_type="flex_olmo", architectures=["FlexOlmoForCausalLM"])
    else:
        base = anchor_config["model_type"]
        cfg.update(
            model_type=f"flexmoe_{base}",
            base_model_type=base,
            architectures=["FlexMoEForCausalLM"],
            auto_map={
                "AutoConfig": f"modeling_flexmoe.FlexMoE{base.capitalize()}Config",
                "AutoModelForCausalLM": f"modeling_flexmoe.FlexMoE{base.capitalize()}ForCausalLM",
            },
        )
    return cfg


def portable_tokenizer_config(out: Path) -> None:
    """Make the copied tokenizer config load in transformers 4.57 as well as 5.x: 5.x writes
    ``TokenizersBackend``, a class 4.57 lacks; ``PreTrainedTokenizerFast`` reads the same
    ``tokenizer.json`` in both. ``model_input_names`` keeps 4.57 from asking for token_type_ids."""
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return
    cfg = read_json(path)
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend") and (out / "tokenizer.json").is_file():
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.setdefault("model_input_names", ["input_ids", "attention_mask"])
    write_json(path, cfg)


@dataclass(frozen=True)
class WriteJob:
    """What ``write_model`` writes: the shared (non-FFN) tensors, the experts in order (the public one
    first), the anchor's config, top-k, the base of ``flexmoe.json`` (anchor, history, records), the
    directory the tokenizer files are copied from, and the largest weight shard. A routing method or
    the calibrator writes a variant of the job (``dataclasses.replace``: other rows, another record)."""

    shared: TensorReader
    experts: list[Expert]
    config: dict
    top_k: int
    meta: dict
    source_dir: Path
    max_shard_bytes: int = DEFAULT_SHARD_BYTES


# Writes a composed model with a recalibrated router: (tmp, write_model, job) -> flexmoe.json, writing
# with ``write_model`` a variant of ``job``. Made by flexmoe.router.calibrate.calibrator.
Calibrator = Callable[[Path, Callable[[Path, WriteJob], dict], WriteJob], dict]


def write_model(out: Path, job: WriteJob) -> dict:
    """Stream the composed checkpoint into ``out`` (a fresh directory) in canonical (sorted) order."""
    shared, experts, anchor_config = job.shared, job.experts, job.config
    L = anchor_config["num_hidden_layers"]
    dtype = shared.get("model.embed_tokens.weight").dtype
    getters: dict[str, Callable[[], torch.Tensor]] = {}
    for name in shared.names():
        if ".mlp." not in name:
            getters[name] = lambda n=name: shared.get(n)
    for i in range(L):
        getters[f"model.layers.{i}.mlp.gate.weight"] = lambda i=i: torch.stack(
            [e.row(i) for e in experts]
        ).to(dtype)
        for e, ex in enumerate(experts):
            for p in FFN:
                getters[f"model.layers.{i}.mlp.experts.{e}.{p}.weight"] = lambda i=i, p=p, ex=ex: ex.ffn(
                    i, p
                ).to(dtype)
    writer = ShardWriter(out, job.max_shard_bytes)
    for name in sorted(getters):
        writer.add(name, getters[name]())
    writer.close()
    bias = {
        f"model.layers.{i}.mlp.bias": torch.tensor([e.bias(i) for e in experts], dtype=torch.float32)
        for i in range(L)
    }
    save_file(bias, str(out / BIAS_FILE), metadata={"format": "pt"})
    write_json(out / "config.json", moe_config(anchor_config, len(experts), job.top_k))
    for f in TOKENIZER_FILES:
        if (job.source_dir / f).is_file():
            shutil.copy2(job.source_dir / f, out / f)
    portable_tokenizer_config(out)
    if FAMILIES[anchor_config["model_type"]] != "olmo2":
        shutil.copy2(REMOTE_CODE, out / REMOTE_CODE.name)
    meta = formats.new_model_meta(
        job.meta,
        job.top_k,
        [(ex.name, ex.manifest, ex.signer) for ex in experts],
        weight_hashes(out),
        BIAS_FILE,
    )
    formats.write_model_meta(out, meta)
    return meta


def _event(op: str, **kw) -> dict:
    return {"op": op, "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **kw}


@dataclass
class Provenance:
    """Which package signatures are accepted (``trust``) and the maintainer's key that signs the result
    (``sign_key``, an Ed25519 private key; None: the model is written unsigned)."""

    trust: signing.Trust | None = None
    sign_key: object | None = None


# What a caller passes to accept unsigned packages on purpose (the CLI's --allow-unsigned): tests,
# benchmarks, models built for a measurement. Without it, compose/add/update refuse an unsigned
# package, as the CLI does. (Loading an unsigned model: ``trust=signing.ALLOW_UNSIGNED``.)
UNSIGNED_OK = Provenance(trust=signing.ALLOW_UNSIGNED)


def _trust(provenance: Provenance | None) -> signing.Trust:
    """The signatures accepted: the caller's, else signed packages only (any valid signature)."""
    return provenance.trust if provenance is not None and provenance.trust is not None else signing.Trust()


def _publish(tmp: Path, meta: dict, prov: Provenance | None) -> dict:
    if prov is not None and prov.sign_key is not None:
        signing.sign_dir(tmp, prov.sign_key, MODEL_KIND)
    return meta


@dataclass(frozen=True)
class ComposeSettings:
    """How ``compose`` builds a model, and how ``add``/``update``/``remove`` rebuild one (what goes in,
    ``force`` and ``provenance`` are arguments of their own). ``None`` means: for ``compose`` the
    default, for a change of the expert set what the model has now."""

    top_k: int | None = None  # experts per token; compose: half the experts, at least 2
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    # flexmoe.router.calibrate.calibrator(public_paths): recalibrate the router for this set of experts
    calibrate: Calibrator | None = None
    # disjoint, mean (BAR), ties or sum: how the shared tensors that post-trained experts changed are
    # merged (flexmoe.compose_shared); compose: disjoint
    shared_merge: str | None = None
    # a compose-time routing method (flexmoe.routing_methods; recorded in flexmoe.json and recomputed
    # on every later change); compose: trained
    routing: str | None = None
    # fold or keep (routing_methods); a change that names another routing method: that method's default
    routing_bias: str | None = None

    def __post_init__(self) -> None:
        _check_calibrator(self.calibrate)


@claims_output("out")
def compose(
    anchor: Path,
    packages: Sequence[Path],
    out: Path,
    settings: ComposeSettings | None = None,
    *,
    force: bool = False,
    provenance: Provenance | None = None,
    **overrides,
) -> dict:
    """Compose the anchor and expert packages into one model at ``out``. Returns ``flexmoe.json``.

    ``settings`` (or keyword ``overrides`` of its fields) say how. ``provenance``: signatures accepted
    and the signing key (default: signed packages only, any valid signature, as the CLI;
    ``UNSIGNED_OK`` accepts unsigned ones on purpose; a signature that does not verify is always
    refused).
    """
    s = replace(settings or ComposeSettings(), **overrides)
    anchor = resolve(anchor)
    if not packages:
        raise FlexmoeError("No experts given.", "pass at least one --expert PACKAGE.")
    config = read_json(anchor / "config.json")
    if not isinstance(config, dict) or config.get("model_type") not in FAMILIES:
        raise FlexmoeError(
            f"Unsupported anchor architecture in {anchor / 'config.json'}.",
            f"use a dense decoder of type {', '.join(FAMILIES)}.",
        )
    check_output_dir(Path(out), force)
    anchor_fp = fingerprint(anchor)  # recomputed from the tensors, never read from a manifest
    checked = check_packages(anchor_fp, config, packages, _trust(provenance))
    check_published_row(anchor, packages, config["num_hidden_layers"])
    k = resolve_top_k(s.top_k, len(packages) + 1)
    reader = TensorReader(anchor)
    pub = anchor_expert(
        reader,
        public_rows(packages, config["num_hidden_layers"]),
        public_manifest(anchor, anchor_fp),
    )
    experts = [pub] + [package_expert(p, c) for p, c in zip(packages, checked, strict=True)]
    meta = {
        "anchor": {"fingerprint": anchor_fp, "path": str(anchor), "config": config},
        "history": [
            _event("compose", experts=[m["name"] for m, _ in checked], calibrated=s.calibrate is not None)
        ],
    }
    shared, experts = _merged_shared(reader, experts, meta, s.shared_merge, anchor, fresh=True)
    request = _routing_request(s.routing, s.routing_bias, anchor, experts)
    with atomic_dir(out, force=force) as tmp:
        job = WriteJob(shared, experts, config, k, meta, anchor, s.max_shard_bytes)
        return _publish(tmp, _write(tmp, job, s.calibrate, request), provenance)


def _merged_shared(reader, experts: list[Expert], meta: dict, method: str | None, anchor, fresh: bool):
    """With post-trained experts (or a model that had them): the anchor's shared tensors and FFN slot
    merged with the experts' deltas, recorded in ``meta`` (mutated). Otherwise ``reader`` unchanged."""
    if not (meta.get("shared_merge") or any(e.delta_file for e in experts[1:])):
        return reader, experts
    method = method or meta.get("shared_merge", {}).get("method", cs.DEFAULT)
    if not fresh:
        cs.check_kept(meta, experts[1:])
    base = reader if fresh else cs.anchor_reader(meta)
    merged = cs.MergedReader(base, [e.delta_file for e in experts[1:]], method)
    meta["shared_merge"] = cs.record(experts[1:], method, anchor if fresh else base.path)
    return merged, [anchor_expert(merged, experts[0].row, experts[0].manifest)] + experts[1:]


def _routing_request(method, bias, anchor: Path | None, experts: list[Expert], model: Path | None = None):
    """What a routing method may read: statistics shipped beside the packages ``experts`` were read
    from, kept in ``model`` (for later changes) and published with the anchor."""
    owner, anchor_stats = ({}, None) if model is None else methods.saved(model)[:2]
    joining = [e for e in experts if e.package is not None]
    owner = {**owner, **methods.package_stats([e.package for e in joining], [e.name for e in joining])}
    if anchor is not None and anchor_stats is None:
        anchor_stats = load_anchor_stats(anchor)
    methods.parse(method or methods.DEFAULT)
    return methods.Request(method or methods.DEFAULT, bias, owner, anchor_stats)


def _write(tmp: Path, job: WriteJob, calibrate: Calibrator | None, routing: Request | None = None) -> dict:
    """``write_model`` with a routing method applied, or with ``calibrate`` its calibrated variant;
    then the experts' shared deltas are kept beside the weights (exact opt-out re-merges from them)."""
    if calibrate is None:
        meta = write_routed(tmp, write_model, job, routing or Request())
    else:
        meta = calibrate(tmp, write_model, job)
    cs.keep_deltas(tmp, job.experts[1:])
    if meta.get("shared_merge"):
        # The shared tensors are the anchor's plus merged deltas: record what they hash to, so a
        # later change of the model (remove, add, update) can still check them.
        meta["shared_merge"]["merged_fingerprint"] = composed_anchor_fingerprint(tmp, meta)
        formats.write_model_meta(tmp, meta)
    return meta


def _check_calibrator(calibrate) -> None:
    if calibrate is not None and not callable(calibrate):
        raise FlexmoeError(
            "calibrate= takes a calibrator, not a list of paths.",
            "pass flexmoe.router.calibrate.calibrator(public_paths).",
        )


# --------------------------------------------------------------------------------------------------
# Changing the expert set of a composed model


def load_meta(model: Path, trust: signing.Trust | None = None) -> dict:
    """A composed model's ``flexmoe.json``, once its signature is verified under ``trust`` (default:
    signed, by any valid key; ``signing.ALLOW_UNSIGNED`` accepts an unsigned model but still refuses
    a signature that does not hold). ``runtime.from_pretrained`` verifies through here, once per load.
    """
    meta = formats.read_model_meta(model)  # first: a directory that is no model says so
    signing.verify_dir(Path(model), MODEL_KIND, trust or signing.Trust())
    return meta


def composed_anchor_fingerprint(model: Path, meta: dict) -> str:
    """The anchor fingerprint recomputed from a composed model's tensors (shared ones + expert 0, the
    anchor FFN), in the anchor's tensor names and sorted order."""
    reader = TensorReader(model)
    names = {n: n for n in reader.names() if ".mlp." not in n}
    for i in range(meta["anchor"]["config"]["num_hidden_layers"]):
        for p in FFN:
            names[f"model.layers.{i}.mlp.{p}.weight"] = f"model.layers.{i}.mlp.experts.0.{p}.weight"
    return fingerprint_tensors((a, reader.get(names[a])) for a in sorted(names))


def trained_public_row(model: Path) -> Callable[[int], torch.Tensor] | None:
    """The public row before calibration, if ``model`` was calibrated (``flexmoe.router.calibrate``)."""
    f = Path(model) / CALIBRATION_FILE
    if not f.is_file():
        return None
    rows = load_file(str(f))
    return lambda i: rows[f"model.layers.{i}.mlp.gate.trained_public_row"]


def training_seq_len(meta: dict, default: int = 256) -> int:
    """The sequence length the owners trained with (the longest, if they differ)."""
    lens = [e["manifest"].get("training", {}).get("seq_len") for e in meta["experts"][1:]]
    return max([x for x in lens if x] or [default])


def _current(model: Path) -> tuple[TensorReader, dict, list[Expert]]:
    model = Path(model)
    # The maintainer rebuilding its own model (remove/add/update, router training, the server's admin
    # changes): an unsigned one is accepted, a signature that does not hold is not.
    meta = load_meta(model, signing.ALLOW_UNSIGNED)
    expected = (meta.get("shared_merge") or {}).get("merged_fingerprint") or meta["anchor"]["fingerprint"]
    if composed_anchor_fingerprint(model, meta) != expected:
        raise FlexmoeError(
            f"{model}: its anchor tensors do not match the anchor fingerprint in {FLEXMOE_JSON}.",
            "do not use this copy; compose again from the anchor and the packages.",
        )
    reader = TensorReader(model)
    biases = load_file(str(model / BIAS_FILE))
    experts = [composed_expert(reader, meta, biases, e) for e in range(len(meta["experts"]))]
    # A routing method is recomputed from the rows as trained: start from those.
    experts = restore_trained(model, experts)[0]
    # A calibration holds only for the experts it was solved for: start again from the trained row.
    trained = trained_public_row(model)
    if trained is not None:
        experts[0] = replace(experts[0], row=trained)
    return reader, meta, experts


@claims_output("out")
def _rewrite(
    model: Path,
    out: Path,
    experts: list[Expert],
    meta: dict,
    event: dict,
    settings: ComposeSettings,
    force: bool = False,
    provenance: Provenance | None = None,
) -> dict:
    """Write the changed expert set; the routing method (the model's own unless ``settings`` names
    another) is recomputed from the trained rows and the statistics of the experts that remain, and
    of the packages that join (experts read from a package bring their own statistics)."""
    if Path(out).resolve() == Path(model).resolve():
        raise FlexmoeError(
            "--out is the input model.", "write to a new directory; the input stays untouched."
        )
    s = settings
    check_output_dir(Path(out), force)
    reader = TensorReader(model)
    k = resolve_top_k(s.top_k if s.top_k is not None else meta["top_k"], len(experts))
    new_meta = formats.carry_model_meta(
        meta, {**event, "calibrated": s.calibrate is not None}, shared_merge=meta.get("shared_merge")
    )
    reader, experts = _merged_shared(reader, experts, new_meta, s.shared_merge, None, fresh=False)
    old = meta.get("routing", {})
    if s.routing_bias is not None:
        bias = s.routing_bias
    else:
        bias = old.get("bias") if s.routing is None else None
    anchor = Path(meta["anchor"]["path"])
    request = _routing_request(
        s.routing or old.get("method"), bias, anchor if anchor.is_dir() else None, experts, model=Path(model)
    )
    with atomic_dir(out, force=force) as tmp:
        job = WriteJob(reader, experts, meta["anchor"]["config"], k, new_meta, Path(model), s.max_shard_bytes)
        return _publish(tmp, _write(tmp, job, s.calibrate, request), provenance)


@claims_output("out")
def remove(
    model: Path,
    name: str,
    out: Path,
    settings: ComposeSettings | None = None,
    *,
    force: bool = False,
    provenance: Provenance | None = None,
    **overrides,
) -> dict:
    """Opt-out: a new model without expert ``name`` (no parameter trained on its data remains).

    ``settings`` (or keyword ``overrides`` of its fields): with ``calibrate`` the router is
    recalibrated for the remaining experts; without it a calibrated model returns to its trained
    router rows. Top-k defaults to the model's, clamped to the experts that remain."""
    s = replace(settings or ComposeSettings(), **overrides)
    check_output_dir(Path(out), force)
    _, meta, experts = _current(model)
    names = [e.name for e in experts]
    if name == PUBLIC:
        raise FlexmoeError(
            "The public (anchor) expert cannot be removed.", "remove an owner's expert instead."
        )
    if name not in names:
        raise FlexmoeError(f"No expert named {name!r} in {model}.", f"choose one of {', '.join(names[1:])}.")
    if len(experts) == 2:
        raise FlexmoeError(f"{name!r} is the only owner expert.", "use the anchor itself as the model.")
    kept = [e for e in experts if e.name != name]
    k = s.top_k if s.top_k is not None else min(meta["top_k"], len(kept))
    event = _event("remove", expert=name)
    return _rewrite(model, out, kept, meta, event, replace(s, top_k=k), force=force, provenance=provenance)


@claims_output("out")
def add(
    model: Path,
    package: Path,
    out: Path,
    settings: ComposeSettings | None = None,
    *,
    force: bool = False,
    provenance: Provenance | None = None,
    **overrides,
) -> dict:
    """A new model with one more expert (an owner joining late); existing experts are untouched.

    ``settings`` (or keyword ``overrides`` of its fields): as for ``remove``."""
    s = replace(settings or ComposeSettings(), **overrides)
    check_output_dir(Path(out), force)
    reader, meta, experts = _current(model)
    trust = _trust(provenance)
    joining = _check_joining(meta, experts[0], package, {e.name for e in experts}, trust)
    new = package_expert(package, joining)
    event = _event("add", expert=new.name)
    return _rewrite(model, out, experts + [new], meta, event, s, force=force, provenance=provenance)


@claims_output("out")
def update(
    model: Path,
    package: Path,
    out: Path,
    settings: ComposeSettings | None = None,
    *,
    force: bool = False,
    provenance: Provenance | None = None,
    **overrides,
) -> dict:
    """A new model where the expert of the same name is replaced by a newer package, in place.

    ``settings`` (or keyword ``overrides`` of its fields): as for ``remove``. Trust on first use: an
    expert recorded as signed by a key must be updated by the same key."""
    s = replace(settings or ComposeSettings(), **overrides)
    check_output_dir(Path(out), force)
    reader, meta, experts = _current(model)
    trust = _trust(provenance)
    name = pkg.verify(package, trust)["name"]
    names = [e.name for e in experts]
    if name not in names[1:]:
        raise FlexmoeError(
            f"No expert named {name!r} to update in {model}.", "use 'flexmoe add' for a new expert."
        )
    joining = _check_joining(meta, experts[0], package, set(names) - {name}, trust)
    pinned = experts[names.index(name)].signer
    if pinned is not None and joining[1] != pinned:
        raise FlexmoeError(
            f"Expert {name!r} was signed by {pinned}; this update is signed by {joining[1] or 'nobody'}.",
            "only the key that signed an expert can update it; ask its owner to sign the update.",
        )
    experts[names.index(name)] = package_expert(package, joining)
    event = _event("update", expert=name)
    return _rewrite(model, out, experts, meta, event, s, force=force, provenance=provenance)


def _check_joining(
    meta: dict, public: Expert, package: Path, taken: set[str], trust: signing.Trust | None = None
) -> tuple[dict, str | None]:
    """A joining package must fit the anchor, have a free name, and share the model's public row (as
    trained: before any calibration). Returns its verified (manifest, signer)."""
    config = meta["anchor"]["config"]
    ((m, signer),) = check_packages(meta["anchor"]["fingerprint"], config, [package], trust)
    if m["name"] in taken:
        raise FlexmoeError(
            f"An expert named {m['name']!r} is already in the model.",
            "use 'flexmoe update' to replace it, or rename the new expert.",
        )
    for i in range(config["num_hidden_layers"]):
        row0 = public.row(i)
        row = read_tensor(Path(package) / pkg.TENSOR_FILE, f"layers.{i}.public_router.weight")
        if not torch.equal(row.to(row0.dtype), row0):
            raise FlexmoeError(
                f"{package} was trained with a different public router row than this model.",
                "train it with the same router-init method as the other experts.",
            )
    return m, signer


def runtime_expert(block_of: Callable[[int], object], e: int, name: str, manifest: dict) -> Expert:
    """Expert ``e`` of an in-memory runtime model (its blocks are looked up per layer)."""
    return Expert(
        name,
        manifest,
        lambda i, p: getattr(block_of(i).experts[e], p).weight.detach(),
        lambda i: block_of(i).router[e].weight.detach().view(-1),
        lambda i: float(block_of(i).router[e].bias.detach()),
    )


def runtime_job(
    model,
    names: list[str],
    manifests: list[dict],
    anchor_config: dict,
    source_dir: Path,
    meta: dict,
    top_k: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> WriteJob:
    """The write job of an in-memory flexmoe runtime model (e.g. after router training), for ``export``.

    ``source_dir`` provides the tokenizer files; ``meta`` must hold ``anchor`` and ``history``.
    """
    layers = decoder_layers(model)
    shared = StateReader({k: v.detach() for k, v in model.state_dict().items() if ".mlp." not in k})
    experts = [
        runtime_expert(lambda i: layers[i].mlp, e, n, m)
        for e, (n, m) in enumerate(zip(names, manifests, strict=True))
    ]
    k = resolve_top_k(top_k if top_k is not None else layers[0].mlp.top_k, len(experts))
    return WriteJob(shared, experts, anchor_config, k, meta, Path(source_dir), max_shard_bytes)


@claims_output("out")
def export(job: WriteJob, out: Path, *, force: bool = False) -> dict:
    """Write a composed checkpoint from a write job (``runtime_job``: an in-memory runtime model)."""
    with atomic_dir(out, force=force) as tmp:
        return write_model(tmp, job)
