"""HFChatFormat: prompts and replies for HF models, through the model's own tokenizer and chat template.

It implements the `generate.ChatFormat` protocol (stop_ids, pad_id, encode_prompt, encode_text, decode),
so the generation engine, eval and serve treat HF models exactly like native ones. Rendering goes through
`tokenizer.apply_chat_template(..., tokenize=False)` and the text is then encoded with
`add_special_tokens=False`, as transformers itself does: templates that write their own BOS (Llama 3) do
not get a second one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from picochat_jax.data.records import Message

MessageLike = Message | dict[str, str]


def _as_dict(message: MessageLike) -> dict[str, str]:
    if isinstance(message, Message):
        return {"role": message.role, "content": message.content}
    return {"role": message["role"], "content": message["content"]}


def load_hf_tokenizer(model_dir: str | Path) -> Any:
    """transformers' tokenizer for a model folder (local files only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"no usable tokenizer files in {model_dir}: {exc}") from exc


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class HFChatFormat:
    """ChatFormat for an HF tokenizer with a chat template."""

    def __init__(self, tokenizer: Any, generation_config: dict[str, Any] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat_template: "
                             "use an instruct/chat model, or export one with a template")
        self.tokenizer = tokenizer
        # generation_config.json may list several stop ids (Llama 3: <|end_of_text|>, <|eot_id|>, ...).
        stops = _as_ids((generation_config or {}).get("eos_token_id")) + _as_ids(tokenizer.eos_token_id)
        if not stops:
            raise ValueError("the tokenizer and generation_config.json define no eos token: generation could not stop")
        self.stop_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))
        pad = tokenizer.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else self.stop_ids[0]

    @classmethod
    def load(cls, model_dir: str | Path) -> HFChatFormat:
        from picochat_jax.hf.io import read_generation_config

        return cls(load_hf_tokenizer(model_dir), read_generation_config(Path(model_dir)))

    def render(self, messages: Sequence[MessageLike], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template([_as_dict(m) for m in messages], tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def render_batch(self, conversations: Sequence[Sequence[MessageLike]], add_generation_prompt: bool) -> list[str]:
        return [self.render(c, add_generation_prompt) for c in conversations]

    def encode_rendered(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of already rendered chat texts, in one batched call to the Rust tokenizer."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    def encode_prompt(self, messages: Sequence[MessageLike]) -> list[int]:
        dicts = [_as_dict(m) for m in messages]
        specials = self.special_strings
        if any(s in d["content"] for d in dicts for s in specials):
            return self._encode_literal_contents(dicts)
        return self.encode_rendered([self.render(dicts, add_generation_prompt=True)])[0]

    @property
    def special_strings(self) -> tuple[str, ...]:
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        return tuple(dict.fromkeys([*self.tokenizer.all_special_tokens,
                                    *(t.content for t in decoder.values() if getattr(t, "special", False))]))

    def _encode_literal_contents(self, messages: list[dict[str, str]]) -> list[int]:
        """A prompt whose message contents hold special-token strings: the template's own text is encoded
        as usual, each content with `split_special_tokens`, so contents never become control tokens."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        rendered = self.render([{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)],
                               add_generation_prompt=True)
        parts = re.split("\ue000(\\d+)\ue001", rendered)
        if len(parts) != 2 * len(messages) + 1:
            raise ValueError("the chat template rewrites message contents, so contents holding special-token "
                             "strings cannot be encoded as plain text")
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                ids += self.tokenizer(part, add_special_tokens=False)["input_ids"] if part else []
            else:
                text = messages[int(part)]["content"]
                ids += self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [int(t) for t in ids]

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Raw completion: the tokenizer's own convention (Llama prepends BOS, Qwen adds nothing).
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def special_tokens(self) -> dict[str, str | None]:
        t = self.tokenizer
        return {"bos_token": t.bos_token, "eos_token": t.eos_token, "pad_token": t.pad_token}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_hf_chat(model: str | Path, *, precision: str = "fp32", max_len: int | None = None,
                 max_batch: int = 32, cache_dir: str | Path | None = None,
                 default_max_len: int = 4096, chunk_tokens: int = 8, scan_unroll: int = 1) -> tuple[Any, HFChatFormat]:
    """(generate.Engine, HFChatFormat) for an HF folder or cached hub id. The KV cache defaults to at most
    `default_max_len` positions (serve.hf_max_len): HF configs often advertise 128k contexts no eval needs."""
    from picochat_jax.generate import Engine
    from picochat_jax.hf.io import load_hf_model

    hf = load_hf_model(model, cache_dir)
    fmt = HFChatFormat.load(hf.path)
    length = max_len or min(hf.config.max_seq_len, default_max_len)
    return Engine(hf.params, hf.config, length, precision, max_batch=max_batch, chunk_tokens=chunk_tokens,
                  pad_id=fmt.pad_id, scan_unroll=scan_unroll), fmt
