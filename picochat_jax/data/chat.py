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

import numpy as np

from picochat_jax.data.records import Conversation, Message
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
