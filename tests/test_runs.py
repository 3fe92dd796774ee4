"""Run management on a real run: TensorBoard events, bundles, comparison, the registry, --preflight-only."""

from __future__ import annotations

import json
import shutil
import struct
import tarfile

import pytest
from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.pipeline import RunOptions, run_tiny
from picochat_jax.tensorboard import crc32c, masked_crc
from tests.test_run_tiny_evidence import write_original_style_pack


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    pack = write_original_style_pack(root / "pack")
    run_tiny(pack, root / "run", RunOptions(progress=False, scale="smoke", base_steps=12, sft_steps=12, dpo=False))
    return root / "run", pack


def _events(path):
    """(step, tag, value) of every scalar in an event file, parsed by hand, each record's CRCs checked."""
    out, data = [], path.read_bytes()
    at = 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        assert struct.unpack_from("<I", data, at + 8)[0] == masked_crc(data[at:at + 8])
        payload = data[at + 12:at + 12 + length]
        assert struct.unpack_from("<I", data, at + 12 + length)[0] == masked_crc(payload)
        out.append(payload)
        at += 16 + length
    return out


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_tensorboard_events_beside_metrics_hold_the_logged_values(small_run):
    run, _ = small_run
    metrics = [json.loads(x) for x in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    files = list((run / "sft").glob("events.out.tfevents.*"))
    assert len(files) == 1 and len(_events(files[0])) == 1 + len(metrics)  # file_version + one per row
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea_mod.EventAccumulator(str(run / "sft"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"sft/loss", "sft/lr", "sft/grad_norm", "sft/tokens_per_sec", "sft/val_loss", "sft/val_bpb"} <= tags
    losses = [(e.step, e.value) for e in acc.Scalars("sft/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in metrics if "loss" in r]


def test_bundle_round_trip_and_tampering(small_run, tmp_path):
    run, _ = small_run
    assert CliRunner().invoke(main, ["gate", str(run)]).exit_code in (0, 1)
    out = tmp_path / "run.tgz"
    res = CliRunner().invoke(main, ["run", "bundle", str(run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    again = CliRunner().invoke(main, ["run", "bundle", str(run), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    ok = CliRunner().invoke(main, ["run", "inspect-bundle", str(out)])
    assert ok.exit_code == 0 and "every checksum matches" in ok.output and "# Release card" in ok.output
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert "run/sft/checkpoint/model_config.json" in names and "run/release/gate.json" in names
    assert not any("resume_checkpoint" in n or n.endswith(".bin") for n in names)
    # Rewrite the bundle with one evidence file changed: inspect-bundle names it.
    bad = tmp_path / "bad.tgz"
    with tarfile.open(out) as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "run/eval/eval_report.json":
                data = data.replace(b'"pass_rate"', b'"pass_rate" ', 1)
                m.size = len(data)
            import io

            dst.addfile(m, io.BytesIO(data))
    res = CliRunner().invoke(main, ["run", "inspect-bundle", str(bad), "--no-card"])
    assert res.exit_code == 1 and "checksum mismatch: eval/eval_report.json" in res.output


def test_compare_and_registry(small_run, tmp_path):
    run, _ = small_run
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("resume_checkpoint", "tokens"))
    summary = json.loads((other / "summary.json").read_text())
    summary["base"]["final_loss"] += 0.5
    (other / "summary.json").write_text(json.dumps(summary))
    res = CliRunner().invoke(main, ["compare", str(run), str(other), "--out-dir", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    assert "(+0.5000)" in res.output and (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    reg = ["--registry", str(tmp_path / "reg.sqlite")]
    CliRunner().invoke(main, ["gate", str(run)])
    decision = json.loads((run / "release" / "gate.json").read_text())["decision"]
    added = CliRunner().invoke(main, ["registry", "add", str(run), *reg])
    if decision == "blocked":
        assert added.exit_code == 2 and "blocked" in added.output
        added = CliRunner().invoke(main, ["registry", "add", str(run), "--allow-blocked", *reg])
    assert added.exit_code == 0, added.output
    listed = CliRunner().invoke(main, ["registry", "list", *reg])
    assert f"| run | {decision} |" in listed.output
    shown = CliRunner().invoke(main, ["registry", "show", "run", *reg])
    assert shown.exit_code == 0 and "# Release card" in shown.output
    assert CliRunner().invoke(main, ["registry", "show", "nope", *reg]).exit_code == 2
    dup = CliRunner().invoke(main, ["registry", "add", str(run), "--allow-blocked", *reg])
    assert dup.exit_code == 2 and "already has" in dup.output


def test_preflight_only_stops_before_training(small_run, tmp_path):
    _, pack = small_run
    res = CliRunner().invoke(main, ["run", "tiny", "--dataset-pack", str(pack), "--out-dir", str(tmp_path / "pf"),
                                    "--scale", "smoke", "--preflight-only", "--no-progress"])
    assert res.exit_code in (0, 1), res.output
    assert "preflight:" in res.output and (tmp_path / "pf" / "preflight.json").exists()
    assert not (tmp_path / "pf" / "base").exists() and not (tmp_path / "pf" / "tokenizer.json").exists()
