"""tools/bench_hf_lora.py on CPU with a tiny Llama: both sides train the same LoRA and report comparable numbers.

The GPU figures come from running the tool itself on a GPU machine; here only the plumbing and the parity of
what the two sides compute are checked (same trainable parameters, same loss at the same weights).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

VOCAB = 256
# Batch 8: conftest gives every process (the children too) 8 fake CPU devices, and our side splits the batch
# over all of them by default.
TINY = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
        "--vocab", str(VOCAB), "--batch-size", "8", "--seq-len", "32", "--steps", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def bench(load_tool):
    return load_tool("bench_hf_lora")


def _lora_params(layers: int, hidden: int, inter: int, heads: int, kv_heads: int, rank: int = 16) -> int:
    """r * (in + out) per adapted projection per layer, for the seven Llama projections."""
    head_dim = hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    return layers * sum(rank * (i + o) for i, o in shapes)


def test_batches_are_random_ids_with_an_assistant_tail_mask(bench):
    b = bench.synthetic_batches(VOCAB, 8, 64, target_fraction=0.4)
    assert b["inputs"].shape == b["targets"].shape == b["loss_mask"].shape == (bench.N_BATCHES, 1, 8, 64)
    assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    assert b["inputs"].min() >= 0 and b["inputs"].max() < VOCAB and len(np.unique(b["inputs"])) > VOCAB // 2
    mask = b["loss_mask"]
    # Every row: a prompt of zeros, then ones to the end (monotone), and some of each.
    assert np.all(np.diff(mask, axis=-1) >= 0) and np.all(mask[..., 0] == 0) and np.all(mask[..., -1] == 1)
    assert 0.3 < mask.mean() < 0.5


@pytest.mark.slow
def test_both_sides_train_the_same_lora_on_cpu(bench, tmp_path):
    out = tmp_path / "hf_lora.json"
    report = bench.main([*TINY, "--peer", "peft", "--peer-no-compile", "--json-out", str(out)])
    ours, peer = report["ours"], report["peer"]
    assert "error" not in ours, ours
    assert "error" not in peer, peer
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))

    assert ours["framework"] == "picochat-jax" and peer["framework"] == "transformers+peft"
    assert ours["platform"] == peer["platform"] == "cpu" and peer["compile"] is False
    for r in (ours, peer):
        assert math.isfinite(r["tokens_per_sec"]) and r["tokens_per_sec"] > 0
        assert r["tokens_per_step"] == 8 * 32
        assert r["tokens_per_sec"] == pytest.approx(r["tokens_per_step"] / (r["step_ms"] / 1e3))
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
        assert 0 < r["loss_tokens_per_step"] < r["tokens_per_step"]  # the assistant-only mask, not every token
        # Random init predicts ~uniformly over the vocabulary.
        assert r["first_loss"] == pytest.approx(math.log(VOCAB), rel=0.1)
        assert math.isfinite(r["last_loss"])
    assert report["ratio"] == pytest.approx(ours["tokens_per_sec"] / peer["tokens_per_sec"])
    # LoRA r=16 on all seven projections on both sides, counted alike.
    assert ours["trainable_params"] == peer["trainable_params"] == _lora_params(2, 64, 128, 4, 2)
    assert ours["params"] == peer["params"] - ours["trainable_params"]  # the peer counts its adapters too
    # Same weights, same first batch, adapters' B = 0 on both sides: the same loss up to bf16 rounding.
    assert ours["first_loss"] == pytest.approx(peer["first_loss"], abs=0.02)
    assert ours["loss_tokens_per_step"] == pytest.approx(peer["loss_tokens_per_step"])


def test_markov_rows_follow_their_chain(bench):
    b = bench.synthetic_batches(VOCAB, 4, 32, count=2, data="markov")
    assert b["inputs"].shape == (2, 1, 4, 32)
    np.testing.assert_array_equal(b["inputs"][..., 1:], b["targets"][..., :-1])  # next-token targets
    successors: dict[int, set[int]] = {}
    for row_in, row_t in zip(b["inputs"].reshape(-1, 32), b["targets"].reshape(-1, 32), strict=True):
        for a, c in zip(row_in, row_t, strict=True):
            successors.setdefault(int(a), set()).add(int(c))
    assert max(len(v) for v in successors.values()) <= 4  # a learnable chain: at most 4 next ids per id


@pytest.mark.slow
def test_qlora_side_reports_its_nf4_base(bench, tmp_path):
    report = bench.main([*TINY, "--peer", "none", "--quantize", "4bit", "--data", "markov"])
    ours = report["ours"]
    assert "error" not in ours, ours
    assert ours["quantize"] == "4bit" and math.isfinite(ours["final_loss_all_batches"])
    bf16 = bench.main([*TINY, "--peer", "none"])["ours"]
    assert ours["frozen_base_gib"] < 0.6 * bf16["frozen_base_gib"]  # float32 on CPU: NF4 kernels are ~1/8


def test_chat_mix_packs_the_examples_the_peer_pads(bench):
    padded, packed = bench.chat_mix(VOCAB, 8, 128, count=6, median=30, sigma=0.8)
    assert padded["inputs"].shape == (6, 1, 8, 128) and packed["inputs"].shape[1:] == (1, 8, 128)
    assert set(packed) >= {"segment_ids", "positions", "loss_mask", "real"}
    # Every padded row is one example from position 0; its loss mask lies inside its real tokens.
    real = padded["inputs"] != 0
    assert np.all(np.diff(real.astype(int), axis=-1) <= 0) and np.all(padded["loss_mask"][~real] == 0)
    assert padded["real"].sum() == real.sum()
    # Packed rows hold the same examples far denser, each with positions restarting at 0.
    fill_packed = packed["real"].mean() / (8 * 128)
    fill_padded = padded["real"].mean() / (8 * 128)
    assert fill_packed > 0.85 and fill_padded < 0.5
    seg, pos = packed["segment_ids"], packed["positions"]
    starts = (seg > 0) & np.concatenate([np.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], axis=-1)
    assert np.all(pos[starts] == 0)
    assert np.all(packed["loss_mask"][seg == 0] == 0)
    # Pad-to-longest: each batch ends at its longest example, rounded up to the collator's multiple.
    longest = real.sum(axis=-1).max(axis=(1, 2))
    assert np.all(padded["batch_len"] >= longest) and np.all(padded["batch_len"] - longest < bench.PAD_MULTIPLE)
    assert np.all((padded["batch_len"] % bench.PAD_MULTIPLE == 0) | (padded["batch_len"] == 128))


def test_peer_cuts_each_batch_to_its_padded_length(load_tool, tmp_path):
    peer = load_tool("peft_baseline")
    rng = np.random.default_rng(0)
    arrays = {k: rng.integers(1, 9, (3, 1, 2, 16)).astype(np.int32) for k in ("inputs", "targets", "loss_mask")}
    np.savez(tmp_path / "b.npz", **arrays, batch_len=np.array([16, 4, 8]), real=np.array([20, 7, 11]))
    batches = peer.load_batches(tmp_path / "b.npz")
    assert [b["inputs"].shape for b in batches] == [(1, 2, 16), (1, 2, 4), (1, 2, 8)]
    assert [b["real"] for b in batches] == [20, 7, 11]
    assert np.array_equal(batches[1]["targets"], arrays["targets"][1][..., :4])
