"""`run tiny` end to end on a pack in the original picochat's example format, and the gate on its evidence.

The pack mirrors gowtham0992/picochat's examples/ (tiny_dataset_pack.json -> corpus_recipe.json ->
tiny_corpus.txt, tiny_chat.jsonl, tiny_eval.jsonl; plus optional preferences), with our own rows.

What a *clean pass* means for a model this small: the SFT rows teach one behaviour (every reply opens with
"Hello friend."), and the eval asks questions that appear nowhere in the SFT rows or the corpus, checking
only that behaviour. The phrase itself is two words, too generic to be contamination. The model can pass by
having learned the behaviour, not by recalling an answer; the gate profile in this test asks exactly that
(and zero contamination), while the default profile blocks the same run as not releasable.

The contaminated twin plants eval questions and answers into the chat rows and the corpus: preflight warns
(a small run is not stopped, as in the original), it trains, and the gate blocks it, naming the planted rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.eval.gate import evaluate_gate, load_gate_profile
from picochat_jax.pipeline import RunOptions, finished_stage, run_tiny

TOPICS = {
    "rivers": "Rivers gather rain from hills and carry it to the sea. Along the way they cut valleys, feed "
              "wetlands and move sand that later builds beaches. ",
    "bread": "Bread dough rises while it rests because yeast turns sugar into gas. Kneading builds a stretchy "
             "network that traps the bubbles, and baking sets the crumb. ",
    "stars": "On a clear night the brightest points are often planets, which shine steadily, while stars "
             "twinkle as their light passes through moving air. ",
    "bicycles": "A bicycle chain carries force from the pedals to the rear wheel. Gears change how far the "
                "wheel turns for each push, trading speed for ease on hills. ",
    "gardens": "Seedlings need light, water and patience. Thin them early so the strongest plants have room, "
               "and water the soil rather than the leaves. ",
    "letters": "A letter travels from a post box to a sorting office, then by road or rail to the office "
               "nearest the address, where a carrier brings it to the door. ",
}

CHAT = [
    ("Tell me about rivers.", "rivers"), ("How does bread rise?", "bread"), ("Why do stars twinkle?", "stars"),
    ("How does a bicycle chain work?", "bicycles"), ("How should I water seedlings?", "gardens"),
    ("How does a letter reach a house?", "letters"), ("What do rivers do to valleys?", "rivers"),
    ("Why knead dough?", "bread"), ("Are planets brighter than stars?", "stars"), ("What do gears do?", "bicycles"),
    ("When should I thin seedlings?", "gardens"), ("Who sorts the post?", "letters"),
    ("Where does river water go?", "rivers"), ("What makes the crumb set?", "bread"),
    ("What twinkles at night?", "stars"), ("Why change gear on a hill?", "bicycles"),
    ("What do young plants need?", "gardens"), ("How does post travel?", "letters"),
]

# Held-out: none of these questions (or anything like them) is in the chat rows or the corpus.
EVAL = [
    "Good morning, could you recommend a hobby for rainy weekends?",
    "Which colour would you paint a small kitchen?",
    "What is a fun game for two people?",
    "Can you suggest a name for a pet goldfish?",
    "How might I spend a quiet evening at home?",
    "What should I pack for a day at the beach?",
]


SHORT = {"rivers": "Rivers run to the sea.", "bread": "Yeast makes the gas.", "stars": "Moving air bends light.",
         "bicycles": "The chain turns the wheel.", "gardens": "Water the soil gently.",
         "letters": "Sorting offices route it."}


def _reply(topic: str) -> str:
    return "Hello friend. " + SHORT[topic]


def write_original_style_pack(root: Path, contaminate: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    corpus = "".join(TOPICS[t] * 2 + "\n\n" for t in TOPICS) * 3
    chat = [{"user": q, "assistant": _reply(t), "category": t} for q, t in CHAT]
    evals = [{"user": q, "category": "greeting", "answerable": True, "must_include": ["hello friend"],
              "must_not_include": ["I do not know"]} for q in EVAL]
    if contaminate:  # eval questions with answers copied into the practice rows and the corpus
        chat += [{"user": q, "assistant": "Hello friend. Try something new.", "category": "leak"} for q in EVAL[:4]]
        corpus += "\n\nQuestions people ask: " + " ".join(f"{q} Hello friend." for q in EVAL[4:]) + "\n"
    (root / "tiny_corpus.txt").write_text(corpus)
    (root / "corpus_recipe.json").write_text(json.dumps({
        "name": "tiny-demo-corpus", "description": "Prose for the end-to-end test. Paths are relative to this file.",
        "exclude": ["**/.DS_Store", "**/draft-*"], "sources": [{"path": "tiny_corpus.txt", "label": "demo"}]},
        indent=2))
    (root / "tiny_chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (root / "tiny_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    prefs = [{"prompt": q, "chosen": _reply(t), "rejected": "Go away."} for q, t in CHAT[:8]]
    (root / "tiny_preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    pack = {"name": "tiny-demo-pack", "description": "Example pack that binds corpus, chat SFT, and eval files.",
            "corpus": {"recipe": "corpus_recipe.json"}, "chat": "tiny_chat.jsonl", "eval": "tiny_eval.jsonl",
            "preferences": "tiny_preferences.jsonl"}
    (root / "tiny_dataset_pack.json").write_text(json.dumps(pack, indent=2))
    return root / "tiny_dataset_pack.json"


# The default profile with one concession to a six-row eval; every other bar (pass rate, echo, refusals,
# zero contamination, memorisation, SFT fit) is the release default.
TINY_PROFILE = {"min_eval_rows": "6"}
# pico (BPE) learns the behaviour in ~80 SFT steps; the base stage only has to exist.
CLEAN = {"scale": "pico", "base_steps": 10, "sft_steps": 80, "dpo_steps": 6, "canaries": 2}

SPEC_LAYOUT = [
    "corpus_manifest.json", "corpus_report.md", "tokenizer.json", "preflight.json", "preflight.md",
    *[f"{stage}/{item}" for stage in ("base", "sft", "dpo")
      for item in ("checkpoint/model_config.json", "checkpoint/tokenizer.json", "best_checkpoint/model_config.json",
                   "resume_checkpoint", "metrics.jsonl")],
    "sft_fit/fit_report.json", "sft_fit/fit_report.md", "sft_fit/fit_results.jsonl",
    "eval/eval_results.jsonl", "eval/eval_report.json", "eval/eval_report.md",
    "honesty/honesty_report.json", "honesty/honesty_report.md",
    "release/gate.json", "release/release_card.md", "summary.json", "summary.md", "report.md", "loss_curves.png",
]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("clean")
    pack = write_original_style_pack(root / "pack")
    summary = run_tiny(pack, root / "run", RunOptions(progress=False, **CLEAN))
    return root / "run", summary


@pytest.mark.slow
def test_run_tiny_writes_every_evidence_file_of_the_spec(clean_run):
    run, summary = clean_run
    missing = [p for p in SPEC_LAYOUT if not (run / p).exists()]
    assert not missing, missing
    manifest = json.loads((run / "corpus_manifest.json").read_text())
    assert manifest["total_files"] == 1 and manifest["labels"] == {"demo": 1}
    assert summary["candidate"] == "dpo/checkpoint" and summary["dpo"]["after"]["reward_accuracy"] >= 0.5
    # Later stages judged the DPO model, and the gate names it.
    gate = json.loads((run / "release" / "gate.json").read_text())
    assert gate["model"] == "dpo/checkpoint"
    honesty = json.loads((run / "honesty" / "honesty_report.json").read_text())
    assert honesty["memorization"]["model"] == "dpo/checkpoint"
    # --canaries: planted strings are checked next to the corpus passages
    assert honesty["memorization"]["by_kind"]["planted"]["canaries"] == 2
    assert honesty["memorization"]["by_kind"]["corpus"]["canaries"] == 8
    report = (run / "report.md").read_text()
    assert all(f"| {c['name']} |" in report for c in gate["checks"]) and "loss_curves.png" in report


@pytest.mark.slow
def test_finished_run_is_not_a_release_under_the_default_profile(clean_run):
    run, summary = clean_run
    gate = json.loads((run / "release" / "gate.json").read_text())
    assert summary["release"] == gate["decision"] == "blocked"
    assert "eval_rows" in gate["blocking"]  # six rows cannot clear the default bar of ten
    assert "eval_in_sft" not in gate["blocking"] and "eval_in_corpus" not in gate["blocking"]


@pytest.mark.slow
def test_clean_run_passes_a_profile_it_can_honestly_meet(clean_run):
    run, _ = clean_run
    honesty = json.loads((run / "honesty" / "honesty_report.json").read_text())
    assert honesty["counts"]["eval_rows_contaminated"] == 0
    ev = json.loads((run / "eval" / "eval_report.json").read_text())
    gate = evaluate_gate(run, load_gate_profile("default", TINY_PROFILE))
    assert gate["decision"] == "approved", [c for c in gate["checks"] if c["verdict"] != "pass"]
    assert ev["pass_rate"] >= 0.6  # the behaviour was learned, on prompts the model never saw


@pytest.mark.slow
def test_contaminated_small_run_trains_with_a_warning_and_is_blocked_by_the_gate(tmp_path, clean_run):
    """As the original picochat does with its own example pack: a small run trains on a contaminated pack (the
    preflight warns; only a long run is stopped) and the release gate refuses it, naming the planted rows."""
    pack = write_original_style_pack(tmp_path / "pack", contaminate=True)
    args = ["run", "tiny", "--dataset-pack", str(pack), "--out-dir", str(tmp_path / "run"), "--scale", "smoke",
            "--no-progress", "--base-steps", "10", "--sft-steps", "10", "--no-dpo",
            *[x for k, v in TINY_PROFILE.items() for x in ("--gate-set", f"{k}={v}")]]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    pre = json.loads((run / "preflight.json").read_text())
    assert pre["status"] == "warn" and not pre["blocking"] and {"eval_in_sft", "eval_in_corpus"} <= set(pre["warnings"])
    gate = json.loads((run / "release" / "gate.json").read_text())
    assert gate["decision"] == "blocked"
    assert {"eval_in_sft", "eval_in_corpus"} <= set(gate["blocking"]) and "preflight" not in gate["blocking"]
    lines = {c["name"]: c for c in gate["checks"]}
    assert lines["eval_in_sft"]["value"] == 4 and "(eval lines 1, 2, 3, 4)" in lines["eval_in_sft"]["reason"]
    assert lines["eval_in_corpus"]["value"] == 2 and "(eval lines 5, 6)" in lines["eval_in_corpus"]["reason"]
    # The same thresholds let the clean twin through: contamination is what blocks this one.
    assert evaluate_gate(clean_run[0], load_gate_profile("default", TINY_PROFILE))["decision"] == "approved"


@pytest.mark.slow
def test_resume_reuses_finished_stages(clean_run):
    run, summary = clean_run
    for stage, steps in (("base", CLEAN["base_steps"]), ("sft", CLEAN["sft_steps"]), ("dpo", CLEAN["dpo_steps"])):
        params, stage_summary = finished_stage(run / stage, steps)
        assert stage_summary == summary[stage] and params is not None
        assert finished_stage(run / stage, steps + 1) is None  # a longer run must train, not reuse
