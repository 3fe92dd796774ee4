"""The release gate on evidence folders: passes only when every check passes, blocks with the reason otherwise.

Evidence here is written by hand (the shapes the pipeline writes); tests/test_run_tiny_evidence.py runs the
gate on evidence produced by real runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.eval.gate import GateProfile, evaluate_gate, load_gate_profile, parse_overrides
from picochat_jax.eval.report import write_run_report
from picochat_jax.fileio import save_json
from picochat_jax.outdir import write_marker

GOOD = {
    "preflight.json": {"status": "warn", "blocking": [], "warnings": ["tokens_per_param"], "overridden": False,
                       "checks": []},
    "summary.json": {"status": "completed", "pack": "demo", "scale": "smoke", "params": 12345, "mesh": "1x1x1",
                     "device_kind": "cpu", "wall_sec": 12.0,
                     "base": {"steps": 20, "tokens_seen": 4096, "first_loss": 5.5, "final_loss": 3.0},
                     "sft": {"steps": 20, "tokens_seen": 2048, "first_loss": 4.0, "final_loss": 1.0}},
    "sft_fit/fit_report.json": {"rows": 10, "reproduced": 8, "reproduced_rate": 0.8, "mean_f1": 0.9},
    "eval/eval_report.json": {"rows": 12, "passed": 9, "pass_rate": 0.75, "prompt_echo_rate": 0.0,
                              "refusal_rate": 0.1, "by_category": {"greeting": {"rows": 12, "passed": 9}},
                              "answerable": {"rows": 10, "passed": 8, "refusal_rate": 0.0},
                              "unanswerable": {"rows": 2, "passed": 1, "refusal_rate": 0.5}},
    "honesty/honesty_report.json": {"status": "clean", "contaminated_eval_lines": [],
                                    "counts": {"eval_rows": 12, "sft_rows": 40, "eval_rows_in_sft": 0,
                                               "eval_rows_in_corpus": 0, "eval_rows_contaminated": 0},
                                    "memorization": {"canaries": 8, "memorized": 1, "rate": 0.125}},
}


def _run_dir(tmp_path: Path, drop: tuple[str, ...] = (), **patches: dict) -> Path:
    """An evidence folder; `patches` maps a file's stem (e.g. eval_report) to keys to overwrite."""
    run = tmp_path / "run"
    for rel, payload in GOOD.items():
        if rel in drop:
            continue
        payload = json.loads(json.dumps(payload))
        payload.update(patches.get(Path(rel).stem, {}))
        save_json(run / rel, payload)
    write_marker(run, "run")
    return run


def test_clean_evidence_passes_every_check(tmp_path):
    run = _run_dir(tmp_path)
    gate = evaluate_gate(run, GateProfile())
    assert gate["decision"] == "approved" and gate["blocking"] == [] and gate["warnings"] == []
    names = [c["name"] for c in gate["checks"]]
    assert names == ["preflight", "training", "sft_fit_f1", "eval_rows", "eval_pass_rate", "prompt_echo_rate",
                     "answerable_refusal_rate", "eval_in_sft", "eval_in_corpus", "memorization_rate"]
    assert all(c["verdict"] == "pass" and c["reason"] for c in gate["checks"])
    saved = json.loads((run / "release" / "gate.json").read_text())
    assert saved["decision"] == "approved" and saved["profile"]["min_eval_pass_rate"] == 0.6
    card = (run / "release" / "release_card.md").read_text()
    assert "**Decision: APPROVED**" in card and "| eval_pass_rate | PASS | 0.75 |  | >= 0.6 |" in card


@pytest.mark.parametrize("patches, drop, blocked, reason", [
    ({"eval_report": {"pass_rate": 0.3}}, (), "eval_pass_rate", "under the minimum"),
    ({"eval_report": {"rows": 4}}, (), "eval_rows", "under the minimum"),
    ({"eval_report": {"prompt_echo_rate": 0.5}}, (), "prompt_echo_rate", "exceeds"),
    ({"eval_report": {"answerable": {"rows": 10, "refusal_rate": 0.8}}}, (), "answerable_refusal_rate", "exceeds"),
    ({"honesty_report": {"counts": {"eval_rows_in_sft": 2, "eval_rows_in_corpus": 0},
                         "contaminated_eval_lines": [3, 7]}}, (), "eval_in_sft", "eval lines 3, 7"),
    ({"honesty_report": {"counts": {"eval_rows_in_sft": 0, "eval_rows_in_corpus": 1}}}, (), "eval_in_corpus",
     "found in the corpus"),
    ({"honesty_report": {"memorization": {"canaries": 8, "memorized": 8, "rate": 1.0}}}, (), "memorization_rate",
     "exceeds"),
    ({"honesty_report": {"memorization": None}}, (), "memorization_rate", "not measured"),
    ({"fit_report": {"mean_f1": 0.1}}, (), "sft_fit_f1", "under the minimum"),
    ({"summary": {"status": "interrupted"}}, (), "training", "interrupted"),
    ({"summary": {"sft": {"final_loss": math.nan}}}, (), "training", "final losses"),
    ({"preflight": {"status": "block", "blocking": ["eval_in_sft"], "overridden": True}}, (), "preflight",
     "overridden with --allow-preflight-warnings"),
    ({}, ("preflight.json",), "preflight", "missing evidence: preflight.json"),
    ({}, ("sft_fit/fit_report.json",), "sft_fit_f1", "missing evidence"),
])
def test_each_failure_blocks_with_its_reason(tmp_path, patches, drop, blocked, reason):
    gate = evaluate_gate(_run_dir(tmp_path, drop, **patches), GateProfile())
    assert gate["decision"] == "blocked"
    assert gate["blocking"] == [blocked]  # and nothing else: checks are independent
    line = next(c for c in gate["checks"] if c["name"] == blocked)
    assert line["verdict"] == "block" and reason in line["reason"]


