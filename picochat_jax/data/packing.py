"""Best-fit packing: one algorithm for base pretraining rows (data/shards.py) and packed SFT rows (here).

Pieces (documents, or chat examples) go into fixed-length rows; each row takes, while it has room, the longest
waiting piece that fits. Packed rows carry segment ids (attention stays inside a piece) and per-segment
positions, so a packed row computes exactly what its pieces would compute in rows of their own.
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from collections.abc import Iterable

import numpy as np

PACKINGS = ("none", "bos_bestfit")


def best_fit_rows(piece_lengths: Iterable[int], row_tokens: int, pool_size: int = 1000,
                  crop: bool = True) -> tuple[array, array, array]:
    """Pack pieces (in stream order) into rows of `row_tokens`: each row takes, while it has room, the longest
    piece in a pool of the next `pool_size` pieces that fits. With `crop`, when none fits the row is filled
    with the head of the pool's longest piece and its tail goes back into the pool (nothing is dropped);
    without it the row is closed and padded. Pieces longer than a row must be cut before (crop) or rejected.

    Returns (row_start, span_piece, span_offset, span_length) as arrays: span k is `span_length[k]` tokens of
    piece `span_piece[k]` from `span_offset[k]`.
    """
    lengths = iter(piece_lengths)
    row_start, span_piece, span_offset, span_length = array("q", [0]), array("q"), array("q"), array("q")
    pool: list[tuple[int, int, int, int]] = []  # sorted (remaining length, arrival, piece, offset)
    arrival = itertools.count()
    next_piece = 0
    exhausted = False

    def refill() -> None:
        nonlocal next_piece, exhausted
        while not exhausted and len(pool) < pool_size:
            n = next(lengths, None)
            if n is None:
                exhausted = True
                break
            if n > row_tokens:
                raise ValueError(f"piece {next_piece} has {n} tokens, more than a row's {row_tokens}")
            if n > 0:
                bisect.insort(pool, (n, next(arrival), next_piece, 0))
            next_piece += 1

    refill()
    while pool:
        room = row_tokens
        while pool and room:
            i = bisect.bisect_right(pool, (room, float("inf"))) - 1
            if i >= 0:
                n, _, piece, offset = pool.pop(i)
                take = n
            elif crop:
                n, _, piece, offset = pool.pop()  # the longest piece: it would be cut somewhere anyway
                take = room
                bisect.insort(pool, (n - take, next(arrival), piece, offset + take))
            else:
                break
            span_piece.append(piece)
            span_offset.append(offset)
            span_length.append(take)
            room -= take
            refill()
        row_start.append(len(span_piece))
    return row_start, span_piece, span_offset, span_length


def span_layout(counts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, ...]:
    """Where the tokens of CSR-packed spans land in a (rows, width) batch: row r holds `counts[r]` consecutive
    spans of `lengths` tokens each, left to right from column 0. Per token: (row, column, offset inside its span,
    segment id 1, 2, ... within its row); the caller scatters values with `out[row, column] = ...`."""
    counts = np.asarray(counts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    span_row = np.repeat(np.arange(len(counts)), counts)
    flat_start = np.cumsum(lengths) - lengths  # where each span starts in the flat token list
    row_first_span = np.cumsum(counts) - counts
    column = flat_start - np.repeat(flat_start[row_first_span], counts)
    within = np.arange(int(lengths.sum())) - np.repeat(flat_start, lengths)
    segment = np.repeat(np.arange(len(lengths)) - np.repeat(row_first_span, counts) + 1, lengths)
    return np.repeat(span_row, lengths), np.repeat(column, lengths) + within, within, segment


def pack_examples(examples: dict[str, np.ndarray], seq_len: int, pad_id: int,
                  lengths: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Right-padded SFT rows (inputs, targets, loss_mask; padding only at the end) packed by best fit into rows
    of `seq_len`, whole examples only, with segment_ids (1, 2, ... per row; 0 = padding) and positions that
    restart per example. The assistant-only loss mask travels with each example's tokens. `lengths` gives each
    row's real positions; without it they are the positions before the first `pad_id` run (native tokenizers,
    whose pad token never occurs in text)."""
    if lengths is None:
        lengths = (examples["inputs"] != pad_id).sum(axis=1)
    lengths = np.asarray(lengths, np.int64)
    row_start, piece, _, length = best_fit_rows(lengths.tolist(), seq_len, crop=False)
    piece = np.frombuffer(piece, np.int64)
    length = np.frombuffer(length, np.int64)
    rows = len(row_start) - 1
    flat_row, flat_col, within, segment = span_layout(np.diff(np.frombuffer(row_start, np.int64)), length)
    src_row = np.repeat(piece, length)
    out = {"inputs": np.full((rows, seq_len), pad_id, np.int32), "targets": np.full((rows, seq_len), pad_id, np.int32),
           "loss_mask": np.zeros((rows, seq_len), np.float32), "segment_ids": np.zeros((rows, seq_len), np.int32),
           "positions": np.zeros((rows, seq_len), np.int32)}
    for key in ("inputs", "targets", "loss_mask"):
        out[key][flat_row, flat_col] = examples[key][src_row, within]
    out["segment_ids"][flat_row, flat_col] = segment
    out["positions"][flat_row, flat_col] = within
    return out
