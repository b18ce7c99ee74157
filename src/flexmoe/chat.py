"""Chat data and the chat template: read and validate conversations, render them with the OLMo-3
style template (``<|im_start|>role\\n...<|im_end|>\\n``), add its special tokens to a tokenizer (and
embedding rows to a model), and encode conversations with loss on assistant tokens only.

A chat file is JSONL, one conversation a line::

    {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}

A chat directory holds ``train.jsonl`` (and optionally ``valid.jsonl``; ``tasks.jsonl`` with checkable
answers, see ``flexmoe.chat_data``).

Packed chat rows are ``flexmoe.training.LabeledRows``: token ids and labels, the label ``IGNORE``
(-100) on every token that is not trained on, so the loop's plain LM loss is the assistant-only loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from flexmoe import validate
from flexmoe.errors import FlexmoeError
from flexmoe.training import IGNORE, LabeledRows

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (IM_START, IM_END)
# transformers renders this with trim_blocks: every newline is written explicitly inside {{ }}.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

Conversation = list[dict]


# --------------------------------------------------------------------------------------------------
# Reading and validating


def check_conversation(row, where: str) -> Conversation:
    """The ``messages`` of one JSONL row, or a FlexmoeError naming ``where`` (file:line) and the fault."""
    fix = 'write {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}.'
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        raise FlexmoeError(f"{where} has no list field 'messages'.", fix)
    msgs = row["messages"]
    if not msgs:
        raise FlexmoeError(f"{where}: the conversation is empty.", fix)
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise FlexmoeError(
                f"{where}: message {j} has unknown role {role!r}.", f"use one of {', '.join(ROLES)}."
            )
        if not isinstance(m.get("content"), str):
            raise FlexmoeError(
                f"{where}: message {j} ({m['role']}) has non-string content.", "make 'content' a string."
            )
        if any(t in m["content"] for t in CHAT_TOKENS):
            raise FlexmoeError(
                f"{where}: message {j} contains a chat control token ({IM_START} or {IM_END}).",
                "remove control tokens from the text; the template adds them.",
            )
    if not any(m["role"] == "assistant" for m in msgs):
        raise FlexmoeError(f"{where}: the conversation has no assistant turn.", "add the assistant's reply.")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def read_chat_file(path: Path) -> list[Conversation]:
    convs = []
    for lineno, row in validate.jsonl_rows(path):  # the reader of plain JSONL corpora too
        convs.append(check_conversation(row, f"{path}:{lineno}"))
    return convs


def chat_splits(path: Path | str) -> tuple[list[Conversation], list[Conversation]]:
    """(train, valid) conversations of a chat directory (``train.jsonl``, ``valid.jsonl``) or file;
    without a validation file every 20th conversation is held out."""
    path = Path(path)
    if path.is_dir() and (path / "train.jsonl").is_file():
        train = read_chat_file(path / "train.jsonl")
        valid = read_chat_file(path / "valid.jsonl") if (path / "valid.jsonl").is_file() else []
    elif path.is_file() and path.suffix == ".jsonl":
        train, valid = read_chat_file(path), []
    else:
        raise FlexmoeError(
            f"{path} is not a chat file or directory.", "pass a .jsonl file or a directory with train.jsonl."
        )
    if not train:
        raise FlexmoeError(f"{path} holds no conversations.", "add at least one conversation.")
    if not valid:
        valid = train[::20]
        train = [c for i, c in enumerate(train) if i % 20] or valid
    return train, valid


# --------------------------------------------------------------------------------------------------
# Template and tokens


def has_chat_tokens(tokenizer) -> bool:
    unk = tokenizer.unk_token_id
    return all(tokenizer.convert_tokens_to_ids(t) not in (None, unk) for t in CHAT_TOKENS)


def add_chat_template(tokenizer, model=None) -> int:
    """Add the chat special tokens and template to ``tokenizer``; grow ``model``'s embeddings and LM
    head to match. New rows start at the mean of the existing rows (a neutral token: its logit is the
    average logit, its input the average input). Returns the number of tokens added."""
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    if model is not None and model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for emb in {
                id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings())
            }.values():
                emb.weight[old:] = emb.weight[:old].mean(0)
    return added


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries flexmoe's chat tokens and a chat template (a post-trained model)."""
    return has_chat_tokens(tokenizer) and bool(getattr(tokenizer, "chat_template", None))