def test_missing_eval_blocks_every_eval_check(tmp_path):
    gate = evaluate_gate(_run_dir(tmp_path, ("eval/eval_report.json",)), GateProfile())
    assert gate["blocking"] == ["eval_rows", "eval_pass_rate", "prompt_echo_rate", "answerable_refusal_rate"]
    assert "**Decision: BLOCKED**" in (tmp_path / "run" / "release" / "release_card.md").read_text()


def test_external_benchmark_is_required_when_the_pack_names_one(tmp_path):
    run = _run_dir(tmp_path)
    pack = tmp_path / "pack.json"
    pack.write_text(json.dumps({"name": "p", "corpus": "c.txt", "external_eval": "bench.jsonl"}))
    save_json(run / "run_config.json", {"pack": str(pack)})
    gate = evaluate_gate(run, GateProfile())
    assert gate["blocking"] == ["external_pass_rate"]
    save_json(run / "external_eval" / "eval_report.json", {"rows": 20, "pass_rate": 0.4})
    assert evaluate_gate(run, GateProfile())["decision"] == "approved"
    assert evaluate_gate(run, GateProfile(min_external_pass_rate=0.5))["blocking"] == ["external_pass_rate"]


def test_profiles_load_from_configs_and_accept_overrides(tmp_path):
    default = load_gate_profile()
    # configs/gate/default.yaml is the single source of defaults and agrees with the dataclass
    assert dataclasses.replace(default, name="default") == GateProfile()
    tuned = load_gate_profile("default", parse_overrides(["min_eval_pass_rate=0.25", "max_eval_rows_in_sft=2",
                                                          "allow_preflight_override=true"]))
    assert (tuned.min_eval_pass_rate, tuned.max_eval_rows_in_sft, tuned.allow_preflight_override) == (0.25, 2, True)
    custom = tmp_path / "strict.yaml"
    custom.write_text("min_eval_pass_rate: 0.9\n")
    assert load_gate_profile(custom) == GateProfile(name="strict", min_eval_pass_rate=0.9)
    with pytest.raises(ValueError, match="unknown gate settings"):
        load_gate_profile("default", {"min_pass": "1"})
    with pytest.raises(ValueError, match="must be a float"):
        load_gate_profile("default", {"min_eval_pass_rate": "high"})
    with pytest.raises(ValueError, match="unknown gate profile"):
        load_gate_profile("nope")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["min_eval_pass_rate"])


