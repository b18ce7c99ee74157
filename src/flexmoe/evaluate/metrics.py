"""Metrics over any language model: perplexity, multiple-choice log-likelihood, exact-match generation.

A model is anything with ``token_logprobs(ids, mask, prefix_len) -> [B, T-1]`` (log-probability of
each actual next token) and ``next_logprobs(ids, mask, last) -> [B, V]``. ``HFLM`` wraps an HF causal
LM or a flexmoe runtime model; the BTM baseline is another implementation. Everything runs in batches
and reports the number of items and a 95% confidence interval, so a reader can tell a real gap from
noise.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from flexmoe.anchor import cache_argument
from flexmoe.data import pack, tokenize


class HFLM:
    """An HF causal LM (or flexmoe runtime model) behind the scoring interface.

    ``token_logprobs`` returns only the log-probability of each actual next token (``[B, T-1]``), and
    ``next_logprobs`` only the last position's distribution: the full ``[B, T, V]`` tensor never
    leaves the device. ``scope`` (a zero-argument callable returning a context manager) wraps every
    model call: a flexmoe composed model passes its expert choice this way, because the vocabulary
    split below calls the decoder, not the model whose hook would otherwise supply it.
    """

    def __init__(
        self,
        model,
        tokenizer,
        scope: Callable[[], contextlib.AbstractContextManager] | None = None,
        *,
        kv_cache: bool = False,
    ):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.scope = scope or contextlib.nullcontext
        self.device = next(model.parameters()).device
        # Scoring a few positions needs the vocabulary projection only there: for small models the
        # [B, T, V] logits and their log-softmax cost as much as the whole transformer. Models whose
        # logits are not a plain projection of the last hidden state (soft-capping), or whose head has
        # forward hooks (flexmoe's owner corrections read each position's owner from the [B, T]
        # layout that a gathered [N, H] call lacks), take the full path.
        cfg = getattr(model, "config", None)
        head = model.get_output_embeddings() if hasattr(model, "get_decoder") else None
        self._split = (
            head is not None and not head._forward_hooks and not getattr(cfg, "final_logit_softcapping", None)
        )
        # ``kv_cache``: the caller knows that a position's output depends on nothing but the cache and
        # its own token (not so for sequence routing, whose hooks read the whole prefix), so that
        # greedy decoding may run one token per step instead of recomputing the prefix.
        self.kv_cache = kv_cache and self._split

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self.scope():
            return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits

    @torch.no_grad()
    def _logprobs_at(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        """Next-token log-probabilities [N, V] at positions (rows[i], cols[i]) only."""
        with self.scope():
            h = self.model.get_decoder()(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        h = h.last_hidden_state[rows.to(self.device), cols.to(self.device)]
        return self.model.get_output_embeddings()(h).float().log_softmax(-1)

    @torch.no_grad()
    def token_logprobs(self, ids: torch.Tensor, mask: torch.Tensor, prefix_len: torch.Tensor | None = None):
        """[B, T-1]; with ``prefix_len``, positions before each row's ``prefix_len - 1`` and padding
        are not scored (left 0): callers read only the continuation."""
        if prefix_len is None or not self._split:
            lp = self._logits(ids, mask)[:, :-1].float().log_softmax(-1)
            return lp.gather(-1, ids[:, 1:, None].to(lp.device)).squeeze(-1).cpu()
        pos = torch.arange(ids.shape[1] - 1)
        want = (pos >= (prefix_len[:, None] - 1).clamp_min(0)) & (pos < mask.sum(1, keepdim=True) - 1)
        rows, cols = want.nonzero(as_tuple=True)
        lp = self._logprobs_at(ids, mask, rows, cols)
        out = torch.zeros(ids.shape[0], ids.shape[1] - 1)
        out[rows, cols] = lp.gather(-1, ids[rows, cols + 1][:, None].to(lp.device)).squeeze(-1).cpu()
        return out

    @torch.no_grad()
    def next_logprobs(self, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor):
        if self._split:
            return self._logprobs_at(ids, mask, torch.arange(len(ids)), last).cpu()
        logits = self._logits(ids, mask)
        return logits[torch.arange(len(ids)), last.to(logits.device)].float().log_softmax(-1).cpu()

    @torch.no_grad()
    def greedy_steps(self, seqs: Sequence[list[int]]) -> Iterator[list[int]]:
        """Each row's greedy next token, step after step, from a KV cache (``kv_cache`` models only):
        the same tokens as ``recomputed_steps`` up to float summation order, at one position per step.
        Rows stay right-padded: each new token takes its row's own next position, the padding between
        stays masked."""
        ids, mask = (t.to(self.device) for t in _pad(seqs, self.tokenizer.pad_token_id))
        pos = mask.sum(1, keepdim=True)  # the next token's position in each row
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        with self.scope():
            out = decoder(input_ids=ids, attention_mask=mask, use_cache=True)
        h = out.last_hidden_state[torch.arange(len(seqs), device=self.device), pos[:, 0] - 1]
        cache = cache_argument(decoder)
        while True:
            nxt = head(h).float().log_softmax(-1).argmax(-1, keepdim=True)
            yield nxt[:, 0].tolist()
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            with self.scope():
                out = decoder(
                    input_ids=nxt,
                    attention_mask=mask,
                    position_ids=pos,
                    use_cache=True,
                    **{cache: getattr(out, cache)},  # keyword and output field renamed alike
                )
            h, pos = out.last_hidden_state[:, -1], pos + 1


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


@dataclass
class Score:
    """A task score with its item count, 95% interval and, per item in the task's order, whether it was
    right (so that two models can be compared on the same items: ``report.paired_difference``)."""

    value: float
    n: int
    low: float
    high: float
    correct: list[int] | None = None

    @classmethod
    def of(cls, correct: Sequence[bool]) -> Score:
        k, n = sum(map(bool, correct)), len(correct)
        return cls(k / n if n else 0.0, n, *wilson(k, n), [int(bool(c)) for c in correct])

    def as_dict(self) -> dict:
        out = {"value": self.value, "n": self.n, "ci95": [self.low, self.high]}
        return out | ({"correct": self.correct} if self.correct is not None else {})


# --------------------------------------------------------------------------------------------------


def _pad(seqs: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def sequence_nll(lm, ids: Sequence[Sequence[int]], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: total next-token NLL (nats) and the number of predicted tokens (padding aside)."""
    totals, counts = [], []
    for start in range(0, len(ids), batch_size):
        batch, mask = _pad([list(x) for x in ids[start : start + batch_size]], lm.tokenizer.pad_token_id)
        lp = lm.token_logprobs(batch, mask)
        valid = mask[:, 1:].to(lp.dtype)
        totals.append(-(lp * valid).sum(1))
        counts.append(valid.sum(1))
    if not totals:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(totals), torch.cat(counts)


