"""Tokenized corpora on disk: fixed-size token shards, a document-level holdout, and BOS-aligned rows read back.

`tokenize_to_shards` turns a stream of documents into `<|bos|> doc <|bos|> doc ...` token streams, one per
split, cut into shards of exactly `shard_tokens` tokens (the last one shorter) stored as raw little-endian
uint16/uint32 arrays (`train-00000.bin`, ...) that numpy memory-maps. Whole documents are held out for
validation: the `k` documents with the smallest seeded hash of their index, `k = round(n * val_fraction)` (at
least one when there are two or more documents). `manifest.json` records the shards (tokens, documents,
sha256), the holdout rule and the tokenizer's fingerprint; `holdout.jsonl` lists the held-out documents.
The manifest is rewritten after every finished shard with each split's resume point, so an interrupted run
continues where it stopped and produces the same bytes as one that never stopped.

`PackedRows` reads a split back as training rows of `row_tokens` tokens: documents (longer ones cut into
row-sized pieces) are placed by best fit so every row starts at a piece boundary, a piece that fits nowhere
is cropped to fill the row and its remainder goes back into the pool, so no token is dropped. The plan is
a few integers per piece; the tokens stay on disk, so memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from picochat_jax.data.packing import best_fit_rows, span_layout
from picochat_jax.fileio import save_json, sha256_file
from picochat_jax.tokenizer import ChatTokenizer

SHARD_FORMAT = "picochat-token-shards/1"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MiB of uint16 per shard
ENCODE_BATCH_BYTES = 4 << 20  # text handed to one encode_batch call


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def holdout_scores(seed: int, count: int) -> np.ndarray:
    """A seeded, order-free score in [0, 1) per document index (splitmix64): the holdout picks the lowest."""
    with np.errstate(over="ignore"):
        z = np.arange(count, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 1) % (1 << 64))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def holdout_indices(num_documents: int, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the held-out documents: whole documents, a pure function of (count, fraction, seed)."""
    if num_documents < 2 or val_fraction <= 0:
        return np.zeros(0, np.int64)
    k = min(num_documents - 1, max(1, round(num_documents * val_fraction)))
    return np.sort(np.argsort(holdout_scores(seed, num_documents), kind="stable")[:k]).astype(np.int64)


