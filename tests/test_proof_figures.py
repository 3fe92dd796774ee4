"""tools/plot_proof_run.py's figures from a run's own metrics: tokens per step with gradient accumulation,
legs of a run resumed across calls (each leg's compile window left out), stability checks."""

from __future__ import annotations

import math

import pytest


def _rows(leg_steps: list[list[int]], tok_s: list[float], spike_at: int | None = None) -> list[dict]:
    rows = []
    for leg, steps in enumerate(leg_steps):
        for i, step in enumerate(steps):
            loss = 4.0 - 0.001 * step + (10.0 if step == spike_at else 0.0)
            rows.append({"step": step, "loss": loss, "bpb": loss / 3, "elapsed_sec": 5.0 + 10 * i,
                         "tokens_per_sec": 1_000.0 if i == 0 else tok_s[leg], "mfu": 0.4})
        rows.append({"step": steps[-1], "val_loss": 4.5, "val_bpb": 1.5 + 0.1 * leg})
    return rows


@pytest.fixture
def plot(load_tool):
    return load_tool("plot_proof_run")


def test_tokens_count_gradient_accumulation_and_legs_drop_their_compile_window(plot):
    config = {"base": {"batch_size": 32, "grad_accum_steps": 4}, "model": {"max_seq_len": 2048}}
    rows = _rows([[1, 20, 40, 60], [61, 80, 100], [101, 120]], [110_000.0, 100_000.0, 120_000.0])
    out = plot.figures(rows, config, {"parameters": 1_000_000}, {"splits": {"train": {"tokens": 26_214_400},
                                                                          "val": {"tokens": 1_000}}})
    assert out["tokens_seen"] == 120 * 32 * 4 * 2048
    assert out["epochs"] == pytest.approx(120 * 32 * 4 * 2048 / 26_214_400, abs=0.01)
    assert [(leg["first_step"], leg["last_step"], leg["tokens_per_sec"]["mean"]) for leg in out["legs"]] == [
        (20, 60, 110_000.0), (80, 100, 100_000.0), (120, 120, 120_000.0)]
    # the three compile windows (1,000 tokens/s) are in no figure
    assert out["tokens_per_sec"]["windows"] == 6 and out["tokens_per_sec"]["p10"] >= 100_000.0
    assert out["val_bpb"] == {"first": 1.5, "last": pytest.approx(1.7), "best": 1.5}
    assert out["non_finite_losses"] == 0 and out["loss_spikes"] == []


def test_spikes_and_non_finite_losses_are_reported(plot):
    config = {"base": {"batch_size": 8}, "model": {"max_seq_len": 64}}
    steps = list(range(1, 301, 10))
    rows = _rows([steps], [5_000.0], spike_at=201)
    rows[5]["loss"] = math.nan
    out = plot.figures(rows, config, {}, {})
    assert out["tokens_seen"] == 291 * 8 * 64  # no grad_accum_steps key: one micro-batch a step
    assert out["loss_spikes"] == [201] and out["non_finite_losses"] == 1
