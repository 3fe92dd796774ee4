"""Token shards on disk: exact contents, document holdout, resumable tokenization, BOS-aligned best-fit rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import picochat_jax.data.shards as shards_mod
from picochat_jax.cli import main
from picochat_jax.data.loader import BatchSource
from picochat_jax.data.packing import best_fit_rows
from picochat_jax.data.shards import (
    PackedRows,
    TokenShards,
    holdout_indices,
    read_manifest,
    tokenize_to_shards,
)
from picochat_jax.tokenizer import train_tokenizer

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "by", "the", "river", "while",
         "water", "cycles", "and", "presses", "print")


def _docs(n: int = 60, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [(" ".join(rng.choice(WORDS, int(rng.integers(3, 300)))), f"src{i % 3}") for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    tok = train_tokenizer((d for d, _ in _docs()), "bpe", 300, 2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return tok, path


def _tokenize(docs: list[tuple[str, str]], tokenizer: tuple[object, Path], out: Path, **kw: object) -> dict:
    tok, path = tokenizer
    return tokenize_to_shards(lambda: iter(docs), tok, path, out, num_documents=len(docs), progress=False,
                              **{"val_fraction": 0.1, "seed": 0, "shard_tokens": 1024, **kw})


def test_shards_hold_every_document_once_in_its_split(tmp_path: Path, tokenizer: tuple) -> None:
    tok, _ = tokenizer
    docs = _docs()
    manifest = _tokenize(docs, tokenizer, tmp_path / "sh")
    held = set(holdout_indices(len(docs), 0.1, 0).tolist())
    assert len(held) == 6 and manifest["val_documents"] == 6
    expected = {"train": [], "val": []}
    for i, (text, _) in enumerate(docs):
        expected["val" if i in held else "train"] += [tok.bos_id, *tok.encode(text)]
    for split in ("train", "val"):
        got = TokenShards(tmp_path / "sh", split)
        assert got.take(np.arange(got.total)).tolist() == expected[split]
        info = manifest["splits"][split]
        assert all(s["tokens"] == 1024 for s in info["shards"][:-1])  # fixed size, the last holds the rest
        assert info["documents"] == len(expected[split]) - len([t for t in expected[split] if t != tok.bos_id])
    assert manifest["dtype"] == "uint16"
    rows = [json.loads(line) for line in (tmp_path / "sh" / "holdout.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == sorted(held)


def test_holdout_is_whole_documents_seeded_and_stable() -> None:
    a = holdout_indices(1000, 0.05, seed=0)
    assert len(a) == 50 and np.array_equal(a, holdout_indices(1000, 0.05, seed=0))
    assert not np.array_equal(a, holdout_indices(1000, 0.05, seed=1))
    assert len(holdout_indices(3, 0.05, 0)) == 1  # a small corpus still gets one held-out document
    assert len(holdout_indices(1, 0.05, 0)) == 0 and len(holdout_indices(100, 0.0, 0)) == 0


def test_interrupted_tokenization_resumes_to_identical_bytes(tmp_path: Path, tokenizer: tuple,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs()
    _tokenize(docs, tokenizer, tmp_path / "whole")
    flushes = {"n": 0}
    real_flush = shards_mod._SplitWriter._flush

    def crash_on_fourth(self: object) -> None:
        real_flush(self)
        flushes["n"] += 1
        if flushes["n"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(shards_mod._SplitWriter, "_flush", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        _tokenize(docs, tokenizer, tmp_path / "cut")
    assert read_manifest(tmp_path / "cut")["complete"] is False
    monkeypatch.setattr(shards_mod._SplitWriter, "_flush", real_flush)
    _tokenize(docs, tokenizer, tmp_path / "cut")
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "cut").iterdir())
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name
    with pytest.raises(ValueError, match="other settings"):
        _tokenize(docs, tokenizer, tmp_path / "cut", seed=3)


def test_best_fit_places_every_token_once_and_rows_start_on_pieces() -> None:
    lengths = [5, 9, 3, 7, 10, 2, 2, 8, 1]
    row_start, piece, offset, length = best_fit_rows(lengths, row_tokens=10, pool_size=4)
    covered = {i: [] for i in range(len(lengths))}
    for p, o, n in zip(piece, offset, length, strict=True):
        covered[p] += list(range(o, o + n))
    assert all(sorted(covered[i]) == list(range(n)) for i, n in enumerate(lengths))  # nothing lost or repeated
    per_row = [sum(length[row_start[r]:row_start[r + 1]]) for r in range(len(row_start) - 1)]
    assert all(n == 10 for n in per_row[:-1]) and 0 < per_row[-1] <= 10
    assert sum(lengths) == sum(per_row)
    # Without cropping a row closes when nothing fits, and no piece is split.
    row_start, _, offset, _ = best_fit_rows(lengths, row_tokens=10, crop=False)
    assert all(o == 0 for o in offset)


def test_packed_rows_segments_positions_and_mask(tmp_path: Path, tokenizer: tuple) -> None:
    tok, _ = tokenizer
    _tokenize(_docs(), tokenizer, tmp_path / "sh")
    split = TokenShards(tmp_path / "sh", "train")
    rows = PackedRows(split, seq_len=63)
    assert rows.plan.span_length.sum() == split.total  # every token of the split is in exactly one row
    batch = rows.take(np.arange(len(rows)))
    seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    assert batch["inputs"].shape == (len(rows), 63)
    assert (seg[:, 0] == 1).all() and (pos[:, 0] == 0).all()  # rows start a segment
    for r in range(0, len(rows), 7):
        for s in np.unique(seg[r][seg[r] > 0]):
            where = np.flatnonzero(seg[r] == s)
            assert np.array_equal(pos[r, where], np.arange(len(where)))  # positions restart per segment
            span = batch["inputs"][r, where]
            if span[0] == tok.bos_id:
                assert (span[1:] != tok.bos_id).all()  # one document per segment
        # A target in the loss continues its own segment; the last token of a segment predicts nothing.
        boundary = np.flatnonzero(np.diff(seg[r]) != 0)
        assert (mask[r, boundary] == 0).all()
    single = rows[5]
    assert all(np.array_equal(single[k], batch[k][5]) for k in batch)


def test_batch_source_over_shards_is_a_pure_function_of_step(tmp_path: Path, tokenizer: tuple) -> None:
    _tokenize(_docs(), tokenizer, tmp_path / "sh")
    rows = PackedRows(TokenShards(tmp_path / "sh", "train"), seq_len=31)
    a, b = BatchSource(rows, 4, 2, seed=3), BatchSource(rows, 4, 2, seed=3)
    assert a.batch(7)["inputs"].shape == (2, 4, 31)
    assert np.array_equal(a.batch(7)["inputs"], b.batch(7)["inputs"])
    streamed = a.iterate(5)
    for step in (5, 6, 7):
        assert np.array_equal(next(streamed)["inputs"], b.batch(step)["inputs"])


def test_data_tokenize_cli_and_train_base_on_shards(tmp_path: Path, tokenizer: tuple) -> None:
    _, tok_path = tokenizer
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, (text, _) in enumerate(_docs(30)):
        (corpus / f"doc{i:02d}.txt").write_text(text)
    runner = CliRunner()
    res = runner.invoke(main, ["data", "tokenize", str(corpus), "--tokenizer", str(tok_path), "--out-dir",
                               str(tmp_path / "tokens"), "--shard-tokens", "2048", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "val: 2 documents" in res.output
    again = runner.invoke(main, ["data", "tokenize", str(corpus), "--tokenizer", str(tok_path), "--out-dir",
                                 str(tmp_path / "tokens"), "--no-progress"])
    assert again.exit_code == 2 and "--resume" in again.output
    res = runner.invoke(main, ["train", "base", "--shards", str(tmp_path / "tokens"), "--tokenizer", str(tok_path),
                               "--out-dir", str(tmp_path / "base"), "--scale", "smoke", "--steps", "6",
                               "--no-progress", "--tensorboard-dir", str(tmp_path / "tb")])
    assert res.exit_code == 0, res.output
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # events where asked, not in the out-dir
    assert not list((tmp_path / "base").glob("events.out.tfevents.*"))
    summary = json.loads((tmp_path / "base" / "summary.json").read_text())
    assert summary["final_val_loss"] is not None and summary["final_loss"] < summary["first_loss"]
    other = train_tokenizer((d for d, _ in _docs(20, seed=5)), "bpe", 280, 2)
    other.save(tmp_path / "other.json")
    res = runner.invoke(main, ["train", "base", "--shards", str(tmp_path / "tokens"), "--tokenizer",
                               str(tmp_path / "other.json"), "--out-dir", str(tmp_path / "b2"), "--scale", "smoke",
                               "--steps", "2", "--no-progress"])
    assert res.exit_code == 2 and "another tokenizer" in res.output


def test_train_base_on_shards_resumes_on_the_exact_next_batch(tmp_path: Path, tokenizer: tuple) -> None:
    import dataclasses

    from picochat_jax.config import load_scale
    from picochat_jax.parallel import MeshShape
    from picochat_jax.pipeline import base_stage

    tok, tok_path = tokenizer
    _tokenize(_docs(), tokenizer, tmp_path / "sh")
    scale = load_scale("smoke")
    cfg = dataclasses.replace(scale.base, steps=8, log_every=1, eval_every=0, checkpoint_every=0)

    def run(out: str, **kw: object) -> object:
        return base_stage(scale, cfg, tok, tok_path, tmp_path / "sh", tmp_path / out, MeshShape(1, 1, 1),
                          progress=False, **kw)

    straight = run("straight")
    stopped = run("cut", should_stop=lambda step: step == 3)
    assert stopped.status == "interrupted" and stopped.final_step == 3
    resumed = run("cut", resume=True)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history]