class _SplitWriter:
    """One split's token stream, cut into fixed-size shards; its state is what the manifest records."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype, state: dict[str, Any]):
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, dtype
        self.shards: list[dict[str, Any]] = list(state.get("shards", []))
        # Resume point: documents before `next_document` are in finished shards, and the first
        # `next_document_offset` tokens of that document too.
        self.next_document = int(state.get("next_document", 0))
        self.next_document_offset = int(state.get("next_document_offset", 0))
        self.buffer = np.empty(shard_tokens, dtype)
        self.filled = 0
        self.buffer_documents = 0  # documents that start in the buffer
        self.pending_start = (self.next_document, self.next_document_offset)

    def wants(self, index: int) -> int | None:
        """Tokens of document `index` to skip (already on disk), or None when all of it is."""
        if index < self.next_document:
            return None
        return self.next_document_offset if index == self.next_document else 0

    def add(self, index: int, tokens: np.ndarray, skip: int, on_shard: Callable[[], None]) -> None:
        tokens = tokens[skip:]
        if skip == 0:
            self.buffer_documents += 1
        written = skip
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            written += take
            if self.filled == self.shard_tokens:
                done = not len(tokens)
                self.pending_start = (index + 1, 0) if done else (index, written)
                self._flush()
                on_shard()

    def _flush(self) -> None:
        if self.filled == 0:
            return
        name = f"{self.split}-{len(self.shards):05d}.bin"
        tmp = self.folder / f".{name}.tmp"
        self.buffer[:self.filled].tofile(tmp)
        os.replace(tmp, self.folder / name)
        self.shards.append({"file": name, "tokens": int(self.filled), "documents": self.buffer_documents,
                            "sha256": sha256_file(self.folder / name)})
        self.next_document, self.next_document_offset = self.pending_start
        self.filled, self.buffer_documents = 0, 0

    def finish(self, end_index: int) -> None:
        self.pending_start = (end_index, 0)
        self._flush()
        self.next_document, self.next_document_offset = end_index, 0

    def state(self) -> dict[str, Any]:
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards), "next_document": self.next_document,
                "next_document_offset": self.next_document_offset}


def read_manifest(folder: Path | str) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"token shards not found: {path} (make them with `picochat data tokenize`)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path}: not a picochat token-shard manifest (format {manifest.get('format')!r})")
    return manifest


def shard_settings(tok_fingerprint: dict[str, Any], shard_tokens: int, val_fraction: float, seed: int,
                   num_documents: int) -> dict[str, Any]:
    """What a resumed tokenization must share with the one it continues."""
    return {"tokenizer": tok_fingerprint, "shard_tokens": shard_tokens, "val_fraction": val_fraction,
            "seed": seed, "documents": num_documents}


def tokenize_to_shards(documents: Callable[[], Iterable[tuple[str, str]]], tok: ChatTokenizer, tokenizer_path: Path,
                       out_dir: Path | str, *, num_documents: int, val_fraction: float = 0.05, seed: int = 0,
                       shard_tokens: int = DEFAULT_SHARD_TOKENS, total_bytes: int | None = None,
                       progress: bool = True, sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Tokenize `documents()` ((text, label) pairs, streamed; `num_documents` of them) into shards under
    `out_dir`, continuing an interrupted tokenization of the same settings found there. Returns the manifest.

    Encoding runs in the Rust tokenizer's thread pool (all cores) on batches of about 4 MB of text, one batch
    ahead of the thread that turns ids into arrays and writes shards, so writing never stalls encoding.
    """
    from tqdm import tqdm

    from picochat_jax.checkpoint import tokenizer_fingerprint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = shard_settings(tokenizer_fingerprint(tokenizer_path), shard_tokens, val_fraction, seed, num_documents)
    previous: dict[str, Any] = {}
    if (out_dir / "manifest.json").exists():
        previous = read_manifest(out_dir)
        if previous.get("settings") != settings:
            diffs = [k for k in settings if previous.get("settings", {}).get(k) != settings[k]]
            raise ValueError(f"{out_dir} holds token shards made with other settings ({', '.join(diffs)}); "
                             "use a new folder")
        if previous.get("complete"):
            return previous
    dtype = token_dtype(tok.vocab_size)
    held_out = holdout_indices(num_documents, val_fraction, seed)
    held_set = set(held_out.tolist())
    writers = {s: _SplitWriter(out_dir, s, shard_tokens, dtype, previous.get("splits", {}).get(s, {}))
               for s in SPLITS}
    holdout_rows: list[dict[str, Any]] = []

    def manifest(complete: bool) -> dict[str, Any]:
        return {"format": SHARD_FORMAT, "complete": complete, "settings": settings, "dtype": dtype.name,
                "bos_id": tok.bos_id, "vocab_size": tok.vocab_size, "shard_tokens": shard_tokens,
                "documents": num_documents, "val_documents": len(held_out),
                "holdout": {"rule": "the round(n * val_fraction) documents (at least 1 of 2 or more) with the "
                                    "smallest splitmix64 score of (seed, document index)",
                            "val_fraction": val_fraction, "seed": seed, "file": "holdout.jsonl"},
                "splits": {s: w.state() for s, w in writers.items()}, "sources": sources or []}

    def checkpoint() -> None:
        save_json(out_dir / "manifest.json", manifest(False))

    start = min(w.next_document for w in writers.values())
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress,
               dynamic_ncols=True)

    def batches() -> Iterator[list[tuple[int, str, int]]]:
        batch: list[tuple[int, str, int]] = []
        size = 0
        for index, (text, label) in enumerate(documents()):
            if index >= num_documents:
                raise ValueError(f"the corpus yielded more than the {num_documents} documents it was counted with; "
                                 "did it change while tokenizing?")
            nbytes = len(text.encode("utf-8"))
            if index in held_set:
                holdout_rows.append({"index": index, "source": label, "bytes": nbytes})
            if index < start:
                bar.update(nbytes)
                continue
            batch.append((index, text, nbytes))
            size += len(text)
            if size >= ENCODE_BATCH_BYTES:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def encode(batch: list[tuple[int, str, int]]) -> list[list[int]]:
        return tok.encode_batch([text for _, text, _ in batch])

    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in itertools.chain(batches(), [None]):
            future = pool.submit(encode, batch) if batch is not None else None
            if pending is not None:
                done_batch, done_ids = pending[0], pending[1].result()
                for (index, _, nbytes), ids in zip(done_batch, done_ids, strict=True):
                    writer = writers["val" if index in held_set else "train"]
                    skip = writer.wants(index)
                    if skip is not None:
                        tokens = np.empty(len(ids) + 1, dtype)
                        tokens[0] = tok.bos_id
                        tokens[1:] = ids
                        writer.add(index, tokens, skip, checkpoint)
                    bar.update(nbytes)
            pending = (batch, future) if batch is not None else None
    bar.close()
    for w in writers.values():
        w.finish(num_documents)
    with (out_dir / ".holdout.jsonl.tmp").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in holdout_rows)
    os.replace(out_dir / ".holdout.jsonl.tmp", out_dir / "holdout.jsonl")
    final = manifest(True)
    save_json(out_dir / "manifest.json", final)
    return final


