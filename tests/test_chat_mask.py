"""The assistant-only mask and the native chat template."""

from __future__ import annotations

import numpy as np
import pytest

from picochat_jax.data.chat import encode_conversations, encode_prompt, pad_examples, render_text
from picochat_jax.data.records import Conversation, Message
from picochat_jax.tokenizer import ChatTokenizer, train_tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 20, "Tokenizers turn text into ids. " * 20]


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return train_tokenizer(TEXTS, "bpe", 300)


def _conv(*pairs: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(r, c) for r, c in pairs))


def _masked_text(tok: ChatTokenizer, ids: np.ndarray, mask: np.ndarray) -> str:
    return tok.decode(ids[mask].tolist(), skip_special_tokens=False)


def test_single_turn_mask_is_exactly_the_answer_and_end(tok):
    conv = _conv(("user", "What does a tokenizer do?"), ("assistant", "It turns text into ids."))
    [(ids, mask)] = encode_conversations([conv], tok)
    assert _masked_text(tok, ids, mask) == "It turns text into ids.<|end|>"
    answer_len = len(tok.encode("It turns text into ids.")) + 1
    assert mask.sum() == answer_len
    assert mask[-answer_len:].all() and not mask[:-answer_len].any()


def test_multi_turn_mask_covers_only_the_final_assistant_message(tok):
    conv = _conv(("system", "Be brief."), ("user", "hi"), ("assistant", "hello there"),
                 ("user", "and the fox?"), ("assistant", "The fox jumps."))
    [(ids, mask)] = encode_conversations([conv], tok)
    assert _masked_text(tok, ids, mask) == "The fox jumps.<|end|>"
    # earlier assistant turn, system prompt and role headers are context only
    assert "hello there" not in _masked_text(tok, ids, mask)
    assert ids[0] == tok.bos_id


def test_all_assistant_turns_option(tok):
    conv = _conv(("user", "hi"), ("assistant", "hello there"), ("user", "and?"), ("assistant", "The fox jumps."))
    [(ids, mask)] = encode_conversations([conv], tok, all_assistant_turns=True)
    assert _masked_text(tok, ids, mask) == "hello there<|end|>The fox jumps.<|end|>"


def test_ids_equal_encoding_the_rendered_template(tok):
    conv = _conv(("system", "sys"), ("user", "the lazy dog"), ("assistant", "quick brown fox"))
    [(ids, _)] = encode_conversations([conv], tok)
    assert ids.tolist() == tok.encode_template(render_text(conv.messages))
    prompt = encode_prompt(conv.prompt_messages, tok)
    assert prompt.tolist() == tok.encode_template(render_text(conv.prompt_messages, add_generation_prompt=True))
    assert prompt.tolist() == ids[: len(prompt)].tolist()


def test_pad_examples_shifts_and_left_truncates(tok):
    short = _conv(("user", "a"), ("assistant", "b"))
    long = _conv(("user", "the lazy dog " * 30), ("assistant", "fox"))
    encoded = encode_conversations([short, long], tok)
    arrays, truncated = pad_examples(encoded, 16, tok.pad_id)
    assert truncated == 1
    ids, mask = encoded[0]
    n = len(ids) - 1
    assert arrays["inputs"][0, :n].tolist() == ids[:-1].tolist()
    assert arrays["targets"][0, :n].tolist() == ids[1:].tolist()
    assert arrays["loss_mask"][0].sum() == mask[1:].sum()
    # the truncated row keeps its target at the end
    lids, lmask = encoded[1]
    assert arrays["targets"][1].tolist() == lids[-16:].tolist()
    assert arrays["loss_mask"][1].sum() == lmask.sum()
