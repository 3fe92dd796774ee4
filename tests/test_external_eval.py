"""`eval external`: ARC/MMLU-style multiple choice read from every shape, scored by log-likelihood exactly as
the model computes it, with bootstrap intervals; run tiny scores a pack's multiple-choice external_eval."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from picochat_jax.checkpoint import save_model_checkpoint
from picochat_jax.cli import main
from picochat_jax.config import ModelConfig
from picochat_jax.data.records import DataError
from picochat_jax.eval.external import (
    bootstrap_interval,
    context_text,
    read_choice_questions,
    score_questions,
    summarize,
)
from picochat_jax.generate import load_native
from picochat_jax.model.transformer import init_params, make_model
from picochat_jax.tokenizer import train_tokenizer

TEXTS = ["the river carries water to the sea", "bread is baked in an oven", "the moon circles the earth"] * 10


def test_every_row_shape_reads_to_the_same_question(tmp_path):
    generic = tmp_path / "g.jsonl"
    generic.write_text(json.dumps({"question": "Water flows to the?", "choices": ["sea", "oven", "moon"],
                                   "answer": 0, "subject": "geo"}) + "\n")
    arc = tmp_path / "arc.json"
    arc.write_text(json.dumps([{"question": "Water flows to the?", "answerKey": "A",
                                "choices": {"label": ["A", "B", "C"], "text": ["sea", "oven", "moon"]}}]))
    mmlu = tmp_path / "mmlu.csv"
    mmlu.write_text("Water flows to the?,sea,oven,moon,sky,A\n")
    header = tmp_path / "h.csv"
    header.write_text("question,A,B,C,D,answer,subject\nWater flows to the?,sea,oven,moon,sky,0,geo\n")
    qs = [read_choice_questions(p)[0] for p in (generic, arc, mmlu, header)]
    assert all(q.question == "Water flows to the?" and q.answer == 0 and q.choices[0] == "sea" for q in qs)
    assert qs[0].subject == "geo" and qs[1].subject == "all"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n"
                   + json.dumps({"question": "q", "choices": ["a", "b"], "answer": "E"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'answer'"):
        read_choice_questions(bad)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("ext")
    tok = train_tokenizer(TEXTS, "bpe", 300)
    tok.save(root / "tokenizer.json")
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=64, init_std=0.3)
    params = init_params(make_model(cfg), jax.random.key(1))
    save_model_checkpoint(root / "ckpt", params, cfg, root / "tokenizer.json", {"stage": "test"})
    return root, params, cfg


def test_scores_are_the_models_own_log_likelihoods(model, tmp_path):
    root, params, cfg = model
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in [
        ("Where does the river carry water?", ["to the sea", "to the oven"], 0),
        ("What circles the earth?", ["the moon", "bread", "the river"], 0)]))
    questions = read_choice_questions(path)
    engine, fmt = load_native(root / "ckpt")
    results = score_questions(engine, fmt, questions)
    m = make_model(cfg)
    # One compiled forward over the context width; causal attention keeps the trailing filler out of the logits
    # that are read.
    forward = jax.jit(lambda ids: m.apply({"params": params}, ids)[0])
    for q, r in zip(questions, results, strict=True):
        context = fmt.encode_text(context_text(q))
        for choice, ll, norm in zip(q.choices, r["loglikelihood"], r["loglikelihood_norm"], strict=True):
            ids = fmt.encode_text(context_text(q) + " " + choice)
            assert ids[:len(context)] == context
            padded = np.zeros((1, cfg.max_seq_len), np.int32)
            padded[0, :len(ids)] = ids
            logits = np.asarray(forward(padded)[:len(ids)], np.float64)
            logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - logits.max(-1, keepdims=True)
            expected = float(sum(logp[t - 1, ids[t]] for t in range(len(context), len(ids))))
            assert ll == pytest.approx(expected, abs=1e-4)
            assert norm == pytest.approx(expected / len((" " + choice).encode()), abs=1e-4)
        assert r["pick"] == int(np.argmax(r["loglikelihood"]))


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    values = np.asarray([1, 0, 1, 1, 0, 1, 0, 1, 1, 1], float)
    lo, hi = bootstrap_interval(values, 2000, seed=0)
    assert lo < values.mean() < hi and (lo, hi) == bootstrap_interval(values, 2000, seed=0)
    rows = [{"correct": c, "correct_norm": c, "choices": ["a", "b"], "subject": s} for c, s in
            zip([True, False, True, True], ["x", "x", "y", "y"], strict=True)]
    summary = summarize(rows, samples=200)
    assert summary["acc"] == 0.75 and summary["subjects"]["y"]["acc"] == 1.0 and summary["chance"] == 0.5


def test_eval_external_cli_writes_its_evidence(model, tmp_path):
    root, _, _ = model
    path = tmp_path / "q.csv"
    path.write_text("question,A,B,C,D,answer,subject\n" + "".join(
        f"Question {i}?,the sea,an oven,the moon,bread,{'ABCD'[i % 4]},{'geo' if i % 2 else 'food'}\n"
        for i in range(8)))
    res = CliRunner().invoke(main, ["eval", "external", "--checkpoint", str(root / "ckpt"), "--input", str(path),
                                    "--out-dir", str(tmp_path / "out"), "--bootstrap-samples", "100"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "out" / "external_summary.json").read_text())
    assert summary["questions"] == 8 and set(summary["subjects"]) == {"food", "geo"}
    assert len((tmp_path / "out" / "external_results.jsonl").read_text().splitlines()) == 8
    assert "95% CI" in res.output and "acc_norm" in (tmp_path / "out" / "external_report.md").read_text()


@pytest.mark.slow
def test_run_tiny_scores_a_multiple_choice_external_eval(tmp_path, example_pack):
    pack_dir = tmp_path / "pack"
    shutil.copytree(example_pack.parent, pack_dir)
    (pack_dir / "external.jsonl").write_text("".join(
        json.dumps({"question": f"What falls as rain {i}?", "choices": ["water", "bread", "bicycles"], "answer": 0,
                    "subject": "weather"}) + "\n" for i in range(6)))
    pack = json.loads((pack_dir / "dataset_pack.json").read_text())
    (pack_dir / "dataset_pack.json").write_text(json.dumps({**pack, "external_eval": "external.jsonl"}))
    res = CliRunner().invoke(main, ["run", "tiny", "--dataset-pack", str(pack_dir / "dataset_pack.json"),
                                    "--out-dir", str(tmp_path / "run"), "--scale", "smoke", "--base-steps", "3",
                                    "--sft-steps", "3", "--no-dpo", "--no-progress"])
    assert res.exit_code in (0, 1), res.output
    assert "[external_eval] multiple choice" in res.output
    gate = json.loads((tmp_path / "run" / "release" / "gate.json").read_text())
    assert any(c["name"] == "external_pass_rate" for c in gate["checks"])
