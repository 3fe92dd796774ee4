"""Packs and corpus recipes written exactly as the original picochat documents them load unchanged: every key
form (`corpus` as a string, `{recipe}`, `{input}`; `chat_input`/`eval_input`), recipe sources as strings or
objects with their own `include`/`exclude`/`reason`, and all eight corpus file types. Every file left out is
recorded in the manifest with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.data.pack import DataError, load_corpus, load_pack

CHAT = [{"user": f"Question {i}?", "assistant": f"Answer {i}."} for i in range(4)]
EVAL = [{"user": "Question 9?", "must_include": ["Answer"]}]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _pdf(path: Path, text: str) -> None:
    """A one-page PDF with `text` in Helvetica: the smallest file pypdf extracts text from."""
    stream = f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 400 144] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))


def _docx(path: Path, paragraphs: list[str]) -> None:
    docx = pytest.importorskip("docx")
    document = docx.Document()
    for p in paragraphs:
        document.add_paragraph(p)
    document.save(str(path))


def test_the_original_tiny_pack_with_its_recipe_loads(tmp_path):
    """examples/tiny_dataset_pack.json and examples/corpus_recipe.json of the original, as written there."""
    (tmp_path / "tiny_corpus.txt").write_text("A tiny corpus about tokenizers and training loops.\n" * 20)
    (tmp_path / "draft-notes.txt").write_text("not for training\n")
    (tmp_path / "corpus_recipe.json").write_text(json.dumps({
        "name": "tiny-demo-corpus", "description": "Example recipe. Paths are relative to this file.",
        "exclude": ["**/.DS_Store", "**/draft-*"], "sources": [{"path": "tiny_corpus.txt", "label": "demo"}]}))
    _jsonl(tmp_path / "tiny_chat.jsonl", CHAT)
    _jsonl(tmp_path / "tiny_eval.jsonl", EVAL)
    (tmp_path / "tiny_dataset_pack.json").write_text(json.dumps({
        "name": "tiny-demo-pack", "description": "Example pack.", "corpus": {"recipe": "corpus_recipe.json"},
        "chat": "tiny_chat.jsonl", "eval": "tiny_eval.jsonl"}))
    pack = load_pack(tmp_path / "tiny_dataset_pack.json")
    corpus = load_corpus(pack)
    assert pack.name == "tiny-demo-pack" and corpus.labels == ["demo"]
    assert corpus.manifest["total_files"] == 1 and corpus.manifest["skipped"] == []
    result = CliRunner().invoke(main, ["data", "validate", str(tmp_path / "tiny_dataset_pack.json")])
    assert result.exit_code == 0 and "OK" in result.output, result.output


def test_corpus_input_and_the_input_keys_and_all_eight_file_types(tmp_path):
    docs = tmp_path / "documents"
    docs.mkdir()
    (docs / "a.txt").write_text("plain text file\n")
    (docs / "b.md").write_text("# markdown\nfile\n")
    (docs / "c.text").write_text("a .text file\n")
    (docs / "d.py").write_text("def f():\n    return 'python source'\n")
    (docs / "e.csv").write_text('id,text\n1,"first csv row"\n2,"second, with a comma"\n')
    (docs / "f.csv").write_text("name,value\nalpha,1\n")  # no text column: the whole file is one document
    _jsonl(docs / "g.jsonl", [{"text": "jsonl document one"}, {"text": "jsonl document two"}])
    _jsonl(docs / "h.jsonl", [{"user": "hi", "assistant": "hello"}])  # no text field: raw text, as the original
    _docx(docs / "i.docx", ["A paragraph of a Word document.", "And a second one."])
    _pdf(docs / "j.pdf", "Text inside a PDF page")
    (docs / "k.png").write_bytes(b"\x89PNG\r\n")
    _jsonl(tmp_path / "chat.jsonl", CHAT)
    _jsonl(tmp_path / "eval.jsonl", EVAL)
    (tmp_path / "pack.json").write_text(json.dumps({"corpus": {"input": "documents"}, "chat_input": "chat.jsonl",
                                                    "eval_input": "eval.jsonl"}))
    pack = load_pack(tmp_path / "pack.json")
    assert pack.chat == tmp_path / "chat.jsonl" and pack.eval == tmp_path / "eval.jsonl" and not pack.extra
    corpus = load_corpus(pack)
    text = "\n".join(corpus.documents)
    for piece in ("plain text file", "markdown", "a .text file", "python source", "first csv row",
                  "second, with a comma", "name,value", "jsonl document two", '"assistant": "hello"',
                  "A paragraph of a Word document.", "Text inside a PDF page"):
        assert piece in text, piece
    per_file = {Path(e["path"]).name: e["documents"] for e in corpus.manifest["files"]}
    assert per_file == {"a.txt": 1, "b.md": 1, "c.text": 1, "d.py": 1, "e.csv": 2, "f.csv": 1, "g.jsonl": 2,
                        "h.jsonl": 1, "i.docx": 1, "j.pdf": 1}
    assert corpus.manifest["skipped"] == [{"path": str(docs / "k.png"), "label": "documents",
                                           "reason": "unsupported_extension"}]


def test_recipe_sources_strings_include_false_own_excludes_and_missing_ones(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "one.txt").write_text("kept text\n")
    (tmp_path / "keep" / "scratch.tmp.txt").write_text("a scratch file\n")
    (tmp_path / "plain.txt").write_text("a source given as a plain string\n")
    (tmp_path / "licensed").mkdir()
    (tmp_path / "licensed" / "book.txt").write_text("text we may not train on\n")
    (tmp_path / "recipe.json").write_text(json.dumps({"sources": [
        "plain.txt",
        {"path": "keep", "label": "kept", "exclude": ["*.tmp.txt"]},
        {"path": "licensed", "include": False, "reason": "license_unclear"},
        {"path": "not-there", "label": "gone"},
    ]}))
    _jsonl(tmp_path / "chat.jsonl", CHAT)
    (tmp_path / "pack.json").write_text(json.dumps({"corpus": {"recipe": "recipe.json"}, "chat": "chat.jsonl"}))
    corpus = load_corpus(load_pack(tmp_path / "pack.json"))
    assert sorted(corpus.documents) == ["a source given as a plain string\n", "kept text\n"]
    assert corpus.labels == ["plain", "kept"]
    reasons = {Path(x["path"]).name: x["reason"] for x in corpus.manifest["skipped"]}
    assert reasons == {"scratch.tmp.txt": "recipe_excluded", "book.txt": "license_unclear",
                       "not-there": "missing_source"}
    CliRunner().invoke(main, ["data", "import", str(tmp_path / "pack.json"), "--out-dir", str(tmp_path / "imp")])
    report = (tmp_path / "imp" / "corpus_report.md").read_text()
    assert "license_unclear" in report and "missing_source" in report


@pytest.mark.parametrize(("corpus", "message"), [
    ({"recipe": "r.json", "input": "x.txt"}, "needs exactly one of 'recipe', 'input' or 'path' (got recipe, input)"),
    ({}, "needs exactly one of 'recipe', 'input' or 'path'"),
    ({"input": ""}, "corpus.input' must be a non-empty path string"),
    (7, "must be a path string or an object"),
])
def test_bad_corpus_forms_name_the_field(tmp_path, corpus, message):
    (tmp_path / "x.txt").write_text("text\n")
    (tmp_path / "pack.json").write_text(json.dumps({"corpus": corpus}))
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pack(tmp_path / "pack.json")


def test_a_missing_document_reader_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pypdf(name, *args, **kwargs):
        if name == "pypdf":
            raise ImportError("no pypdf")
        return real_import(name, *args, **kwargs)

    _pdf(tmp_path / "doc.pdf", "hello")
    _jsonl(tmp_path / "chat.jsonl", CHAT)
    (tmp_path / "pack.json").write_text(json.dumps({"corpus": "doc.pdf", "chat": "chat.jsonl"}))
    monkeypatch.setattr(builtins, "__import__", no_pypdf)
    with pytest.raises(DataError, match=r"doc.pdf: reading .pdf needs pypdf: pip install 'picochat-jax\[documents\]'"):
        load_corpus(load_pack(tmp_path / "pack.json"))
