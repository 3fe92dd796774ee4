"""`report.md`: one page per run, the report card a reader opens first.

Loss curves (train and validation, per stage, from each stage's metrics.jsonl) as a PNG, the training
numbers, the eval and honesty headlines, every release-gate line, and links to the evidence files.
Everything is read from disk, so `write_run_report(RUN)` can rebuild the page for any finished run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from picochat_jax.eval.gate import EVIDENCE, gate_table
from picochat_jax.fileio import read_json_object, save_text
from picochat_jax.markdown import number

STAGES = ("base", "sft", "dpo")
PLOT_NAME = "loss_curves.png"


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows with 'loss', validation rows with 'val_loss') of one metrics.jsonl."""
    if not path.exists():
        return [], []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def plot_losses(run_dir: Path, out_path: Path) -> list[str]:
    """One panel per stage that has metrics; returns the stages drawn (empty: nothing written)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    curves = {s: read_metrics(run_dir / s / "metrics.jsonl") for s in STAGES}
    stages = [s for s in STAGES if curves[s][0] or curves[s][1]]
    if not stages:
        return []
    fig, axes = plt.subplots(1, len(stages), figsize=(4.6 * len(stages), 3.6), dpi=110, squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        train, val = curves[stage]
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", color="tab:blue", lw=1.6)
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], label="validation", color="tab:orange",
                    lw=1.6, marker="o", ms=4)
        ax.set_title({"dpo": "DPO (preference loss)"}.get(stage, f"{stage} (cross-entropy)"), fontsize=11)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_path)
    return stages




def write_run_report(run_dir: str | Path) -> Path:
    """Write RUN/report.md (and RUN/loss_curves.png); returns the report path."""
    run_dir = Path(run_dir)
    stages = plot_losses(run_dir, run_dir / PLOT_NAME)
    summary = read_json_object(run_dir / "summary.json")
    gate = read_json_object(run_dir / "release" / "gate.json")
    ev = read_json_object(run_dir / EVIDENCE["eval"])
    fit = read_json_object(run_dir / EVIDENCE["sft_fit"])
    hon = read_json_object(run_dir / EVIDENCE["honesty"])
    pre = read_json_object(run_dir / EVIDENCE["preflight"])

    title = f"# Run report: {summary.get('pack', run_dir.name)}"
    title += f" ({summary['scale']})" if summary.get("scale") else ""
    lines = [title, ""]
    if gate:
        lines += [f"**Release gate: {gate['decision'].upper()}**"
                  + (f" (blocked by {', '.join(gate['blocking'])})" if gate.get("blocking") else "")
                  + (f" (warnings: {', '.join(gate['warnings'])})" if gate.get("warnings") else "")
                  + f". Candidate model `{gate.get('model')}`, profile `{gate['profile']['name']}`. "
                  "A finished run is not a release; see [release card](release/release_card.md).", ""]
    else:
        lines += ["**Release gate: not run** (`picochat gate RUN_DIR`).", ""]
    if summary:
        lines += [(f"{summary.get('params', 0):,} parameters, mesh {summary.get('mesh')} on "
                  f"{summary.get('device_kind')}, wall time {number(summary.get('wall_sec'), '.0f')} s."), "",
                  "| stage | steps | tokens | first loss | final loss | best val loss | tokens/s | MFU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for stage in STAGES:
            s = summary.get(stage)
            if isinstance(s, dict):
                lines.append(f"| {stage} | {s.get('steps')} | {s.get('tokens_seen', 0) or 0:,} | "
                             f"{number(s.get('first_loss'))} | {number(s.get('final_loss'))} | "
                             f"{number(s.get('best_val_loss'))} | "
                             f"{number(s.get('tokens_per_sec'), ',.0f')} | {number(s.get('mfu'), '.2%')} |")
        lines.append("")
    if stages:
        lines += [f"![loss curves]({PLOT_NAME})", ""]
    lines += ["## Headlines", ""]
    if pre:
        lines.append(f"- preflight: {pre.get('status')}" + (f" (warnings: {', '.join(pre['warnings'])})"
                                                            if pre.get("warnings") else ""))
    if fit:
        lines.append(f"- SFT fit: {fit.get('reproduced')}/{fit.get('rows')} rows reproduced exactly, mean F1 "
                     f"{number(fit.get('mean_f1'))}")
    if ev:
        lines.append(f"- held-out eval: {ev.get('passed')}/{ev.get('rows')} passed "
                     f"({number(ev.get('pass_rate'), '.1%')}), "
                     f"prompt echo {number(ev.get('prompt_echo_rate'), '.1%')}, "
                     f"refusals {number(ev.get('refusal_rate'), '.1%')}")
    dpo = summary.get("dpo") if summary else None
    if isinstance(dpo, dict) and dpo.get("after"):
        lines.append(f"- DPO: reward accuracy {number(dpo['before']['reward_accuracy'], '.2f')} -> "
                     f"{number(dpo['after']['reward_accuracy'], '.2f')}, chosen-rejected log-prob margin "
                     f"{number(dpo['before']['logp_margin'], '.2f')} -> {number(dpo['after']['logp_margin'], '.2f')}")
    if hon:
        c = hon.get("counts", {})
        mem = hon.get("memorization") or {}
        lines.append(f"- honesty: {hon.get('status')}; eval rows in SFT {c.get('eval_rows_in_sft')}, in corpus "
                     f"{c.get('eval_rows_in_corpus')}"
                     + (f"; memorised canaries {mem.get('memorized')}/{mem.get('canaries')}" if mem else ""))
    lines.append("")
    if gate:
        lines += ["## Release gate", "", *gate_table(gate), ""]
    lines += ["## Evidence", ""]
    links = [("preflight", "preflight.md"), ("training summary", "summary.md"), ("SFT fit", "sft_fit/fit_report.md"),
             ("held-out eval", "eval/eval_report.md"), ("eval rows", "eval/eval_results.jsonl"),
             ("external benchmark", "external_eval/eval_report.md"),
             ("external multiple choice", "external_eval/external_report.md"), ("honesty", "honesty/honesty_report.md"),
             ("release card", "release/release_card.md"), ("gate decision", "release/gate.json"),
             ("corpus", "corpus_report.md")]
    lines += [f"- [{name}]({rel})" for name, rel in links if (run_dir / rel).exists()]
    for stage in STAGES:
        if (run_dir / stage / "metrics.jsonl").exists():
            lines.append(f"- [{stage} metrics]({stage}/metrics.jsonl), model `{stage}/checkpoint/`")
    path = run_dir / "report.md"
    save_text(path, "\n".join(lines) + "\n")
    return path
