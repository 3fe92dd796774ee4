"""`picochat run tiny --resume` through the real CLI: a stage whose inputs changed trains again, the rest is
reused."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from picochat_jax.checkpoint import load_model_checkpoint
from picochat_jax.cli import main


@pytest.mark.slow
def test_resume_with_more_base_steps_trains_sft_again_from_the_new_base(tmp_path, example_pack):
    out = tmp_path / "run"
    args = ["run", "tiny", "--dataset-pack", str(example_pack), "--out-dir", str(out), "--scale", "smoke",
            "--sft-steps", "4", "--no-dpo", "--no-progress", "--allow-preflight-warnings"]
    first = CliRunner().invoke(main, [*args, "--base-steps", "6"])
    assert first.exit_code == 0, first.output
    first_sft = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    again = CliRunner().invoke(main, [*args, "--base-steps", "12", "--resume"])
    assert again.exit_code == 0, again.output
    assert "base trained from step 6 to 12" in again.output and "reusing" not in again.output
    _params, _cfg, meta = load_model_checkpoint(out / "base" / "checkpoint")
    assert meta["step"] == 12
    sft = [json.loads(x) for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    # one SFT run of 4 steps, started from the 12-step base: a different first loss, not the old rows appended
    assert [r["step"] for r in sft if "loss" in r] == [r["step"] for r in first_sft if "loss" in r]
    assert sft[0]["loss"] != first_sft[0]["loss"]
    assert json.loads((out / "summary.json").read_text())["base"]["steps"] == 12


@pytest.mark.slow
def test_resume_with_more_sft_steps_trains_dpo_again(tmp_path, example_pack):
    out = tmp_path / "run"
    args = ["run", "tiny", "--dataset-pack", str(example_pack), "--out-dir", str(out), "--scale", "smoke",
            "--base-steps", "4", "--dpo-steps", "2", "--no-progress", "--allow-preflight-warnings"]
    first = CliRunner().invoke(main, [*args, "--sft-steps", "4"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, [*args, "--sft-steps", "6", "--resume"])
    assert again.exit_code == 0, again.output
    assert "[base] already completed 4 steps" in again.output  # the base is reused, SFT continues, DPO redone
    assert "sft trained from step 4 to 6" in again.output and "[dpo] already completed" not in again.output
    _params, _cfg, meta = load_model_checkpoint(out / "dpo" / "checkpoint")
    assert meta["stage"] == "dpo" and meta["step"] == 2
