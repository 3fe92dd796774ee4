"""`picochat data init-pack` writes a pack that validates and trains; `picochat data inspect` sizes a pack
against a scale (per-source figures, the preflight's readiness checks) without writing anything."""

from __future__ import annotations

import json

from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.data.inspect import inspect_pack
from picochat_jax.data.pack import validate_pack


def test_init_pack_writes_a_valid_pack_and_refuses_a_folder_with_files(tmp_path):
    out = tmp_path / "pack"
    result = CliRunner().invoke(main, ["data", "init-pack", str(out)])
    assert result.exit_code == 0, result.output
    summary, errors = validate_pack(out / "dataset_pack.json")
    assert errors == [] and summary["chat"]["rows"] == 3 and summary["eval"]["rows"] == 2
    assert (out / "README.md").exists()
    (out / "chat.jsonl").write_text('{"user": "my edit", "assistant": "kept"}\n')
    again = CliRunner().invoke(main, ["data", "init-pack", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output
    assert "my edit" in (out / "chat.jsonl").read_text()  # the user's edit survives


def test_inspect_reports_sources_and_readiness_for_a_scale(example_pack, tmp_path):
    report = inspect_pack(example_pack, "pico")
    prose = report["sources"]["prose"]
    assert prose["documents"] == 16 and prose["bytes"] == report["total"]["bytes"] > 200_000
    assert 0.2 < prose["english_function_words"] < 0.5 and prose["duplicate_documents"] == 0
    assert report["skipped"] == {"recipe_excluded": 1} and report["chat_rows"] == 77
    checks = {c["name"]: c for c in report["readiness"]["checks"]}
    assert checks["eval_in_sft"]["level"] == "warn" and "tokens_per_param" in checks
    big = inspect_pack(example_pack, "h100-100m")  # a long run: its eval/SFT overlap now blocks
    assert big["readiness"]["status"] == "block" and "eval_in_sft" in big["readiness"]["blocking"]
    assert big["readiness"]["estimates"]["params"] > 100 * report["readiness"]["estimates"]["params"]

    before = sorted(p.name for p in example_pack.parent.iterdir())
    result = CliRunner().invoke(main, ["data", "inspect", str(example_pack), "--scale", "pico", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["readiness"]["status"] == report["readiness"]["status"]
    text = CliRunner().invoke(main, ["data", "inspect", str(example_pack)]).output
    assert "| prose | 16 |" in text and "Readiness" in text
    assert sorted(p.name for p in example_pack.parent.iterdir()) == before  # nothing written