def test_gate_command_exit_code_and_run_report(tmp_path):
    run = _run_dir(tmp_path)
    for stage, losses in (("base", [5.0, 4.0, 3.0]), ("sft", [3.0, 2.0, 1.5])):
        rows = [{"step": 10 * (i + 1), "loss": x} for i, x in enumerate(losses)]
        rows.append({"step": 30, "val_loss": losses[-1] + 0.2})
        (run / stage).mkdir()
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    ok = runner.invoke(main, ["gate", str(run)])
    assert ok.exit_code == 0, ok.output
    assert "release gate: APPROVED" in ok.output
    blocked = runner.invoke(main, ["gate", str(run), "--set", "min_eval_pass_rate=0.9"])
    assert blocked.exit_code == 1
    assert "BLOCK eval_pass_rate" in blocked.output and "release gate: BLOCKED" in blocked.output
    bad = runner.invoke(main, ["gate", str(tmp_path / "nowhere")])
    assert bad.exit_code != 0 and "run folder not found" in bad.output

    report = (run / "report.md").read_text()
    gate = json.loads((run / "release" / "gate.json").read_text())
    assert "**Release gate: BLOCKED** (blocked by eval_pass_rate)" in report
    assert all(f"| {c['name']} |" in report for c in gate["checks"])
    assert "![loss curves](loss_curves.png)" in report and "[held-out eval](eval/eval_report.md)" not in report
    assert (run / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_run_report(run) == run / "report.md"


def _eval_rows(run: Path, rows: list[dict]) -> None:
    (run / "eval" / "eval_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(category: str, passed: bool, answerable: bool = True, refusal: bool = False, choice: bool = False) -> dict:
    return {"category": category, "pass": passed, "answerable": answerable, "refusal": refusal, "choice": choice,
            "prompt_echo": False, "split": "default"}


def test_original_profiles_three_verdicts_and_intervals(tmp_path):
    rows = ([_row("identity", True)] * 7 + [_row("identity", False)] * 3 + [_row("math", True)] * 2
            + [_row("math", False)] * 8 + [_row("refusal", True, answerable=False, refusal=True)] * 8
            + [_row("refusal", False, answerable=False)] * 2 + [_row("choice", True, choice=True)] * 5)
    by_cat = {}
    for r in rows:
        g = by_cat.setdefault(r["category"], {"rows": 0, "passed": 0})
        g["rows"] += 1
        g["passed"] += r["pass"]
    for g in by_cat.values():
        g["pass_rate"] = g["passed"] / g["rows"]
    non_choice = [r for r in rows if not r["choice"]]
    unans = [r for r in rows if not r["answerable"]]
    ev = {"rows": len(rows), "passed": sum(r["pass"] for r in rows), "pass_rate": sum(r["pass"] for r in rows)
          / len(rows), "by_category": by_cat,
          "non_choice": {"rows": len(non_choice), "pass_rate": sum(r["pass"] for r in non_choice) / len(non_choice)},
          "unanswerable": {"rows": len(unans), "pass_rate": 0.8, "refusal_rate": 0.8},
          "unsupported_claim_rate": 2 / len(rows)}
    run = _run_dir(tmp_path, eval_report=ev)
    _eval_rows(run, rows)
    save_json(run / "sft_fit" / "heldout" / "fit_report.json", {"rows": 4, "reproduced": 1, "reproduced_rate": 0.25})
    # research: the held-out fit (25% < 50%) and the 5.7% unsupported-claim rate only warn.
    research = evaluate_gate(run, load_gate_profile("research"))
    assert research["decision"] == "warn" and research["blocking"] == []
    assert set(research["warnings"]) == {"heldout_sft_fit_rate", "unsupported_claim_rate"}
    # first_release blocks on the held-out fit and on the missing external benchmark; claims still warn.
    first = evaluate_gate(run, load_gate_profile("first_release"))
    assert first["decision"] == "blocked"
    assert set(first["blocking"]) == {"heldout_sft_fit_rate", "external_pass_rate"}
    assert first["warnings"] == ["unsupported_claim_rate"]
    # skill_release adds per-skill thresholds: math 20% < 30% blocks, spelling has no rows at all.
    skill = evaluate_gate(run, load_gate_profile("skill_release"))
    lines = {c["name"]: c for c in skill["checks"]}
    assert lines["category:identity"]["verdict"] == "pass" and lines["category:math"]["verdict"] == "block"
    assert "not covered" in lines["category:spelling"]["reason"]
    lo, hi = lines["category:math"]["interval"]
    assert lo <= 0.2 <= hi and hi < 0.6  # a 95% bootstrap interval around the measured 20%
    assert "| category:math | BLOCK | 0.2 |" in (run / "release" / "release_card.md").read_text()
    res = CliRunner().invoke(main, ["gate", str(run), "--profile", "research", "--ci-bootstrap-samples", "200"])
    assert res.exit_code == 0 and "release gate: WARN" in res.output and "warning: approved with warnings" in \
        res.output
    assert CliRunner().invoke(main, ["gate", str(run), "--profile", "first_release"]).exit_code == 1


def test_prompt_echo_fails_its_row_and_expected_and_split_are_read(tmp_path):
    from picochat_jax.data.records import read_eval_jsonl
    from picochat_jax.eval.chat import summarize

    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"user": "What is two plus two?", "expected": "four", "split": "math"}) + "\n"
                    + json.dumps({"user": "Pick one", "choice_labels": ["A", "B"], "must_include": ["A"]}) + "\n")
    rows = read_eval_jsonl(path)
    assert rows[0].must_include == ("four",) and rows[0].reference == "four" and rows[0].split == "math"
    assert rows[1].choice and rows[1].split == "default"
    summary = summarize([{**_row("a", True), "split": "math"}, _row("b", False, choice=True)])
    assert summary["by_split"]["math"]["pass_rate"] == 1.0 and summary["non_choice"]["rows"] == 1
