"""Preflight: every check is reported with a level; blocking problems stop `run tiny` before it trains.

That `--allow-preflight-warnings` lets a blocked pack through (and the gate still refuses it) is shown on a
real run in tests/test_run_tiny_evidence.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.config import load_scale
from picochat_jax.data.pack import load_corpus, load_pack
from picochat_jax.data.records import read_chat_jsonl, read_eval_jsonl, read_preference_jsonl
from picochat_jax.eval.ngram import scan_contamination
from picochat_jax.eval.preflight import LEVELS, PreflightBlocked, bytes_per_token, estimate_train_memory, run_preflight
from picochat_jax.parallel import MeshShape
from picochat_jax.pipeline import RunOptions, run_tiny


def _preflight(pack_path: Path, scale: str = "pico", mesh: str | None = "8x1", **kw) -> dict:
    pack = load_pack(pack_path)
    s = load_scale(scale)
    base = kw.pop("base_cfg", s.base)
    return run_preflight(pack=pack, corpus=load_corpus(pack), conversations=read_chat_jsonl(pack.chat),
                         eval_rows=read_eval_jsonl(pack.eval) if pack.eval else None, scale=s, base_cfg=base,
                         sft_cfg=s.sft, mesh=mesh, eval_max_new_tokens=s.eval_max_new_tokens,
                         preferences=read_preference_jsonl(pack.preferences) if pack.preferences else None,
                         n_devices=kw.pop("n_devices", 8), **kw)


def _check(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)


@pytest.fixture
def pack_copy(tmp_path, example_pack) -> Path:
    shutil.copytree(example_pack.parent, tmp_path / "pack")
    return tmp_path / "pack" / "dataset_pack.json"


def test_example_pack_reports_every_check_and_does_not_block(example_pack):
    report = _preflight(example_pack)
    names = {c["name"] for c in report["checks"]}
    assert {"corpus_tokens", "sft_rows", "eval_rows", "preference_rows", "tokens_per_param", "corpus_replay",
            "sft_epochs", "eval_in_sft", "eval_in_corpus", "duplicate_eval_prompts", "sft_in_corpus", "vocab",
            "sft_context", "eval_context", "mesh", "base_batch_divisible", "sft_batch_divisible", "memory"} <= names
    for c in report["checks"]:
        assert set(c) == {"name", "value", "threshold", "level", "message"} and c["level"] in LEVELS and c["message"]
    assert report["status"] != "block" and not report["long_run"]
    # Contamination comes from the honesty scan, and on a tiny teaching run it warns rather than stops.
    pack = load_pack(example_pack)
    scan = scan_contamination(read_eval_jsonl(pack.eval), read_chat_jsonl(pack.chat), load_corpus(pack).documents)
    leak = _check(report, "eval_in_sft")
    assert leak["value"] == scan["counts"]["eval_rows_in_sft"]
    assert leak["level"] == ("warn" if leak["value"] else "ok")
    s = load_scale("pico")
    assert _check(report, "corpus_replay")["value"] == pytest.approx(
        s.base.steps * s.base.batch_size * s.model.max_seq_len / report["estimates"]["corpus_tokens"], rel=0.01)


@pytest.mark.parametrize("scale, batch, remat, mesh, ce_chunk, measured_gib", [
    # Peak device memory measured by tools/bench_train.py (docs/performance.md, docs/proof_runs.md): one H100
    # at h100-100m; one H100 at h200-1b (16 x 2048, remat dots, chunked CE); two H200s at h200-1b with the proof
    # run's 32 x 2048 micro-batch on mesh 1x2, no remat.
    ("h100-100m", 64, "none", MeshShape(1, 1, 1), 0, 15.2),
    ("h200-1b", 16, "dots", MeshShape(1, 1, 1), 8192, 46.7),
    ("h200-1b", 32, "none", MeshShape(1, 2, 1), 0, 66.6),
])
def test_gpu_memory_estimate_tracks_measured_peaks(scale, batch, remat, mesh, ce_chunk, measured_gib):
    s = load_scale(scale)
    est = estimate_train_memory(s.model, dataclasses.replace(s.base, batch_size=batch, remat=remat), mesh,
                                s.model.max_seq_len, dataclasses.replace(s.perf, ce_chunk_tokens=ce_chunk), "gpu")
    assert est["attention"] == "cudnn" and est["remat"] == remat
    assert 1.0 <= est["total_bytes"] / 2**30 / measured_gib <= 1.25  # rough, and on the safe side


def test_memory_estimate_counts_score_tensors_only_without_a_flash_kernel():
    s = load_scale("h100-100m")
    base = dataclasses.replace(s.base, remat="none")
    gpu = estimate_train_memory(s.model, base, MeshShape(1, 1, 1), 512, s.perf, "gpu")
    xla = estimate_train_memory(s.model, base, MeshShape(1, 1, 1), 512,
                                dataclasses.replace(s.perf, attention_impl="xla"), "gpu")
    heads, rows, seq = s.model.n_heads, 64, 512
    assert xla["activation_bytes"] - gpu["activation_bytes"] == pytest.approx(
        s.model.n_layers * 5 * heads * seq * seq * rows, rel=1e-6)  # 5 bytes per score at 2-byte precision
    fsdp = estimate_train_memory(s.model, base, MeshShape(1, 2, 1), 512, s.perf, "gpu")
    assert fsdp["state_bytes"] == pytest.approx(gpu["state_bytes"] / 2)


def test_token_estimate_grows_with_vocab():
    assert bytes_per_token("byte", 264) == 1.0
    assert 2.0 < bytes_per_token("bpe", 512) < bytes_per_token("bpe", 2048) < bytes_per_token("bpe", 32768) <= 4.5


def _eval_is_the_chat_file(pack_path: Path) -> None:
    """The classic mistake: the eval file is the SFT rows."""
    chat = [json.loads(x) for x in (pack_path.parent / "chat.jsonl").read_text().splitlines() if x.strip()]
    rows = [{"user": r["user"], "must_include": [r["assistant"].split()[0]]} for r in chat if "user" in r][:12]
    (pack_path.parent / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _tiny_corpus(pack_path: Path) -> None:
    obj = json.loads(pack_path.read_text())
    (pack_path.parent / "small.txt").write_text("Only a sentence or two of text. Far too little to train on.\n")
    obj["corpus"] = "small.txt"
    pack_path.write_text(json.dumps(obj))


@pytest.mark.parametrize("plant, kwargs, blocked", [
    (_tiny_corpus, {}, "corpus_tokens"),
    (None, {"mesh": "2x2"}, "mesh"),
    (None, {"device_memory": 2**20}, "memory"),
])
def test_planted_problems_block(pack_copy, plant, kwargs, blocked):
    if plant:
        plant(pack_copy)
    report = _preflight(pack_copy, **kwargs)
    assert report["status"] == "block" and blocked in report["blocking"]
    assert _check(report, blocked)["level"] == "block"


def test_batch_not_divisible_by_the_mesh_blocks(example_pack):
    base = dataclasses.replace(load_scale("pico").base, batch_size=12)
    report = _preflight(example_pack, base_cfg=base)
    assert report["blocking"] == ["base_batch_divisible"]
    assert "not divisible by data*fsdp = 8" in _check(report, "base_batch_divisible")["message"]


def test_eval_in_sft_warns_below_the_long_run_threshold(pack_copy):
    """The original's own example pack repeats eval prompts in its SFT rows and trains: a small run warns (the
    release gate still blocks it); only a long run is stopped."""
    _eval_is_the_chat_file(pack_copy)
    report = _preflight(pack_copy)
    leak = _check(report, "eval_in_sft")
    assert not report["long_run"] and leak["level"] == "warn" and leak["value"] >= 10  # of the 12 planted
    assert "eval_in_sft" not in report["blocking"] and "release gate will block" in leak["message"]


def test_any_contamination_blocks_a_long_run(example_pack):
    report = _preflight(example_pack, scale="h100-pilot")
    assert report["long_run"] and _check(report, "eval_in_sft")["value"] > 0
    assert "eval_in_sft" in report["blocking"]


def test_run_tiny_stops_before_training_with_a_clear_message(pack_copy, tmp_path):
    _tiny_corpus(pack_copy)
    out = tmp_path / "run"
    with pytest.raises(PreflightBlocked, match="corpus_tokens.*--allow-preflight-warnings"):
        run_tiny(pack_copy, out, RunOptions(scale="smoke", progress=False))
    saved = json.loads((out / "preflight.json").read_text())
    assert saved["status"] == "block" and not saved["overridden"]
    assert "BLOCK" in (out / "preflight.md").read_text()
    assert not (out / "tokenizer.json").exists() and not (out / "base").exists()  # no compute was spent

    result = CliRunner().invoke(main, ["run", "tiny", "--dataset-pack", str(pack_copy), "--out-dir",
                                       str(tmp_path / "cli"), "--scale", "smoke", "--no-progress"])
    assert result.exit_code != 0
    assert "preflight blocked the run" in result.output and "--allow-preflight-warnings" in result.output


def test_corpus_replay_warns_a_long_run_after_four_reads(example_pack):
    """A long run (here h100-100m's 107M parameters) is warned beyond 4 reads of the corpus, where the proof
    run's held-out BPB turned up; a small teaching run only beyond 16."""
    s = load_scale("h100-100m")
    small = _preflight(example_pack)
    reads = _check(small, "corpus_replay")["value"]
    corpus_tokens = _preflight(example_pack, "h100-100m", mesh=None)["estimates"]["corpus_tokens"]
    tokens_per_step = s.base.batch_size * s.base.grad_accum_steps * s.model.max_seq_len
    for target_reads, level in ((3.0, "ok"), (6.0, "warn")):
        steps = max(1, round(target_reads * corpus_tokens / tokens_per_step))
        report = _preflight(example_pack, "h100-100m", mesh=None,
                            base_cfg=dataclasses.replace(s.base, steps=steps))
        check = _check(report, "corpus_replay")
        assert report["long_run"] and check["threshold"] == 4.0 and check["level"] == level, check
    assert _check(small, "corpus_replay")["threshold"] == 16.0
    assert _check(small, "corpus_replay")["level"] == ("warn" if reads > 16 else "ok")