def _packed_with_owners(docs: Sequence[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``blocks_for`` plus, for every token, the index of the document it came from."""
    token_lists = tokenize(docs, tokenizer)
    blocks = pack(token_lists, seq_len)
    owner = torch.repeat_interleave(
        torch.arange(len(token_lists)), torch.tensor([len(t) for t in token_lists])
    )
    return blocks, owner[: blocks.numel()].view_as(blocks)


def bootstrap_ppl(nll: torch.Tensor, tokens: torch.Tensor, n: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of perplexity, resampling documents (per-document summed NLL
    and token counts): documents, not tokens, are the independent units of a test split."""
    keep = tokens > 0
    nll, tokens = nll[keep].double(), tokens[keep].double()
    if len(nll) < 2:
        mean = float(nll.sum() / tokens.sum().clamp_min(1))
        return [math.exp(mean), math.exp(mean)]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(nll), (n, len(nll)), generator=g)
    means = nll[idx].sum(1) / tokens[idx].sum(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [math.exp(lo), math.exp(hi)]


@torch.no_grad()
def perplexity(
    lm, docs: Sequence[str], seq_len: int, batch_size: int = 16, max_blocks: int | None = 64
) -> dict:
    """Token-level perplexity of packed held-out documents (mean NLL over every predicted token), with
    a bootstrap interval over documents."""
    blocks, owner = _packed_with_owners(docs, lm.tokenizer, seq_len)
    blocks, owner = blocks[:max_blocks], owner[:max_blocks]
    doc_nll = torch.zeros(len(docs), dtype=torch.float64)
    doc_tokens = torch.zeros(len(docs), dtype=torch.float64)
    for start in range(0, len(blocks), batch_size):
        b = blocks[start : start + batch_size]
        tok_nll = -lm.token_logprobs(b, torch.ones_like(b)).double()
        who = owner[start : start + batch_size, 1:].reshape(-1)  # each predicted token's document
        doc_nll.index_add_(0, who, tok_nll.reshape(-1))
        doc_tokens.index_add_(0, who, torch.ones_like(tok_nll.reshape(-1)))
    n = int(doc_tokens.sum())
    mean = float(doc_nll.sum()) / n
    return {
        "perplexity": math.exp(mean),
        "loss": mean,
        "tokens": n,
        "blocks": len(blocks),
        "documents": int((doc_tokens > 0).sum()),
        "ci95": bootstrap_ppl(doc_nll, doc_tokens),
    }


def split_choice(context: str, choice: str) -> tuple[str, str]:
    """lm-evaluation-harness convention: trailing whitespace of the context belongs to the continuation,
    so "the cat " + "sat" is scored as "the cat" + " sat" (the way the text tokenises as a whole)."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + choice) if n else (context, choice)


def choice_tokens(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids and continuation ids: context and continuation are tokenised together, and the
    continuation is every token beyond the context's own encoding (lm-evaluation-harness)."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def multiple_choice(lm, items: Sequence[dict], batch_size: int = 32) -> dict[str, Score]:
    """Accuracy by summed log-likelihood of each choice's continuation tokens (``acc``) and by that sum
    per character of the continuation (``acc_norm``), both as lm-evaluation-harness computes them."""
    tok = lm.tokenizer
    rows = []  # (item index, choice index, context ids, continuation ids)
    nchars = torch.ones((len(items), len(items[0]["choices"]) if items else 0))
    for i, it in enumerate(items):
        for j, choice in enumerate(it["choices"]):
            context, continuation = split_choice(it["context"], choice)
            ctx, cont = choice_tokens(tok, context, continuation)
            if not cont:  # the choice merged into the context's last token: no way to score it alone
                cont = tok(continuation, add_special_tokens=False)["input_ids"]
            rows.append((i, j, ctx, cont))
            nchars[i, j] = max(1, len(continuation))
    scores = torch.full(nchars.shape, float("-inf"))
    rows.sort(key=lambda r: len(r[2]) + len(r[3]))  # similar lengths per batch: little padding
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids, mask = _pad([c + d for _, _, c, d in chunk], tok.pad_token_id)
        prefix = torch.tensor([len(c) for _, _, c, _ in chunk])
        lp = lm.token_logprobs(ids, mask, prefix)
        for r, (i, j, c, d) in enumerate(chunk):
            scores[i, j] = lp[r, len(c) - 1 : len(c) + len(d) - 1].sum()
    answers = torch.tensor([it["answer"] for it in items])
    return {
        name: Score.of((s.argmax(1) == answers).tolist())
        for name, s in (("acc", scores), ("acc_norm", scores / nchars))
    }


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def first_number(text: str) -> str | None:
    m = NUMBER.search(text)
    return m.group(0).replace(",", "") if m else None


@torch.no_grad()
def greedy(
    lm,
    prompts: Sequence[str],
    max_new_tokens: int = 10,
    batch_size: int = 32,
    done: Callable[[str], bool] | None = None,
) -> list[str]:
    """Greedy continuations: from a KV cache where ``lm`` allows it (``HFLM.greedy_steps``), else by
    recomputing the prefix every step (any ``lm``). A batch stops early once ``done(text so far)``
    holds for each of its rows; prompts are batched by length."""
    tok = lm.tokenizer
    encoded = [tok(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outs: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [encoded[i] for i in idx]
        new = [[] for _ in seqs]
        steps = lm.greedy_steps(seqs) if getattr(lm, "kv_cache", False) else recomputed_steps(lm, seqs)
        for _ in range(max_new_tokens):
            for n, t in zip(new, next(steps), strict=True):
                n.append(t)
            if done and all(done(tok.decode(n, skip_special_tokens=True)) for n in new):
                break
        for i, n in zip(idx, new, strict=True):
            outs[i] = tok.decode(n, skip_special_tokens=True)
    return outs


def recomputed_steps(lm, seqs: Sequence[list[int]]) -> Iterator[list[int]]:
    """Each row's greedy next token, step after step, each from the whole prefix again."""
    cur = [list(s) for s in seqs]
    while True:
        ids, mask = _pad(cur, lm.tokenizer.pad_token_id)
        nxt = lm.next_logprobs(ids, mask, torch.tensor([len(c) - 1 for c in cur])).argmax(-1).tolist()
        yield nxt
        for c, t in zip(cur, nxt, strict=True):
            c.append(t)


def number_finished(text: str) -> bool:
    """True once more tokens cannot change ``first_number(text)``: a number followed by a character
    that cannot continue it."""
    m = NUMBER.search(text)
    return m is not None and m.end() < len(text) and text[m.end()] not in ".,/0123456789"


def exact_match(lm, items: Sequence[dict], max_new_tokens: int = 10) -> Score:
    """Share of items whose first generated number equals the answer exactly."""
    gens = greedy(lm, [it["prompt"] for it in items], max_new_tokens, done=number_finished)
    return Score.of([first_number(g) == it["answer"] for g, it in zip(gens, items, strict=True)])