def require_chat_tokens(tokenizer, where: str) -> None:
    if not has_chat_template(tokenizer):
        raise FlexmoeError(
            f"{where} has no chat template.",
            "post-train the anchor first: "
            "flexmoe anchor train --stage sft --anchor A --chat DIR --out A-sft.",
        )


# --------------------------------------------------------------------------------------------------
# Encoding with an assistant-only loss mask


def encode_conversation(tokenizer, messages: Conversation) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether the loss is taken on it.

    Trained: each assistant turn's content and its ``<|im_end|>`` (the model must learn to stop).
    Each piece is tokenised on its own, exactly where generation starts a reply: after
    ``<|im_start|>assistant\\n``."""
    start, end = tokenizer.convert_tokens_to_ids(IM_START), tokenizer.convert_tokens_to_ids(IM_END)
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids, mask = [tokenizer.bos_token_id], [False]
    for m in messages:
        head = [start] + tokenizer(m["role"] + "\n", add_special_tokens=False)["input_ids"]
        body = tokenizer(m["content"], add_special_tokens=False)["input_ids"] + [end]
        trained = m["role"] == "assistant"
        ids += head + body + nl
        mask += [False] * len(head) + [trained] * len(body) + [False] * len(nl)
    return ids, mask


def chat_rows(convs: Sequence[Conversation], tokenizer, seq_len: int) -> LabeledRows:
    """Conversations packed into ``[n, seq_len]`` rows; labels are ``IGNORE`` except on trained tokens.
    Rows without any trained token are left out."""
    ids: list[int] = []
    labels: list[int] = []
    for c in convs:
        c_ids, mask = encode_conversation(tokenizer, c)
        ids += c_ids
        labels += [t if keep else IGNORE for t, keep in zip(c_ids, mask, strict=True)]
    n = len(ids) // seq_len
    if n == 0:
        raise FlexmoeError(
            f"The chat data has {len(ids)} tokens, fewer than one sequence of {seq_len}.",
            "add conversations or lower --seq-len.",
        )
    ids_t, labels_t = (
        torch.tensor(x[: n * seq_len], dtype=torch.long).view(n, seq_len) for x in (ids, labels)
    )
    # A row with no assistant token carries no loss; alone in an evaluation batch it would give NaN.
    keep = (labels_t != IGNORE).any(1)
    if not bool(keep.any()):
        raise FlexmoeError(
            "The chat data has no assistant replies.", "add assistant turns to the conversations."
        )
    return LabeledRows(ids_t[keep], labels_t[keep])


# --------------------------------------------------------------------------------------------------
# Generation


def prompt_turns(conversation: Conversation) -> Conversation:
    """The turns before the conversation's last assistant reply (all of them when it has none)."""
    replies = [i for i, m in enumerate(conversation) if m.get("role") == "assistant"]
    return conversation[: replies[-1]] if replies else conversation


def prompt_ids(tokenizer, messages: Conversation) -> list[int]:
    """The rendered prompt (every turn given, then ``<|im_start|>assistant\\n``) as token ids."""
    ids, _ = encode_conversation(tokenizer, [*messages, {"role": "assistant", "content": ""}])
    start = tokenizer.convert_tokens_to_ids(IM_START)
    last = len(ids) - 1 - ids[::-1].index(start)  # drop the empty reply: keep its header only
    head = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    return ids[: last + 1] + head


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[Conversation], max_new_tokens: int = 24, **sample
) -> list[list[int]]:
    """Generated token ids per prompt (greedy unless ``do_sample=True`` is passed), stopping at
    ``<|im_end|>`` or EOS; the stop token is kept, padding is not."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    stops = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id]
    seqs = [prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, seqs))
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    was = model.training
    model.eval()
    out = model.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=pad,
        do_sample=sample.pop("do_sample", False),
        **sample,
    )
    model.train(was)
    result = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        result.append(row[:cut])
    return result


def reply_text(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(
        [t for t in ids if t != tokenizer.convert_tokens_to_ids(IM_END)], skip_special_tokens=False
    )


def well_formed(tokenizer, ids: Sequence[int]) -> bool:
    """A generated turn is well-formed when it has content and ends with ``<|im_end|>`` and holds no
    other control token (no runaway into a new turn, no EOS instead of the end-of-turn token)."""
    end = tokenizer.convert_tokens_to_ids(IM_END)
    specials = set(tokenizer.all_special_ids)
    body = list(ids[:-1])
    return bool(ids) and ids[-1] == end and bool(body) and not any(t in specials for t in body)