class TokenShards:
    """One split's shards as a single read-only token array (memory-mapped, nothing loaded)."""

    def __init__(self, folder: Path | str, split: str, manifest: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.manifest = manifest or read_manifest(self.folder)
        if not self.manifest.get("complete"):
            raise ValueError(f"{self.folder}: tokenization did not finish; run `picochat data tokenize` again "
                             "with the same arguments to complete it")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.bos_id = int(self.manifest["bos_id"])
        shards = [s for s in self.manifest["splits"][split]["shards"] if s["tokens"]]
        self.paths = [self.folder / s["file"] for s in shards]
        self.sizes = [int(s["tokens"]) for s in shards]
        for path, size in zip(self.paths, self.sizes, strict=True):
            if not path.exists() or path.stat().st_size != size * self.dtype.itemsize:
                raise ValueError(f"{path}: missing or not {size:,} tokens as {self.folder / 'manifest.json'} says")
        self.maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(n,)) for p, n in zip(self.paths, self.sizes,
                                                                                           strict=True)]
        sizes = np.asarray(self.sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.shard_tokens = int(self.manifest["shard_tokens"])

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at global positions (any shape), as int32."""
        flat = positions.reshape(-1)
        out = np.empty(flat.shape, np.int32)
        # Every shard but the last holds exactly shard_tokens, so the shard of a position is a division.
        which = np.minimum(flat // self.shard_tokens, len(self.maps) - 1)
        for s in np.unique(which):
            sel = which == s
            out[sel] = self.maps[s][flat[sel] - self.offsets[s]]
        return out.reshape(positions.shape)

    def document_starts(self, chunk: int = 1 << 22) -> np.ndarray:
        """Global positions of every `<|bos|>`: each document's first token. Read with plain file reads, not
        through the memory map, so scanning a large split does not leave its pages resident in this process."""
        starts = []
        for path, size, base in zip(self.paths, self.sizes, self.offsets[:-1], strict=True):
            for lo in range(0, size, chunk):
                block = np.fromfile(path, dtype=self.dtype, count=min(chunk, size - lo),
                                    offset=lo * self.dtype.itemsize)
                starts.append(np.flatnonzero(block == self.bos_id) + base + lo)
        return np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)


@dataclass(frozen=True)
class RowPlan:
    """Rows as runs of spans of the token stream (CSR): row r holds spans row_start[r]:row_start[r+1]."""

    row_start: np.ndarray  # (rows + 1,) int64
    span_start: np.ndarray  # (spans,) int64 global token position
    span_length: np.ndarray  # (spans,) int32

    @property
    def rows(self) -> int:
        return len(self.row_start) - 1


def plan_rows(document_starts: np.ndarray, total_tokens: int, row_tokens: int, pool_size: int = 1000) -> RowPlan:
    """BOS-aligned best-fit rows over a token stream whose documents start at `document_starts`."""
    ends = np.append(document_starts[1:], total_tokens).astype(np.int64)
    doc_lengths = ends - document_starts
    # Documents longer than a row become row-sized pieces: the first keeps the BOS, the rest continue it.
    pieces_per_doc = np.maximum(1, -(-doc_lengths // row_tokens))
    doc_of_piece = np.repeat(np.arange(len(doc_lengths)), pieces_per_doc)
    first_piece = np.concatenate([[0], np.cumsum(pieces_per_doc)[:-1]]).astype(np.int64)
    piece_rank = np.arange(len(doc_of_piece)) - first_piece[doc_of_piece]
    piece_start = document_starts[doc_of_piece] + piece_rank * row_tokens
    piece_length = np.minimum(row_tokens, ends[doc_of_piece] - piece_start)
    row_start, span_piece, span_offset, span_length = best_fit_rows(piece_length.tolist(), row_tokens, pool_size)
    pieces = np.frombuffer(span_piece, np.int64)
    return RowPlan(np.frombuffer(row_start, np.int64).copy(),
                   piece_start[pieces] + np.frombuffer(span_offset, np.int64),
                   np.frombuffer(span_length, np.int64).astype(np.int32))


class PackedRows:
    """Training rows of `seq_len` inputs from a token split: a grain random-access source (`len`, `[i]`) and a
    vectorised `take(indices)` for whole batches. Each row's spans are separate segments (attention stays
    inside one), positions restart per segment, and a target is in the loss only when it continues its
    segment; padding (only in the last rows) is out of the loss."""

    def __init__(self, shards: TokenShards, seq_len: int, pool_size: int = 1000):
        self.shards, self.seq_len = shards, seq_len
        self.row_tokens = seq_len + 1
        self.plan = plan_rows(shards.document_starts(), shards.total, self.row_tokens, pool_size)

    def __len__(self) -> int:
        return self.plan.rows

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.take(np.asarray([index])).items()}

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows, np.int64).reshape(-1)
        plan = self.plan
        first, last = plan.row_start[rows], plan.row_start[rows + 1]
        counts = last - first
        spans = np.repeat(first - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        lengths = plan.span_length[spans].astype(np.int64)
        flat_row, flat_col, within, segment = span_layout(counts, lengths)
        tokens = np.zeros((len(rows), self.row_tokens), np.int32)
        segments = np.zeros((len(rows), self.row_tokens), np.int32)  # 0 is padding
        positions = np.zeros((len(rows), self.row_tokens), np.int32)
        tokens[flat_row, flat_col] = self.shards.take(np.repeat(plan.span_start[spans], lengths) + within)
        segments[flat_row, flat_col] = segment
        positions[flat_row, flat_col] = within
        same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": same.astype(np.float32),
                "segment_ids": segments[:, :-1], "positions": positions[:, :-1]}


def shards_fingerprint(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a training run records of its data: the holdout settings and one hash over every shard's sha256,
    so resuming on other tokens is refused."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            digest.update(f"{split}/{shard['file']}:{shard['sha256']}\n".encode())
    return {**manifest["settings"], "shards_sha256": digest.hexdigest()}


def check_shards_tokenizer(manifest: dict[str, Any], folder: Path, tokenizer_path: Path) -> None:
    """Refuse shards made with another tokenizer than the one the model will be trained with."""
    from picochat_jax.checkpoint import tokenizer_fingerprint

    made_with = manifest["settings"]["tokenizer"]
    given = tokenizer_fingerprint(tokenizer_path)
    if made_with.get("sha256") != given["sha256"]:
        raise ValueError(f"{folder / 'manifest.json'} was tokenized with another tokenizer (sha256 "
                         f"{str(made_with.get('sha256'))[:12]}…) than {tokenizer_path} ({given['sha256'][:12]}…); "
                         "tokenize again with this tokenizer")
