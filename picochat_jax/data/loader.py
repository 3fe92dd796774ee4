"""grain pipelines for base pretraining (packed token windows) and SFT (padded chat rows).

Both produce *global* batches indexable by step: `source.batch(step)` is a pure function of (seed, step),
so the data position in a checkpoint is just the step number and resume replays the exact same batches.
Each epoch is reshuffled (grain reseeds per epoch). `source.iterate(start)` streams with grain's
background prefetch threads so the accelerator is never waiting on Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from picochat_jax.tokenizer import ChatTokenizer


def pack_documents(docs_ids: Sequence[Sequence[int]], bos_id: int, window: int) -> dict[str, np.ndarray]:
    """Concatenate `<|bos|> doc` streams and cut non-overlapping windows of window+1 tokens.

    Segment ids number the documents inside each window so attention never crosses a boundary.
    """
    stream = np.concatenate([np.concatenate([[bos_id], np.asarray(d, np.int32)]) for d in docs_ids]).astype(np.int32)
    n = len(stream) // (window + 1)
    if n == 0:
        raise ValueError(f"corpus has {len(stream)} tokens: too few for one window of {window + 1}")
    stream = stream[: n * (window + 1)].reshape(n, window + 1)
    segments = np.cumsum(stream == bos_id, axis=1).astype(np.int32)
    return {
        "inputs": stream[:, :-1],
        "targets": stream[:, 1:],
        # Predicting the next document's <|bos|> is not learnable: leave it out of the loss.
        "loss_mask": (stream[:, 1:] != bos_id).astype(np.float32),
        "segment_ids": segments[:, :-1],
    }


def split_examples(examples: dict[str, np.ndarray], val_fraction: float, seed: int) -> tuple[dict, dict]:
    """Deterministic shuffled train/val split; val gets at least one example when there are two or more."""
    n = len(next(iter(examples.values())))
    order = np.random.default_rng(seed).permutation(n)
    n_val = 0 if n < 2 or val_fraction <= 0 else max(1, round(n * val_fraction))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return ({k: v[train_idx] for k, v in examples.items()}, {k: v[val_idx] for k, v in examples.items()})


def category_repeats(categories: Sequence[str], mode: str) -> np.ndarray:
    """How many times each row appears per epoch so that categories get equal shares (`balanced`) or shares
    proportional to the square root of their size (`sqrt`); `uniform` is once each. Every row appears at least
    once, and the repeats are a pure function of the categories, so resume replays the same batches."""
    n = len(categories)
    if mode == "uniform" or n == 0:
        return np.ones(n, np.int64)
    names, inverse, counts = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True,
                                       return_counts=True)
    if mode == "balanced":
        share = np.full(len(names), 1.0 / len(names))
    elif mode == "sqrt":
        share = np.sqrt(counts) / np.sqrt(counts).sum()
    else:
        raise ValueError(f"sampling must be uniform|balanced|sqrt, got {mode!r}")
    # A category's rows are repeated to fill its share of an epoch as long as the largest category's own
    # share needs: the biggest category (relative to its share) keeps one copy per row.
    epoch = float(np.max(counts / share))
    per_row = share * epoch / counts
    return np.maximum(1, np.rint(per_row[inverse])).astype(np.int64)


def resample_by_category(examples: dict[str, np.ndarray], categories: Sequence[str],
                         mode: str) -> dict[str, np.ndarray]:
    """Row-aligned examples with each row repeated `category_repeats` times (an epoch with the given mix)."""
    if mode == "uniform":
        return examples
    idx = np.repeat(np.arange(len(categories)), category_repeats(categories, mode))
    return {k: v[idx] for k, v in examples.items()}


@dataclass
class BatchSource:
    """Global batches of shape (grad_accum, batch_size, ...) drawn from row-aligned example arrays."""

    examples: dict[str, np.ndarray]
    batch_size: int
    grad_accum: int = 1
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        self.num_examples = len(next(iter(self.examples.values())))
        if self.num_examples == 0:
            raise ValueError("no examples to batch")
        import grain  # here, not at module import: hf-sft's trainers and the GPU benchmarks import this module

        rows = self.batch_size * self.grad_accum
        ds = grain.MapDataset.range(self.num_examples)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed)
        self._dataset = ds.repeat(None).batch(rows, drop_remainder=True).map(self._gather)

    def _gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(idx)
        shape = (self.grad_accum, self.batch_size)
        return {k: v[idx].reshape(shape + v.shape[1:]) for k, v in self.examples.items()}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self._dataset[step]

    def iterate(self, start: int = 0, prefetch: int = 4) -> Iterator[dict[str, np.ndarray]]:
        import grain

        sliced = self._dataset[start:]
        return iter(sliced.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch)))

    @property
    def epochs_per_step(self) -> float:
        return self.batch_size * self.grad_accum / self.num_examples


def base_examples(docs: Sequence[str], tok: ChatTokenizer, seq_len: int) -> dict[str, np.ndarray]:
    return pack_documents(tok.encode_batch(docs), tok.bos_id, seq_len)


def eval_batches(examples: dict[str, np.ndarray], batch_size: int,
                 max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """Fixed, unshuffled validation batches of shape (1, batch_size, ...): every row once (at most
    `max_batches` batches). The last batch is filled up by wrapping around (one compiled shape), with the
    wrapped rows' loss mask zeroed so no example counts twice."""
    n = len(next(iter(examples.values())))
    if n == 0:
        return []
    count = max(1, -(-n // batch_size))
    if max_batches is not None:
        count = min(max_batches, count)
    out = []
    for b in range(count):
        positions = np.arange(b * batch_size, (b + 1) * batch_size)
        batch = {k: v[positions % n] for k, v in examples.items()}
        batch["loss_mask"] = batch["loss_mask"] * (positions < n)[:, None]
        out.append({k: v[None] for k, v in batch.items()})
    return out
