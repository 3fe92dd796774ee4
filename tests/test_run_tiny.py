"""`picochat run tiny` end to end on the shipped example pack, through the real CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from picochat_jax.checkpoint import load_model_checkpoint
from picochat_jax.cli import main

# The module's run trains 490 steps: worth XLA's optimisations (tests/conftest.py). The short resume runs, which
# compile more than they run, are in test_run_tiny_resume.py.
pytestmark = pytest.mark.xla_optimized


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, example_pack):
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = CliRunner().invoke(main, ["run", "tiny", "--dataset-pack", str(example_pack), "--out-dir", str(out),
                                       "--base-steps", "90", "--sft-steps", "400", "--no-dpo", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_run_tiny_writes_the_spec_layout(tiny_run):
    for rel in ("corpus_manifest.json", "corpus_report.md", "tokenizer.json", "tokens/manifest.json",
                "tokens/train-00000.bin", "tokens/holdout.jsonl", "summary.json", "summary.md",
                "base/metrics.jsonl", "base/checkpoint/model_config.json", "base/checkpoint/tokenizer.json",
                "base/best_checkpoint/params", "base/resume_checkpoint", "sft/metrics.jsonl",
                "sft/checkpoint/params", "sft/best_checkpoint/model_config.json", "sft/resume_checkpoint"):
        assert (tiny_run / rel).exists(), rel
    manifest = json.loads((tiny_run / "corpus_manifest.json").read_text())
    assert manifest["total_files"] == 16 and any("draft-notes" in p for p in manifest["excluded"])
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    rows = [json.loads(line) for line in (tiny_run / "base" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "bpb", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(rows[0])
    tree = json.loads((tiny_run / "run_config.json").read_text())["config"]  # the whole resolved config tree
    assert {"base", "sft", "dpo", "hf_sft", "serve", "perf"} <= set(tree) and tree["base"]["steps"] == 90
    _params, cfg, meta = load_model_checkpoint(tiny_run / "sft" / "checkpoint")
    assert meta["stage"] == "sft" and meta["step"] == 400 and cfg.vocab_size == 512


@pytest.mark.slow
def test_loss_falls_well_below_its_start_on_the_example_pack(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    base, sft = summary["base"], summary["sft"]
    assert base["final_loss"] < 0.8 * base["first_loss"]
    assert base["final_val_loss"] < 0.8 * base["first_loss"]  # it generalises, not only memorises
    assert sft["final_loss"] < 0.85 * sft["first_loss"]


@pytest.mark.slow
def test_rerun_into_the_same_dir_needs_resume_or_overwrite(tiny_run, example_pack):
    result = CliRunner().invoke(main, ["run", "tiny", "--dataset-pack", str(example_pack), "--out-dir",
                                       str(tiny_run), "--base-steps", "60", "--sft-steps", "40", "--no-progress"])
    assert result.exit_code != 0 and "--resume" in result.output


@pytest.mark.slow
def test_model_passes_eval_rows_it_was_taught_and_fails_rows_it_was_not(tiny_run, example_pack):
    """The shipped eval file mixes prompts that are also SFT rows with held-out ones (docs/release.md)."""
    chat_prompts = {json.loads(line).get("user") for line in (example_pack.parent / "chat.jsonl").open()
                    if line.strip()}
    rows = [json.loads(line) for line in (tiny_run / "eval" / "eval_results.jsonl").read_text().splitlines()]
    taught = [r for r in rows if r["prompt"] in chat_prompts]
    unseen = [r for r in rows if r["prompt"] not in chat_prompts]
    assert len(taught) == 7 and len(unseen) == 8
    assert sum(r["pass"] for r in taught) >= 6, [r["reply"] for r in taught]
    assert sum(r["pass"] for r in unseen) <= 3, [r["reply"] for r in unseen]
