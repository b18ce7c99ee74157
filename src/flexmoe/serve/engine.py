"""The batching engine: one thread owns the model and decodes every waiting request as one batch.

Continuous batching on a plain HF dynamic KV cache: new requests are prefilled together (left-padded)
and merged into the running batch between decode steps; finished rows leave the batch at once. Each row
carries its own expert mask (``[B, E]`` through ``moe.Routing``), so requests with different expert sets
share every forward. Routing weights are recorded per row for attribution.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from flexmoe.anchor import cache_argument
from flexmoe.moe import Routing, routing
from flexmoe.runtime import Composed


@dataclass
class Sampling:
    """Decoding settings of one request (OpenAI names)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (load tests)


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    attribution: dict[str, float]


@dataclass
class Job:
    """One request inside the engine. ``emit(kind, payload)`` is called from the engine thread:
    ``("delta", str)`` for streamed text, then ``("done", Result)`` or ``("error", str)``."""

    ids: list[int]
    mask: torch.Tensor  # [E] bool, the request's own expert choice
    sampling: Sampling
    emit: Callable[[str, object], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Engine-side state.
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    attribution: torch.Tensor | None = None
    generator: torch.Generator | None = None
    names: list[str] = field(default_factory=list)


class Engine:
    """Owns a ``Composed`` model; ``submit`` jobs from any thread; ``swap`` models between batches."""

    def __init__(self, composed: Composed, max_batch: int = 32):
        self.composed = composed
        self.max_batch = max_batch
        self.enabled = torch.ones(len(composed.names), dtype=torch.bool)  # owner switches (all traffic)
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._pending: Composed | None = None
        self._swapped = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flexmoe-engine", daemon=True)
        self.active: list[Job] = []

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def swap(self, composed: Composed, timeout: float = 600.0) -> None:
        """Serve ``composed`` from the next batch on; requests in flight finish on the old model."""
        self._swapped.clear()
        self._pending = composed
        if not self._swapped.wait(timeout):
            raise TimeoutError("the engine did not take the new model in time")

    # ------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        cache, attn = None, None
        while not self._stop.is_set():
            if self._pending is not None and not self.active:
                self.composed, self._pending = self._pending, None
                self.enabled = torch.ones(len(self.composed.names), dtype=torch.bool)
                self._swapped.set()
            new = self._admit()
            try:
                if new:
                    cache, attn = self._prefill(new, cache, attn)
                elif self.active:
                    cache, attn = self._decode(cache, attn)
                cache, attn = self._retire(cache, attn)
            except Exception as e:  # noqa: BLE001 - a failed batch must not kill the server
                for job in [*self.active, *new]:
                    job.emit("error", f"generation failed: {type(e).__name__}: {e}")
                self.active, cache, attn = [], None, None

    def _admit(self) -> list[Job]:
        if self._pending is not None:
            return []  # drain the running batch before the swap
        new: list[Job] = []
        timeout = None if not self.active else 0.0
        while len(self.active) + len(new) < self.max_batch:
            try:
                wait = timeout is None and not new
                job = self._inbox.get(timeout=0.05) if wait else self._inbox.get_nowait()
            except queue.Empty:
                if timeout is None and not new and not self._stop.is_set() and self._pending is None:
                    continue
                break
            if job.mask.numel() != len(self.composed.names):
                job.emit("error", "the served model changed while the request waited; send it again")
            elif not job.cancelled.is_set():
                new.append(job)
        return new

    def _masks(self, jobs: list[Job]) -> torch.Tensor:
        m = torch.stack([j.mask for j in jobs]) & self.enabled
        # A row whose every expert was switched off keeps its own choice rather than routing over nothing.
        m = torch.where(m.any(-1, keepdim=True), m, torch.stack([j.mask for j in jobs]))
        return m.to(self.composed.device)

    @torch.no_grad()
    def _forward(self, jobs, ids, attn, pos, cache, prefill: bool = False):
        kv = {cache_argument(self.composed.model): cache}
        mask = self._masks(jobs)
        if self.composed.sequence is not None and not prefill:
            # Decode steps of a sequence-routed model: each request's prompt choice (kept on the job,
            # as the batch's cache is merged and cut), given per token so that it stands as it is.
            mask = mask[:, None, :]
        with routing(Routing(mask=mask, record=True)) as r:
            out = self.composed.model(
                input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **kv
            )
        return out.logits[:, -1], cache, r.weights[:, -1]

    def _prefill(self, new: list[Job], cache, attn):
        dev = self.composed.device
        width = max(len(j.ids) for j in new)
        pad = self.composed.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(j.ids)) + j.ids for j in new], device=dev)
        a_new = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in new], device=dev)
        pos = (a_new.cumsum(-1) - 1).clamp_min(0)
        for j in new:
            j.names = list(self.composed.names)
            if j.sampling.seed is not None:
                j.generator = torch.Generator().manual_seed(j.sampling.seed)
        fresh = DynamicCache(config=self.composed.model.config)
        logits, c_new, w = self._forward(new, ids, a_new, pos, fresh, prefill=True)
        if self.composed.sequence is not None:  # the prompt chose each request's experts
            for j, choice in zip(new, self.composed.sequence.last_choice.cpu(), strict=True):
                j.mask = choice
        self._step_tokens(new, logits, w)
        if not self.active:
            self.active = new
            return c_new, a_new
        cache, attn = merge(cache, attn, c_new, a_new)
        self.active = self.active + new
        return cache, attn

    def _decode(self, cache, attn):
        dev = self.composed.device
        ids = torch.tensor([[j.out[-1]] for j in self.active], device=dev)
        attn = torch.cat([attn, torch.ones(len(self.active), 1, dtype=attn.dtype, device=dev)], -1)
        pos = attn.sum(-1, keepdim=True) - 1
        logits, cache, w = self._forward(self.active, ids, attn, pos, cache)
        self._step_tokens(self.active, logits, w)
        return cache, attn

    def _step_tokens(self, jobs: list[Job], logits: torch.Tensor, weights: torch.Tensor) -> None:
        logits = logits.float().cpu()  # the one host synchronisation per step: tokens go to clients
        for i, j in enumerate(jobs):
            j.attribution = weights[i] if j.attribution is None else j.attribution + weights[i]
            j.out.append(sample(logits[i], j.sampling, j.generator))
            self._detokenize(j)

    def _detokenize(self, j: Job) -> None:
        tok = self.composed.tokenizer
        j.text = tok.decode(j.out, skip_special_tokens=True)
        hit = [j.text.find(s) for s in j.sampling.stop if s and s in j.text]
        if hit:
            j.text = j.text[: min(hit)]
        # Hold back a tail that could still become a stop string, and an incomplete UTF-8 character
        # (decoded as U+FFFD until its last byte arrives).
        hold = max((len(s) - 1 for s in j.sampling.stop), default=0)
        safe = len(j.text.rstrip("\ufffd"))
        upto = len(j.text) if hit else max(j.sent, min(safe, len(j.text) - hold))
        if upto > j.sent:
            j.emit("delta", j.text[j.sent : upto])
            j.sent = upto

    def _finish_reason(self, j: Job) -> str | None:
        if j.cancelled.is_set():
            return "cancelled"
        eos = self.composed.tokenizer.eos_token_id
        tok_text = self.composed.tokenizer.decode(j.out, skip_special_tokens=True)
        if any(s and s in tok_text for s in j.sampling.stop):
            return "stop"
        if eos is not None and j.out and j.out[-1] == eos and not j.sampling.ignore_eos:
            return "stop"
        if len(j.out) >= j.sampling.max_tokens:
            return "length"
        return None

    def _retire(self, cache, attn):
        keep = []
        for i, j in enumerate(self.active):
            reason = self._finish_reason(j)
            if reason is None:
                keep.append(i)
                continue
            if j.sent < len(j.text):
                j.emit("delta", j.text[j.sent :])
                j.sent = len(j.text)
            shares = j.attribution.double().cpu()
            shares = shares / shares.sum().clamp_min(1e-300)
            j.emit(
                "done",
                Result(
                    j.text,
                    reason,
                    len(j.ids),
                    len(j.out),
                    {n: float(v) for n, v in zip(j.names, shares, strict=True)},
                ),
            )
        if len(keep) == len(self.active):
            return cache, attn
        self.active = [self.active[i] for i in keep]
        if not keep:
            return None, None
        return select(cache, attn, keep)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, otherwise temperature + nucleus (top-p) sampling."""
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = (logits / s.temperature).softmax(-1)
    if s.top_p < 1.0:
        p, idx = probs.sort(descending=True)
        cut = p.cumsum(-1) - p > s.top_p  # keep the smallest prefix whose mass reaches top_p
        p[cut] = 0
        probs = torch.zeros_like(probs).scatter(-1, idx, p)
    return int(torch.multinomial(probs, 1, generator=generator))


def merge(cache, attn, c_new, a_new):
    """Join two batches' KV caches and attention masks, left-padding the shorter one."""
    la, lb = attn.shape[1], a_new.shape[1]
    width = max(la, lb)
    out = DynamicCache()
    for i, (old, new) in enumerate(zip(cache.layers, c_new.layers, strict=True)):
        k = torch.cat([_lpad(old.keys, width), _lpad(new.keys, width)], 0)
        v = torch.cat([_lpad(old.values, width), _lpad(new.values, width)], 0)
        out.update(k, v, i)
    zeros = lambda a: torch.zeros(a.shape[0], width - a.shape[1], dtype=a.dtype, device=a.device)  # noqa: E731
    return out, torch.cat([torch.cat([zeros(attn), attn], 1), torch.cat([zeros(a_new), a_new], 1)], 0)


def _lpad(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[-2] == width:
        return t
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[-2], 0))


def select(cache, attn, keep: list[int]):
    """Keep only rows ``keep`` and drop leading columns that are padding in every kept row."""
    idx = torch.tensor(keep, device=attn.device)
    attn = attn[idx]
    first = int((attn.cumsum(-1) == 0).sum(-1).min())  # shared left padding
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys[idx][..., first:, :], layer.values[idx][..., first:, :], i)
    return out, attn[:, first:]
