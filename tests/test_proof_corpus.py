"""tools/make_proof_corpus.py: the text conversions, and a whole build from a .deb made here with dpkg-deb
(no download): same bytes twice, the pack loads, a wrong checksum and a used out-dir are refused."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Files: *
Copyright: 2026 Someone
License: GPL-2+

Files: docs/*
License: CC-BY-SA-3.0
"""

PAGE = """<html><head><title>T</title><style>p {color: red}</style><script>var x = 1;</script></head>
<body class="mediawiki toc-free">
<div class="sphinxsidebar"><ul><li>Navigation link</li></ul></div>
<nav>Top menu</nav>
<div class="body"><h1>Lifetimes<a class="headerlink" href="#x">&para;</a></h1>
<p>Every   object has a
lifetime &amp; a storage duration.</p><pre>int a = 1;
  int b = 2;</pre><p>Second paragraph.</p></div>
<div class="footer">Copyright footer</div></body></html>"""

MAN = """.\\" a comment
.TH LS 1 2026 "GNU" "User Commands"
.SH NAME
ls \\- list directory contents
.SH DESCRIPTION
.B ls
lists \\fIfiles\\fR in the \\(aqcurrent\\(aq directory.
.PP
Second paragraph.
"""


def test_html_to_text_keeps_prose_and_drops_navigation(load_tool):
    tool = load_tool("make_proof_corpus")
    text = tool.html_to_text(PAGE)
    assert text == ("Lifetimes\n\nEvery object has a lifetime & a storage duration.\n\nint a = 1;\n  int b = 2;"
                    "\n\nSecond paragraph.")


def test_roff_to_text_resolves_macros_and_escapes(load_tool):
    tool = load_tool("make_proof_corpus")
    assert tool.roff_to_text(MAN) == ("LS 1 2026 GNU User Commands\n\nNAME\n\nls - list directory contents\n\n"
                                      "DESCRIPTION\n\nls\nlists files in the 'current' directory.\n\n"
                                      "Second paragraph.")


def _make_deb(root: Path, package: str, version: str) -> Path:
    tree = root / "tree"
    doc = tree / "usr" / "share" / "doc" / package
    (doc / "html" / "sub").mkdir(parents=True)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\nMaintainer: T <t@example.org>\n"
        "Description: test documentation\n")
    (doc / "copyright").write_text(COPYRIGHT)
    (doc / "html" / "index.html").write_text(PAGE.replace("Second paragraph.", "Second paragraph. " * 20))
    (doc / "html" / "sub" / "b.html").write_text(PAGE.replace("Lifetimes", "Storage") + "<p>" + "word " * 60)
    (doc / "html" / "short.html").write_text("<p>too short</p>")
    (doc / "html" / "copy.html").write_text(PAGE.replace("Second paragraph.", "Second paragraph. " * 20))
    (doc / "notes.rst.gz").write_bytes(gzip.compress(("Notes\n=====\n\n" + "A sentence of notes. " * 30).encode(),
                                                     mtime=0))
    deb = root / f"{package}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True, capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian's dpkg)")
def test_build_is_byte_identical_and_loads_as_a_pack(load_tool, tmp_path, example_pack):
    tool = load_tool("make_proof_corpus")
    cache = tmp_path / "cache"
    cache.mkdir()
    deb = _make_deb(tmp_path, "fake-doc", "1.0-1")
    shutil.move(deb, cache / deb.name)
    sha = hashlib.sha256((cache / deb.name).read_bytes()).hexdigest()
    sources = [tool.Source("fake-doc", "1.0-1", sha, "html", ("usr/share/doc/fake-doc/html/*.html",), (), "GPL-2+"),
               tool.Source("fake-doc", "1.0-1", sha, "text", ("usr/share/doc/fake-doc/*.rst",), (), "GPL-2+")]
    external = example_pack.parents[1] / "proof" / "external_eval.jsonl"
    manifest = tool.build(sources[:1], cache, tmp_path / "a", example_pack, external)
    tool.build(sources[:1], cache, tmp_path / "b", example_pack, external)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel

    (src,) = manifest["sources"]
    assert (src["files_matched"], src["documents"], src["dropped_short"], src["dropped_duplicate"]) == (4, 2, 1, 1)
    assert src["licences_in_copyright"] == ["GPL-2+", "CC-BY-SA-3.0"] and src["deb_sha256"] == sha
    rows = [json.loads(line) for line in (tmp_path / "a/corpus/fake-doc/part-00000.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["fake-doc:usr/share/doc/fake-doc/html/copy.html",
                                           "fake-doc:usr/share/doc/fake-doc/html/sub/b.html"]
    assert "Navigation link" not in rows[0]["text"] and "Every object has a lifetime" in rows[0]["text"]
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    assert listed["chat.jsonl"] == hashlib.sha256((tmp_path / "a/chat.jsonl").read_bytes()).hexdigest()

    from picochat_jax.data.pack import load_corpus, load_pack, validate_pack
    summary, errors = validate_pack(tmp_path / "a" / "dataset_pack.json")
    assert errors == []
    corpus = load_corpus(load_pack(tmp_path / "a" / "dataset_pack.json"))
    assert len(corpus.documents) == 2
    from picochat_jax.eval.external import read_choice_questions
    assert len(read_choice_questions(tmp_path / "a" / "external_eval.jsonl")) == 40
    # The pack's chat eval is the held-out one by default: none of its prompts is an SFT prompt.
    from picochat_jax.data.records import read_chat_jsonl, read_eval_jsonl
    from picochat_jax.eval.ngram import scan_contamination

    held_out = example_pack.parents[1] / "proof" / "eval.jsonl"
    with_eval = tool.build(sources[:1], cache, tmp_path / "e", example_pack, external, held_out)
    assert (tmp_path / "e" / "eval.jsonl").read_bytes() == held_out.read_bytes()
    assert with_eval["rows"]["eval"]["from"] == "examples/proof/eval.jsonl"
    scan = scan_contamination(read_eval_jsonl(tmp_path / "e" / "eval.jsonl"),
                              read_chat_jsonl(tmp_path / "e" / "chat.jsonl"), [])
    assert scan["counts"]["eval_rows"] == 20 and scan["counts"]["eval_rows_in_sft"] == 0
    bad = tmp_path / "bad_eval.jsonl"
    bad.write_text('{"user": "fine?", "must_include": []}\n{"must_include": []}\n')
    with pytest.raises(ValueError, match=r"bad_eval\.jsonl:2: field .user. is missing"):
        tool.build(sources[:1], cache, tmp_path / "f", example_pack, external, bad)
    assert not (tmp_path / "f").exists()

    text = tool.build(sources[1:], cache, tmp_path / "c", None)["sources"][0]
    assert text["documents"] == 1 and text["text_bytes"] > 600  # the .gz source, unpacked

    with pytest.raises(SystemExit, match="is not empty"):
        tool.build(sources[:1], cache, tmp_path / "a", None)
    wrong = tool.Source("fake-doc", "1.0-1", "0" * 64, "html", ("*.html",), (), "GPL-2+")
    with pytest.raises(SystemExit, match="is not the recorded"):
        tool.build([wrong], cache, tmp_path / "d", None)
    assert not (tmp_path / "d").exists()  # checked before the first byte
