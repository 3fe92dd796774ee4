"""Contamination is found where it was planted, and only there; memorisation is measured per canary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from picochat_jax.data.pack import load_corpus, load_pack
from picochat_jax.data.records import Conversation, EvalRow, Message, read_chat_jsonl, read_eval_jsonl
from picochat_jax.eval.honesty import (
    Canary,
    corpus_canaries,
    make_planted_canaries,
    memorization_check,
    plant_canaries,
    planted_canaries,
    write_honesty_report,
)
from picochat_jax.eval.ngram import document_sources, ngram_hashes, scan_contamination, word_ids
from picochat_jax.eval.text import normalize
from picochat_jax.tokenizer import train_tokenizer


def _scan(pack_path: Path) -> dict:
    pack = load_pack(pack_path)
    corpus = load_corpus(pack)
    sources = document_sources(corpus)
    assert sources == [Path(f["path"]).name for f in corpus.manifest["files"]]  # one .txt = one document
    return scan_contamination(read_eval_jsonl(pack.eval), read_chat_jsonl(pack.chat), corpus.documents, sources)


def _conv(user: str, assistant: str, line: int) -> Conversation:
    return Conversation((Message("user", user), Message("assistant", assistant)), source="chat.jsonl", line=line)


def _eval(user: str, line: int, **kw) -> EvalRow:
    return EvalRow(prompt=(Message("user", user),), source="eval.jsonl", line=line, **kw)


def test_normalize_and_ngram_hashes():
    assert normalize("  What's a TOKEN?\n\n(Really!)  ", strip_punctuation=True) == "what s a token really"
    words = ["the", "cat", "sat", "on", "the", "mat", "and", "then", "the", "cat", "sat", "on", "the", "mat"]
    h = ngram_hashes(word_ids(words), 4)
    assert len(h) == len(words) - 3
    # "the cat sat on" occurs twice and hashes the same both times; distinct windows do not collide here
    assert h[0] == h[8] and len(set(h.tolist())) == len({tuple(words[i:i + 4]) for i in range(len(h))})
    assert len(ngram_hashes(word_ids(words[:3]), 4)) == 0


def test_planted_eval_question_and_answer_are_found_in_chat_and_corpus(tmp_path, example_pack):
    pack_dir = tmp_path / "pack"
    shutil.copytree(example_pack.parent, pack_dir)
    baseline = _scan(pack_dir / "dataset_pack.json")
    eval_rows = read_eval_jsonl(pack_dir / "eval.jsonl")
    clean = [r for r in eval_rows if r.line not in baseline["contaminated_eval_lines"]
             and len(normalize(r.user, strip_punctuation=True).split()) >= 5]
    assert clean, "the example pack needs a clean eval row of five or more words to plant"
    row = clean[0]
    answer = "The answer involves " + " and ".join(row.must_include or [g[0] for g in row.must_include_any]) + "."

    chat_path = pack_dir / "chat.jsonl"
    planted_line = len([x for x in chat_path.read_text().splitlines() if x.strip()]) + 1
    with chat_path.open("a") as fh:
        fh.write(json.dumps({"user": row.user, "assistant": answer}) + "\n")
    # Into the corpus, reformatted: case, punctuation and line breaks must not hide a copy.
    recipe = json.loads((pack_dir / "corpus_recipe.json").read_text())
    corpus_dir = pack_dir / recipe["sources"][0]["path"]
    (corpus_dir / "zz_planted.txt").write_text(
        "Some ordinary prose comes first.\n\nQ: " + row.user.upper().replace(" ", "\n", 2) + "\nA: " + answer + "\n")

    after = _scan(pack_dir / "dataset_pack.json")
    found = {(f["kind"], f["where"]) for f in after["findings"] if f["eval_line"] == row.line}
    assert ("eval_prompt_in_sft", f"chat.jsonl:{planted_line}") in found
    assert ("eval_prompt_in_corpus", "zz_planted.txt") in found
    assert row.line in after["contaminated_eval_lines"]
    c0, c1 = baseline["counts"], after["counts"]
    assert c1["eval_rows_in_sft"] == c0["eval_rows_in_sft"] + 1
    assert c1["eval_rows_in_corpus"] == c0["eval_rows_in_corpus"] + 1


def test_near_copies_are_found_and_paraphrases_are_not():
    sft = [_conv("Explain in two sentences why the evaluation set must stay separate from training data", "ok", 1),
           _conv("Name a river", "The Nile.", 2)]
    long_near = "Explain in two sentences why the evaluation set must stay separate from the training data"
    paraphrase = "Why should held-out questions never be used while fitting the model?"
    scan = scan_contamination([_eval(long_near, 1), _eval(paraphrase, 2), _eval("name a river!", 3)], sft, [])
    by_line = {f["eval_line"]: f for f in scan["findings"] if f["kind"] == "eval_prompt_in_sft"}
    assert by_line[1]["how"] == "8-gram" and by_line[1]["overlap"] >= 0.5
    assert by_line[3]["how"] == "exact"  # short prompts still match exactly after normalisation
    assert 2 not in by_line
    assert scan["counts"]["eval_rows_in_sft"] == 2


def test_generic_answer_phrases_warn_but_references_block():
    sft = [_conv("What should a model say when unsure?", "I do not know, and that is fine.", 1)]
    corpus = ["Rivers carry water from mountains to the sea, and the water cycle begins again with rain."]
    rows = [_eval("How would you reply to an unknowable question?", 1, must_include=("do not know", "fine")),
            _eval("Where do rivers carry water?", 2,
                  reference="Rivers carry water from mountains to the sea, and the water cycle begins again.")]
    scan = scan_contamination(rows, sft, corpus)
    kinds = {(f["kind"], f["eval_line"], f["severity"]) for f in scan["findings"]}
    assert ("eval_phrase_in_sft", 1, "warn") in kinds  # "do not know": three words, found, but only a warning
    assert not any(f["text"] == "fine" for f in scan["findings"])  # one word: too generic to report
    assert ("eval_reference_in_corpus", 2, "block") in kinds
    assert scan["counts"]["eval_rows_in_sft"] == 0 and scan["counts"]["eval_rows_in_corpus"] == 1


def test_sft_answers_copied_from_the_corpus_are_counted():
    corpus = ["Bread rises because yeast eats sugar and releases carbon dioxide gas into the dough while it rests."]
    sft = [_conv("Why does bread rise?", "Because yeast eats sugar and releases carbon dioxide gas into the dough.", 1),
           _conv("Why does bread rise?", "Yeast makes gas.", 2)]
    scan = scan_contamination([], sft, corpus)
    assert scan["counts"]["sft_rows_in_corpus"] == 1
    assert scan["sft_corpus"]["examples"][0]["sft_row"] == "chat.jsonl:1"


@pytest.fixture(scope="module")
def byte_tok():
    return train_tokenizer(["x"], "byte", 0)


class _StubEngine:
    """Reproduces the continuation of the first `memorised` canaries, garbage for the rest."""

    def __init__(self, canaries: list[Canary], memorised: int):
        self.answers = {c.prefix_ids: (list(c.continuation_ids) if i < memorised else [0] * len(c.continuation_ids))
                        for i, c in enumerate(canaries)}

    def generate(self, prompts, sampling, stop_ids):
        return [self.answers[tuple(p)] for p in prompts]


def test_corpus_canaries_are_contiguous_passages(byte_tok):
    docs = ["alpha beta gamma delta " * 20, "short", "one two three four five six seven " * 10]
    canaries = corpus_canaries(docs, ["a", "b", "c"], byte_tok, count=6, prefix_tokens=12, continuation_tokens=5)
    assert len(canaries) == 6 and {c.source for c in canaries} <= {"a", "c"}  # "short" cannot hold 17 tokens
    for c in canaries:
        doc = byte_tok.encode(docs["ac".index(c.source) * 2])
        window = list(c.prefix_ids + c.continuation_ids)
        assert len(c.prefix_ids) == 12 and len(c.continuation_ids) == 5
        assert any(doc[i:i + len(window)] == window for i in range(len(doc) - len(window) + 1))


def test_memorisation_rate_counts_exact_continuations(byte_tok):
    planted = make_planted_canaries(3, seed=1)
    docs = plant_canaries(["line one\nline two", "another\ndocument"], planted, repeats=2, seed=0)
    assert all(sum(d.count(p + s) for d in docs) == 2 for p, s in planted)
    canaries = planted_canaries(planted, byte_tok) + corpus_canaries(docs, ["d0", "d1"], byte_tok, 1, 8, 4)
    assert byte_tok.decode(list(canaries[0].continuation_ids)) == planted[0][1]
    result = memorization_check(_StubEngine(canaries, memorised=2), byte_tok, canaries, sampling=None)
    assert result["canaries"] == 4 and result["memorized"] == 2 and result["rate"] == 0.5
    assert result["by_kind"]["planted"] == {"canaries": 3, "memorized": 2, "rate": pytest.approx(2 / 3)}
    first_miss = result["examples"][2]
    assert not first_miss["memorized"] and first_miss["matched_tokens"] < first_miss["continuation_tokens"]


def test_report_files(tmp_path):
    scan = scan_contamination([_eval("Name a river", 1)], [_conv("name a river", "Nile", 1)], ["text"])
    report = write_honesty_report(tmp_path, scan, {"canaries": 0, "memorized": 0, "rate": 0.0,
                                                   "mean_token_match": 0.0, "examples": []}, {"chat": "chat.jsonl"})
    assert report["status"] == "contaminated"
    saved = json.loads((tmp_path / "honesty_report.json").read_text())
    assert saved["counts"]["eval_rows_in_sft"] == 1 and saved["contaminated_eval_lines"] == [1]
    md = (tmp_path / "honesty_report.md").read_text()
    assert "eval_prompt_in_sft" in md and "| eval rows found in SFT rows | 1 |" in md
    assert np.isfinite(saved["sft_corpus"]["answer_ngram_overlap"])


def test_a_short_prompt_repeated_with_other_punctuation_is_still_an_exact_match(example_pack):
    """The shipped pack's eval line 1 ("What is picochat?") repeats an SFT prompt: three words, below the n-gram
    length, caught by the normalised exact match whatever its punctuation and case."""
    pack = load_pack(example_pack)
    corpus = load_corpus(pack)
    scan = scan_contamination(read_eval_jsonl(pack.eval), read_chat_jsonl(pack.chat), corpus.documents,
                              document_sources(corpus))
    assert scan["eval_lines_in_sft"] == [1, 2, 3, 4, 5, 6, 7]
    rows = [EvalRow(prompt=(Message("user", "WHAT is picochat!!"),), line=1)]
    chat = [Conversation((Message("user", "what is Picochat?"), Message("assistant", "a toy")))]
    assert scan_contamination(rows, chat, [], [])["eval_lines_in_sft"] == [1]
