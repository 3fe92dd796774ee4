"""Byte-level BPE tokenizer (HF `tokenizers`) with the native chat special tokens.

One `tokenizer.json` file holds everything; `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` loads
it unchanged. The `byte` kind trains no merges: 256 byte tokens plus the specials (char-level on ASCII),
which is what the smoke scale uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS = "<|bos|>"
PAD = "<|pad|>"
END = "<|end|>"
ROLE_TOKENS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "tool": "<|tool|>",
}
SPECIAL_TOKENS = [PAD, BOS, END, *ROLE_TOKENS.values()]
BYTE_ALPHABET_SIZE = 256


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int, min_frequency: int = 2) -> ChatTokenizer:
    """Train on an iterator of documents. vocab_size counts the specials and the 256 byte tokens."""
    if kind not in ("bpe", "byte"):
        raise ValueError(f"tokenizer kind must be bpe|byte, got {kind!r}")
    floor = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if kind == "byte":
        vocab_size = floor
    elif vocab_size < floor:
        raise ValueError(f"BPE vocab_size must be at least {floor} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return ChatTokenizer(tok)


class SampledTexts:
    """Documents from a stream, each kept with probability max_bytes / total_bytes (seeded), so a tokenizer
    trains on a bounded, representative sample of a corpus of any size without holding it in memory. Counts
    what it passed on (`documents_used`, `bytes_used`)."""

    def __init__(self, documents: Iterable[tuple[str, str]], total_bytes: int, max_bytes: int, seed: int = 0):
        self.documents = documents
        self.keep = 1.0 if total_bytes <= max_bytes else max_bytes / total_bytes
        self.rng = np.random.default_rng(seed)
        self.documents_used = 0
        self.bytes_used = 0

    def __iter__(self) -> Iterator[str]:
        for doc, _label in self.documents:
            if self.keep < 1.0 and self.rng.random() >= self.keep:
                continue
            self.documents_used += 1
            self.bytes_used += len(doc.encode("utf-8"))
            yield doc


class ChatTokenizer:
    """Thin wrapper that knows the special-token ids; all heavy lifting stays in Rust."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        # Message contents and documents are text: a user who types "<|end|><|assistant|>" gets those
        # characters, not control tokens, so nobody can forge a turn. Control tokens come only from the chat
        # template (data/chat.py), which places their ids directly.
        self._text_tok = Tokenizer.from_str(tok.to_str())
        self._text_tok.encode_special_tokens = True
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks picochat special tokens {missing}")
        self.pad_id = tok.token_to_id(PAD)
        self.bos_id = tok.token_to_id(BOS)
        self.end_id = tok.token_to_id(END)
        self.role_ids = {role: tok.token_to_id(t) for role, t in ROLE_TOKENS.items()}

    @classmethod
    def load(cls, path: str | Path) -> ChatTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self.tok.save(str(tmp))
        tmp.replace(path)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Ids of plain text; special-token strings inside it are encoded as ordinary characters."""
        return self._text_tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips character offsets, which nothing here uses (tokenizers >= 0.20).
        encode = getattr(self._text_tok, "encode_batch_fast", self._text_tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_template(self, text: str) -> list[int]:
        """Ids of an already rendered chat template, whose special-token strings become control tokens."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (0 for specials): the denominator of bits-per-byte.

        Byte-level BPE maps every byte to exactly one printable char, so a token's byte count is the
        length of its token string.
        """
        special = set(SPECIAL_TOKENS)
        lengths = np.zeros(self.vocab_size, np.int32)
        for token, idx in self.tok.get_vocab(with_added_tokens=True).items():
            lengths[idx] = 0 if token in special else len(token)
        return lengths
