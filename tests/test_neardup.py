"""Near-duplicate contamination (MinHash over character shingles), regurgitation in replies, and
`picochat data honesty`."""

from __future__ import annotations

import json
import shutil

import numpy as np
from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.data.records import Conversation, EvalRow, Message
from picochat_jax.eval import neardup
from picochat_jax.eval.honesty import merge_near_duplicates
from picochat_jax.eval.neardup import near_duplicates, regurgitation, scan_near_duplicates, shingles, signature
from picochat_jax.eval.ngram import TextIndex, scan_contamination


def _jaccard(a: str, b: str) -> float:
    x, y = set(shingles(a).tolist()), set(shingles(b).tolist())
    return len(x & y) / len(x | y)


def test_minhash_estimates_jaccard():
    a = "How many legs does a spider have, and why do insects have six instead?"
    b = "How many legs does a spider have - and why do insects have six, instead?"
    c = "Describe the water cycle from evaporation to rain in three sentences."
    for x, y in ((a, b), (a, c), (a, a)):
        est = float((signature(shingles(x)) == signature(shingles(y))).mean())
        assert abs(est - _jaccard(x, y)) < 0.12  # 128 permutations: a standard error under 0.05
    assert float((signature(shingles(a)) == signature(shingles(a))).mean()) == 1.0


def test_reworded_eval_prompt_is_a_near_duplicate_that_exact_checks_miss():
    sft = [Conversation((Message("user", "Explain how a library catalogue helps a reader find a book quickly."),
                         Message("assistant", "It lists every book by author, title and subject.")),
                        source="chat.jsonl", line=4),
           Conversation((Message("user", "What is the boiling point of water at sea level?"),
                         Message("assistant", "One hundred degrees Celsius.")), source="chat.jsonl", line=9)]
    evals = [EvalRow((Message("user", "Explain how a library catalog helps a reader find a book quickly!"),),
                     line=1),
             EvalRow((Message("user", "Why do bicycles stay upright when they move?"),), line=2)]
    docs = ["Rivers carry water to the sea. " * 20]
    exact = scan_contamination(evals, sft, docs, ["rivers.txt"])
    assert exact["counts"]["eval_rows_in_sft"] == 0  # one word changed: the exact and 8-gram checks miss it
    near = scan_near_duplicates(evals, sft, docs, ["rivers.txt"], threshold=0.7)
    assert [(f["kind"], f["eval_line"], f["where"]) for f in near["findings"]] == [
        ("eval_prompt_near_sft", 1, "chat.jsonl:4")]
    merged = merge_near_duplicates(exact, near)
    assert merged["counts"]["eval_rows_in_sft"] == 1 and merged["eval_lines_in_sft"] == [1]
    assert scan_near_duplicates(evals, sft, docs, ["rivers.txt"], threshold=0.99)["findings"] == []


def test_near_duplicates_found_through_lsh_among_many_targets():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(3000)]
    targets = [" ".join(rng.choice(vocab, 20)) for _ in range(2000)]
    query = targets[1234].replace(targets[1234].split()[5], "changed", 1)
    found = near_duplicates([query, "completely unrelated words here"], targets, [f"t{i}" for i in range(2000)],
                            threshold=0.7)
    assert [(f["query"], f["where"]) for f in found] == [(0, "t1234")]


def test_document_prefilter_keeps_every_corpus_finding(monkeypatch):
    """could_match drops documents that cannot hold a near duplicate; the scan's findings (where, similarity)
    are the same as scanning every passage of every document, at several thresholds."""
    rng = np.random.default_rng(1)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["".join(rng.choice(letters, int(rng.integers(4, 9)))) for _ in range(2000)]
    vocab += ["the", "a", "of", "and", "to"] * 100
    docs = [" ".join(rng.choice(vocab, int(rng.integers(30, 400)))) for _ in range(300)]
    evals = [EvalRow((Message("user", " ".join(rng.choice(vocab, 12))),), line=i + 1,
                     reference=" ".join(rng.choice(vocab, 20)) if i % 2 else None) for i in range(6)]
    # planted: eval 1's prompt re-punctuated as doc 17, eval 2's reference with one word changed as doc 250
    docs[17] = evals[0].prompt[0].content.replace(" ", ", ", 4) + "!"
    reference = evals[1].reference.split()
    docs[250] = " ".join(reference[:9] + ["changed"] + reference[10:])
    labels = [f"d{i}.txt" for i in range(len(docs))]
    for threshold in (0.5, 0.7, 0.86):
        fast = scan_near_duplicates(evals, [], docs, labels, threshold=threshold)
        keep = neardup.could_match([*(r.prompt[0].content for r in evals), *(r.reference or "" for r in evals)],
                                   docs, threshold)
        with monkeypatch.context() as m:
            m.setattr(neardup, "could_match", lambda texts, documents, *a: np.ones(len(documents), bool))
            slow = scan_near_duplicates(evals, [], docs, labels, threshold=threshold)
        assert fast == slow, threshold
        if threshold == 0.5:
            assert keep[17] and keep[250]
    assert keep.sum() < len(docs) // 4  # at the default threshold the filter leaves few documents to scan
    found = {(f["kind"], f["where"].split("@")[0]) for f in
             scan_near_duplicates(evals, [], docs, labels, threshold=0.7)["findings"]}
    assert {("eval_prompt_near_corpus", "d17.txt"), ("eval_reference_near_corpus", "d250.txt")} <= found


def test_regurgitated_replies_are_found():
    corpus = ["the history of printing begins with carved wooden blocks pressed onto paper by hand long before "
              "movable type made books cheap enough for ordinary readers to own"]
    index = TextIndex.build("corpus", corpus, ["printing.txt"], n=16)
    replies = ["Printing began with carved wooden blocks pressed onto paper by hand long before movable type made "
               "books cheap enough, as the text says.",
               "Printing started with wooden blocks."]
    out = regurgitation(replies, index, 16, ["row 1", "row 2"])
    assert out["regurgitated"] == 1 and out["examples"][0]["label"] == "row 1" and out["rate"] == 0.5


def test_data_honesty_command(tmp_path, example_pack):
    pack_dir = tmp_path / "pack"
    shutil.copytree(example_pack.parent, pack_dir)
    evals = (pack_dir / "eval.jsonl").read_text().splitlines()
    chat = [json.loads(line) for line in (pack_dir / "chat.jsonl").read_text().splitlines() if line.strip()]
    reworded = chat[10]["user"].rstrip("?.!") + ", please?"
    (pack_dir / "eval.jsonl").write_text("\n".join([json.dumps({"user": reworded, "must_include": ["x"]}), *evals])
                                         + "\n")
    res = CliRunner().invoke(main, ["data", "honesty", str(pack_dir / "dataset_pack.json"), "--out-dir",
                                    str(tmp_path / "h"), "--near-threshold", "0.75"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "h" / "honesty_report.json").read_text())
    assert 1 in report["eval_lines_in_sft"] and report["near_duplicates"]["threshold"] == 0.75
    assert report["memorization"] is None and "near duplicates" in res.output
    assert "Near duplicates:" in (tmp_path / "h" / "honesty_report.md").read_text()
