"""Native chat rendering and the assistant-only loss mask.

A conversation renders as

    <|bos|> <|role|> content <|end|> <|role|> content <|end|> ... <|assistant|> answer <|end|>

The mask marks the final assistant message's content and its `<|end|>` (so the model learns to stop);
role tokens, earlier turns, the system prompt and tool definitions are context. The mask is built from
per-part lengths with `np.repeat`, never a per-token Python loop, and `encode_conversations` tokenizes a whole
dataset in one batched call to the Rust tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from picochat_jax.data.records import Conversation, DataError, Message, PreferenceRow
from picochat_jax.tokenizer import BOS, END, ROLE_TOKENS, ChatTokenizer


def render_text(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The chat template as a string; encoding it yields the same ids as `encode_conversations`."""
    text = BOS + "".join(f"{ROLE_TOKENS[m.role]}{m.content}{END}" for m in messages)
    return text + (ROLE_TOKENS["assistant"] if add_generation_prompt else "")


# The same template for transformers' apply_chat_template (exported with the tokenizer).
JINJA_CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def target_flags(conv: Conversation, all_assistant_turns: bool = False) -> np.ndarray:
    roles = np.array([m.role for m in conv.messages])
    if all_assistant_turns:
        return roles == "assistant"
    flags = np.zeros(len(roles), bool)
    flags[-1] = True
    return flags


def _assemble(
    content_ids: Sequence[Sequence[int]], roles: Sequence[str], flags: np.ndarray, tok: ChatTokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Interleave [role] [content..., end] parts and expand per-part target flags with np.repeat."""
    n = len(roles)
    headers = np.array([tok.role_ids[r] for r in roles], np.int32)
    parts: list[np.ndarray] = [np.array([tok.bos_id], np.int32)]
    for i in range(n):  # one iteration per message, not per token
        parts.append(headers[i : i + 1])
        parts.append(np.asarray(list(content_ids[i]) + [tok.end_id], np.int32))
    lengths = np.array([len(p) for p in parts])
    part_is_target = np.zeros(len(parts), bool)
    part_is_target[2::2] = flags  # body parts sit at 2, 4, 6, ...
    return np.concatenate(parts), np.repeat(part_is_target, lengths)


def encode_conversations(
    convs: Sequence[Conversation], tok: ChatTokenizer, all_assistant_turns: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(ids int32[L], loss_mask bool[L])] per conversation; mask covers the training target tokens."""
    flat = [m.content for c in convs for m in c.messages]
    encoded = tok.encode_batch(flat)
    out, offset = [], 0
    for conv in convs:
        n = len(conv.messages)
        out.append(_assemble(encoded[offset : offset + n], [m.role for m in conv.messages],
                             target_flags(conv, all_assistant_turns), tok))
        offset += n
    return out


def encode_prompt(messages: Sequence[Message], tok: ChatTokenizer) -> np.ndarray:
    """Ids of a prompt followed by the generation prompt `<|assistant|>`."""
    ids, _ = _assemble(tok.encode_batch([m.content for m in messages]), [m.role for m in messages],
                       np.zeros(len(messages), bool), tok)
    return np.concatenate([ids, np.array([tok.role_ids["assistant"]], np.int32)])


def pad_examples(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int
) -> tuple[dict[str, np.ndarray], int]:
    """Shift into (inputs, targets, loss_mask) rows of exactly seq_len; left-truncate rows that are too long
    (the target sits at the end). Returns the arrays and how many rows were truncated."""
    n = len(examples)
    inputs = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), pad_id, np.int32)
    mask = np.zeros((n, seq_len), np.float32)
    truncated = 0
    for i, (ids, m) in enumerate(examples):
        if len(ids) > seq_len + 1:
            ids, m = ids[-(seq_len + 1) :], m[-(seq_len + 1) :]
            truncated += 1
        L = len(ids) - 1
        inputs[i, :L] = ids[:-1]
        targets[i, :L] = ids[1:]
        mask[i, :L] = m[1:]
    return {"inputs": inputs, "targets": targets, "loss_mask": mask}, truncated


SEQ_LEN_MULTIPLE = 16  # padded row lengths are rounded up to this: few shapes, little padding


