"""grain pipelines over row tables: packed token rows from disk shards (base pretraining, data/shards.py) and
padded chat rows in memory (SFT, DPO, hf-sft).

Both produce *global* batches indexable by step: `source.batch(step)` is a pure function of (seed, step),
so the data position in a checkpoint is just the step number and resume replays the exact same batches.
Each epoch is reshuffled (grain reseeds per epoch). `source.iterate(start)` streams with grain's
background prefetch threads so the accelerator is never waiting on Python.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


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


class RowTable(Protocol):
    """Rows addressable by index: `take(indices)` gives a dict of arrays with a leading (len(indices),) axis."""

    def __len__(self) -> int: ...

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class ArrayRows:
    """A RowTable over row-aligned in-memory arrays."""

    def __init__(self, examples: dict[str, np.ndarray]):
        self.examples = examples

    def __len__(self) -> int:
        return len(next(iter(self.examples.values())))

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self.examples.items()}


def as_rows(table: RowTable | dict[str, np.ndarray]) -> RowTable:
    return ArrayRows(table) if isinstance(table, dict) else table


def row_length(table: RowTable | dict[str, np.ndarray]) -> int:
    """Tokens per row (the model's sequence length for this data)."""
    return int(as_rows(table).take(np.zeros(1, np.int64))["inputs"].shape[1])


@dataclass
class BatchSource:
    """Global batches of shape (grad_accum, batch_size, ...) drawn from a row table (or row-aligned arrays)."""

    examples: Any  # RowTable | dict[str, np.ndarray]
    batch_size: int
    grad_accum: int = 1
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        self.rows = as_rows(self.examples)
        self.num_examples = len(self.rows)
        if self.num_examples == 0:
            raise ValueError("no examples to batch")
        import grain  # here, not at module import: hf-sft's trainers and the GPU benchmarks import this module

        rows = self.batch_size * self.grad_accum
        ds = grain.MapDataset.range(self.num_examples)
        if self.shuffle:
            ds = ds.shuffle(seed=self.seed)
        self._dataset = ds.repeat(None).batch(rows, drop_remainder=True).map(self._gather)

    def _gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        shape = (self.grad_accum, self.batch_size)
        return {k: v.reshape(shape + v.shape[1:]) for k, v in self.rows.take(np.asarray(idx)).items()}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self._dataset[step]

    def iterate(self, start: int = 0, prefetch: int = 4) -> Iterator[dict[str, np.ndarray]]:
        import grain

        sliced = self._dataset[start:]
        return iter(sliced.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch)))

    @property
    def epochs_per_step(self) -> float:
        return self.batch_size * self.grad_accum / self.num_examples


CPU_LENGTH_BUCKETS = 2  # SFT rows of the pico run: 28% fewer positions, one more compile (docs/performance.md)


def resolve_length_buckets(length_buckets: int | None, platform: str | None = None) -> int:
    """`TrainConfig.length_buckets` as the driver uses it: None (auto) is CPU_LENGTH_BUCKETS on CPU, where a
    compile takes seconds, and 1 on accelerators, where each new shape compiles for a minute or more."""
    if length_buckets is not None:
        return length_buckets
    import jax

    return CPU_LENGTH_BUCKETS if (platform or jax.default_backend()) == "cpu" else 1


def trim_trailing_padding(batch: dict[str, np.ndarray], buckets: int) -> dict[str, np.ndarray]:
    """`batch` with every (..., T) array cut after the last position where any row has a loss, rounded up to a
    multiple of T / `buckets`.

    Exact for causal-LM losses: a position before the cut never attends to one after it, and positions after
    it carry no loss, so the loss, its gradient and every metric are unchanged. Batches without `loss_mask`
    (preference pairs) and `buckets` <= 1 pass through as they are.
    """
    mask = batch.get("loss_mask")
    if buckets <= 1 or mask is None:
        return batch
    T = mask.shape[-1]
    used = np.flatnonzero(np.asarray(mask).reshape(-1, T).any(axis=0))
    last = int(used[-1]) + 1 if used.size else 1
    unit = -(-T // buckets)
    length = min(T, -(-last // unit) * unit)
    if length == T:
        return batch
    return {k: v[..., :length] if v.ndim == mask.ndim and v.shape[-1] == T else v for k, v in batch.items()}


def kept_tokens(full: dict[str, np.ndarray], trimmed: dict[str, np.ndarray], tokens_per_step: int) -> int:
    """The positions a step computes after `trim_trailing_padding`: `tokens_per_step` scaled by the kept share of
    the row length, so throughput counts what ran rather than the padding that was cut."""
    if trimmed is full or "loss_mask" not in full:
        return tokens_per_step
    return tokens_per_step * trimmed["loss_mask"].shape[-1] // full["loss_mask"].shape[-1]


def eval_batches(examples: RowTable | dict[str, np.ndarray], batch_size: int,
                 max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """Fixed, unshuffled validation batches of shape (1, batch_size, ...): every row once (at most
    `max_batches` batches). The last batch is filled up by wrapping around (one compiled shape), with the
    wrapped rows' loss mask (or pair weight) zeroed so no example counts twice."""
    rows = as_rows(examples)
    n = len(rows)
    if n == 0:
        return []
    count = max(1, -(-n // batch_size))
    if max_batches is not None:
        count = min(max_batches, count)
    out = []
    for b in range(count):
        positions = np.arange(b * batch_size, (b + 1) * batch_size)
        batch = rows.take(positions % n)
        real = positions < n
        if "loss_mask" in batch:
            batch["loss_mask"] = batch["loss_mask"] * real[:, None]
        if "pair_weight" in batch:  # preference pairs (DPO) are weighted per row
            batch["pair_weight"] = batch["pair_weight"] * real
        out.append({k: v[None] for k, v in batch.items()})
    return out