def fit_seq_len(longest: int, cap: int) -> int:
    """One fixed row length for a dataset: its longest row rounded up to SEQ_LEN_MULTIPLE, at most `cap`."""
    return min(cap, -(-longest // SEQ_LEN_MULTIPLE) * SEQ_LEN_MULTIPLE)


def sft_examples(conversations: Sequence[Conversation], tok: ChatTokenizer, max_seq_len: int,
                 all_assistant_turns: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """(inputs, targets, loss_mask) rows for native chat SFT, and how many rows were left-truncated."""
    encoded = encode_conversations(conversations, tok, all_assistant_turns)
    return pad_examples(encoded, fit_seq_len(max(len(ids) for ids, _ in encoded) - 1, max_seq_len), tok.pad_id)


PREFERENCE_SIDES = ("chosen", "rejected")


def preference_conversations(rows: Sequence[PreferenceRow], side: str) -> list[Conversation]:
    """Each pair's prompt followed by its `side` ("chosen" or "rejected") reply, as chat rows."""
    return [Conversation(tuple(r.prompt) + (Message("assistant", getattr(r, side)),), source=r.source, line=r.line)
            for r in rows]


def _preference_arrays(rows: Sequence[PreferenceRow], encode: Any, pad_id: int, max_len: int,
                       ) -> tuple[dict[str, np.ndarray], int]:
    """`{side}_inputs|targets|mask` for both sides, `encode(conversations) -> [(ids, mask)]`, one shared padded
    length; and how many sides were cut."""
    encoded = {side: encode(preference_conversations(rows, side)) for side in PREFERENCE_SIDES}
    seq_len = fit_seq_len(max(len(ids) for side in PREFERENCE_SIDES for ids, _ in encoded[side]) - 1, max_len)
    out: dict[str, np.ndarray] = {}
    truncated = 0
    for side in PREFERENCE_SIDES:
        arrays, cut = pad_examples(encoded[side], seq_len, pad_id)
        truncated += cut
        out[f"{side}_inputs"], out[f"{side}_targets"], out[f"{side}_mask"] = (
            arrays["inputs"], arrays["targets"], arrays["loss_mask"])
    return out, truncated


def preference_examples(rows: Sequence[PreferenceRow], tok: ChatTokenizer, max_seq_len: int
                        ) -> tuple[dict[str, np.ndarray], int]:
    """Row-aligned arrays `{side}_inputs|targets|mask` for both sides of each preference pair, one shared padded
    length; the mask is the SFT encoder's (reply + `<|end|>`). Returns the arrays and how many sides were cut."""
    return _preference_arrays(rows, lambda convs: encode_conversations(convs, tok), tok.pad_id, max_seq_len)


# --------------------------------------------------------------------------------------------------------
# rows rendered with a model's own chat template (Hugging Face models: any object with `render` and
# `encode_rendered`, e.g. hf.chat_format.HFChatFormat)
# --------------------------------------------------------------------------------------------------------


def _render(fmt: Any, conv: Conversation, prompt: bool) -> str:
    messages = conv.messages[:-1] if prompt else conv.messages
    try:
        return fmt.render(messages, add_generation_prompt=prompt)
    except Exception as exc:  # jinja raises its own types (e.g. templates that reject a role order)
        raise DataError(conv.source, conv.line, "messages", f"the model's chat template failed: {exc}") from exc


def encode_template_rows(conversations: Sequence[Conversation], fmt: Any,
                         ) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """[(ids, target mask)] per row with the model's chat template — the target is what `render(full)` adds
    beyond `render(prompt, add_generation_prompt=True)` — and how many rows had a prompt rendering that is not
    a prefix of the full rendering (their target starts at the common prefix)."""
    full = fmt.encode_rendered([_render(fmt, c, prompt=False) for c in conversations])
    prompt = fmt.encode_rendered([_render(fmt, c, prompt=True) for c in conversations])
    out, mismatched = [], 0
    for conv, f_ids, p_ids in zip(conversations, full, prompt, strict=True):
        f_arr, p_arr = np.asarray(f_ids, np.int32), np.asarray(p_ids, np.int32)
        n = min(len(f_arr), len(p_arr))
        differs = f_arr[:n] != p_arr[:n]
        start = int(np.argmax(differs)) if differs.any() else n
        mismatched += int(start < len(p_arr))
        if start >= len(f_arr):
            raise DataError(conv.source, conv.line, "messages",
                            "the chat template renders no tokens for the final assistant message")
        out.append((f_arr, np.arange(len(f_arr)) >= start))
    return out, mismatched


def template_examples(conversations: Sequence[Conversation], fmt: Any, max_length: int,
                      ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(inputs, targets, loss_mask, length) rows rendered with the model's chat template, and their statistics.
    `length` (real positions per row) rides along for packing; it is not a model input."""
    encoded, mismatched = encode_template_rows(conversations, fmt)
    seq_len = fit_seq_len(max(len(ids) for ids, _ in encoded) - 1, max_length)
    examples, truncated = pad_examples(encoded, seq_len, fmt.pad_id)
    # Real positions per row: an HF pad id is often the eos id, which also ends turns inside the row.
    examples["length"] = np.asarray([min(len(ids) - 1, seq_len) for ids, _ in encoded], np.int64)
    return examples, {"rows": len(encoded), "seq_len": seq_len, "truncated_rows": truncated,
                      "template_prefix_mismatches": mismatched,
                      "target_tokens": int(examples["loss_mask"].sum())}


def template_preference_examples(rows: Sequence[PreferenceRow], fmt: Any, max_length: int,
                                 ) -> tuple[dict[str, np.ndarray], int]:
    """`preference_examples` for a model's own chat template (hf-dpo): both sides of each pair rendered as the
    prompt plus that reply, the mask over what the reply adds, one shared padded length."""
    return _preference_arrays(rows, lambda convs: encode_template_rows(convs, fmt)[0], fmt.pad_id, max_length)
