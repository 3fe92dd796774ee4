"""Build the proof-run corpus: human-written, freely licensed English documentation from Debian packages.

Every source is one Debian package at an exact version, fetched with `apt-get download`, checked against the
sha256 recorded in the sources file, and read straight from the .deb (no install). Each selected file becomes
one document: HTML pages lose markup and navigation, man pages lose roff requests, reStructuredText, POD,
Markdown and AsciiDoc sources are kept as written. The output is a dataset pack that `picochat run tiny`,
`data inspect` and `data tokenize` take as it is:

    OUT/dataset_pack.json          corpus recipe + the chat/eval/preference rows named by --rows-from
    OUT/corpus_recipe.json         one labelled source per package
    OUT/corpus/PACKAGE/part-NNNNN.jsonl   {"text", "source"} rows, in sorted path order
    OUT/chat.jsonl preferences.jsonl   copied from the --rows-from pack
    OUT/eval.jsonl                 chat eval rows (--eval; default examples/proof/eval.jsonl, no prompt in the SFT
                                   rows, so the gate judges skill rather than recall); --eval none keeps --rows-from's
    OUT/external_eval.jsonl        multiple-choice questions (--external-eval), scored by log-likelihood
    OUT/proof_corpus_manifest.json every package (version, .deb sha256, licences, copyright file sha256,
                                   files and documents kept and dropped) and every written file's sha256

The same sources file and .deb files give the same bytes (tested): files are read in sorted order, text
conversion is deterministic, and nothing depends on the clock or the machine. Debian replaces a package's
version on a point release; a version that is no longer served fails with the package, version and the
apt-get error, and `--record` writes a new sources file with the versions and checksums served now.

    apt-get update
    python tools/make_proof_corpus.py --out-dir proof_pack --cache .debcache
    python tools/make_proof_corpus.py --record --sources tools/proof_corpus_sources.json --cache .debcache

Validation holdout is by document: `data tokenize` / `run tiny` put whole documents in `val` (`val_fraction`).
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import html.parser
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from picochat_jax.fileio import sha256_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCES = REPO / "tools" / "proof_corpus_sources.json"
DEFAULT_ROWS_FROM = REPO / "examples" / "tiny_pack" / "dataset_pack.json"
DEFAULT_EXTERNAL_EVAL = REPO / "examples" / "proof" / "external_eval.jsonl"
DEFAULT_EVAL = REPO / "examples" / "proof" / "eval.jsonl"
ROWS_PER_PART = 2000
MIN_CHARS = 200


@dataclass(frozen=True)
class Source:
    package: str
    version: str
    sha256: str
    format: str            # html | roff | text
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    licence: str

    @staticmethod
    def from_json(obj: dict) -> Source:
        return Source(obj["package"], obj["version"], obj.get("sha256", ""), obj["format"],
                      tuple(obj["include"]), tuple(obj.get("exclude", ())), obj["licence"])


# ---------------------------------------------------------------- text conversion

_SKIP_TAGS = {"script", "style", "head", "nav", "footer", "header", "noscript", "svg", "button", "form"}
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_BLOCK_TAGS = {"p", "div", "section", "article", "li", "ul", "ol", "dl", "dt", "dd", "table", "tr", "pre",
               "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "br", "hr", "td", "th", "title", "caption"}
# Class or id names (whole, not parts) of navigation, sidebars and permalinks in Sphinx, DocBook, MediaWiki
# and Erlang's pages; the page's own <body> and <html> are never skipped, whatever their classes.
_SKIP_NAMES = frozenset({"sphinxsidebar", "sphinxsidebarwrapper", "related", "navheader", "navfooter",
                         "navigation", "navbar", "sidebar", "breadcrumb", "breadcrumbs", "headerlink",
                         "mw-navigation", "mw-head", "mw-panel", "footer", "leftnav", "printfooter", "catlinks",
                         "toc", "t-navbar"})


class _HtmlText(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            if self.skip_tag is None and tag in _BLOCK_TAGS:
                self.parts.append("\n")
            return
        if self.skip_tag is not None:
            self.skip_depth += tag == self.skip_tag
            return
        names = {word for k, v in attrs if k in ("class", "id", "role") and v for word in v.split()}
        if tag in _SKIP_TAGS or (tag not in ("body", "html") and not names.isdisjoint(_SKIP_NAMES)):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "table") else "\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self.skip_tag is None:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(page: str) -> str:
    """The readable text of an HTML page: no markup, scripts, styles or navigation; paragraphs kept apart."""
    parser = _HtmlText()
    parser.feed(page)
    parser.close()
    return tidy("".join(parser.parts))


_ROFF_ESCAPES = {r"\-": "-", r"\(aq": "'", r"\(dq": '"', r"\(em": "--", r"\(en": "-", r"\(bu": "*",
                 r"\(co": "(c)", r"\(rq": '"', r"\(lq": '"', r"\e": "\\", r"\ ": " ", r"\&": "", r"\|": "",
                 r"\^": "", r"\0": " ", r"\c": ""}
_ROFF_TEXT_MACROS = {".SH", ".SS", ".B", ".I", ".BI", ".BR", ".IB", ".IR", ".RB", ".RI", ".SM", ".SB", ".TH",
                     ".IP", ".UR", ".MT"}


def roff_to_text(page: str) -> str:
    """A man page's text: requests dropped, the words of font and heading macros kept, escapes resolved."""
    lines = []
    for line in page.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\}', "'")):
            continue
        if line.startswith("."):
            macro, _, rest = line.partition(" ")
            if macro not in _ROFF_TEXT_MACROS:
                if macro in (".PP", ".P", ".LP", ".sp", ".TP", ".RS", ".RE"):
                    lines.append("")
                continue
            line = " ".join(tok.strip('"') for tok in re.findall(r'"[^"]*"|\S+', rest))
            if macro in (".SH", ".SS"):
                lines.extend(["", line, ""])
                continue
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)
    text = re.sub(r"\\s[+-]?\d", "", text)
    for escape, repl in _ROFF_ESCAPES.items():
        text = text.replace(escape, repl)
    text = re.sub(r"\\\(..|\\\[[^\]]*\]|\\\*\(..|\\\*.", "", text)
    return tidy(text)


def tidy(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no surrounding blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


CONVERTERS = {"html": html_to_text, "roff": roff_to_text, "text": tidy}


# ---------------------------------------------------------------- packages

def deb_name(source: Source) -> str:
    """The file name apt-get download gives a package (the epoch's colon written %3a)."""
    return f"{source.package}_{source.version.replace(':', '%3a')}_all.deb"


def fetch(source: Source, cache: Path) -> Path:
    """The package's .deb in `cache`, downloaded when missing; its sha256 must be the recorded one."""
    path = cache / deb_name(source)
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["apt-get", "download", f"{source.package}={source.version}"], cwd=cache,
                              capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            raise SystemExit(f"cannot download {source.package}={source.version}: {done.stderr.strip()}\n"
                             f"(run 'apt-get update' first; if the version is no longer served, "
                             f"--record writes the versions served now)")
    if source.sha256 and sha256_file(path) != source.sha256:
        raise SystemExit(f"{path}: sha256 {sha256_file(path)} is not the recorded {source.sha256}")
    return path


def deb_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every regular file in a .deb's data archive, in sorted path order, .gz unpacked."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for member in members:
            name = member.name.removeprefix("./")
            blob = tar.extractfile(member).read()
            if name.endswith(".gz"):
                name, blob = name[:-3], gzip.decompress(blob)
            yield name, blob


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def licence_names(copyright_text: str) -> list[str]:
    """The distinct `License:` names of a machine-readable Debian copyright file, in first-seen order."""
    names: list[str] = []
    for match in re.finditer(r"^License:[ \t]*(\S.*)$", copyright_text, re.M):
        name = match.group(1).strip()
        if name not in names and len(name) < 60:
            names.append(name)
    return names


def package_documents(source: Source, deb: Path) -> tuple[list[tuple[str, str]], dict]:
    """The package's documents as (file path, text) and what was kept, dropped and why."""
    convert = CONVERTERS[source.format]
    docs: list[tuple[str, str]] = []
    record = {"files_matched": 0, "dropped_short": 0, "dropped_undecodable": 0, "copyright_sha256": None,
              "licences_in_copyright": []}
    for name, blob in deb_members(deb):
        if name == f"usr/share/doc/{source.package}/copyright":
            record["copyright_sha256"] = hashlib.sha256(blob).hexdigest()
            record["licences_in_copyright"] = licence_names(blob.decode("utf-8", "replace"))
        if not _matches(name, source.include) or _matches(name, source.exclude):
            continue
        record["files_matched"] += 1
        try:
            raw = blob.decode("utf-8")
        except UnicodeDecodeError:
            if source.format != "roff":
                record["dropped_undecodable"] += 1
                continue
            raw = blob.decode("latin-1")  # older man pages; latin-1 decodes any bytes
        text = convert(raw)
        if len(text) < MIN_CHARS:
            record["dropped_short"] += 1
            continue
        docs.append((name, text))
    return docs, record


# ---------------------------------------------------------------- the pack

def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _json_line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n"


def _shown(path: Path) -> str:
    """A path as the manifest records it: relative to the repository when inside it, so builds match anywhere."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def build(sources: list[Source], cache: Path, out_dir: Path, rows_from: Path | None,
          external_eval: Path | None = None, eval_rows: Path | None = None) -> dict:
    """Write the pack into `out_dir` (new or empty) and return its manifest. `eval_rows` replaces the eval file
    of `rows_from`."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"{out_dir} is not empty: give a new or empty folder")
    for given in (rows_from, external_eval, eval_rows):
        if given is not None and not given.is_file():
            raise SystemExit(f"{given}: no such file")
    if eval_rows is not None:
        from picochat_jax.data.records import read_eval_jsonl

        read_eval_jsonl(eval_rows)  # a bad row names its file, line and field before anything is written
    debs = [fetch(s, cache) for s in sources]  # every download and checksum before the first byte is written
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: dict[str, str] = {}
    manifest: dict = {"format": "picochat proof corpus v1", "min_chars": MIN_CHARS, "rows_per_part": ROWS_PER_PART,
                      "sources": [], "files": []}
    recipe_sources = []
    for source, deb in zip(sources, debs, strict=True):
        docs, record = package_documents(source, deb)
        kept, duplicates, chars, text_bytes = [], 0, 0, 0
        for name, text in docs:
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                duplicates += 1
                continue
            seen[digest] = name
            kept.append((name, text))
            chars += len(text)
            text_bytes += len(text.encode())
        folder = out_dir / "corpus" / source.package
        folder.mkdir(parents=True)
        for part, start in enumerate(range(0, len(kept), ROWS_PER_PART)):
            rows = "".join(_json_line({"text": t, "source": f"{source.package}:{n}"})
                           for n, t in kept[start:start + ROWS_PER_PART])
            path = folder / f"part-{part:05d}.jsonl"
            write_atomic(path, rows.encode())
        recipe_sources.append({"path": f"corpus/{source.package}", "label": source.package})
        manifest["sources"].append({
            "package": source.package, "version": source.version, "deb": deb.name,
            "deb_sha256": source.sha256 or sha256_file(deb),  # fetch checked a recorded one
            "format": source.format, "include": list(source.include), "exclude": list(source.exclude),
            "licence": source.licence, **record, "documents": len(kept), "dropped_duplicate": duplicates,
            "chars": chars, "text_bytes": text_bytes})
        print(f"{source.package} {source.version}: {len(kept)} documents, {text_bytes / 1e6:.1f} MB "
              f"({record['dropped_short']} short, {duplicates} duplicate)", flush=True)
    pack = {"name": "proof-corpus",
            "description": "Debian documentation packages (human-written, freely licensed English) for the "
                           "proof runs; see proof_corpus_manifest.json for every source and licence.",
            "corpus": {"recipe": "corpus_recipe.json"}}
    row_files: dict[str, Path] = {}  # pack key -> the file it copies, in the pack's order
    if rows_from is not None:
        rows_pack = json.loads(rows_from.read_text())
        row_files = {key: (rows_from.parent / rows_pack[key]).resolve()
                     for key in ("chat", "eval", "preferences") if key in rows_pack}
    if eval_rows is not None:
        row_files["eval"] = eval_rows.resolve()
    if external_eval is not None:
        row_files["external_eval"] = external_eval.resolve()
    for key, src in row_files.items():
        shutil.copyfile(src, out_dir / f"{key}.jsonl")
        pack[key] = f"{key}.jsonl"
        manifest.setdefault("rows", {})[key] = {"from": _shown(src), "sha256": sha256_file(out_dir / f"{key}.jsonl")}
    write_atomic(out_dir / "corpus_recipe.json",
                 json.dumps({"name": "proof-corpus", "sources": recipe_sources}, indent=2).encode() + b"\n")
    write_atomic(out_dir / "dataset_pack.json", json.dumps(pack, indent=2).encode() + b"\n")
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        manifest["files"].append({"path": str(path.relative_to(out_dir)), "bytes": path.stat().st_size,
                                  "sha256": sha256_file(path)})
    manifest["totals"] = {k: sum(s[k] for s in manifest["sources"])
                          for k in ("documents", "text_bytes", "chars", "dropped_short", "dropped_duplicate")}
    write_atomic(out_dir / "proof_corpus_manifest.json", json.dumps(manifest, indent=2).encode() + b"\n")
    return manifest


def load_sources(path: Path) -> list[Source]:
    return [Source.from_json(obj) for obj in json.loads(path.read_text())["sources"]]


def record(sources_path: Path, cache: Path) -> None:
    """Rewrite the sources file with the versions served now and their .deb checksums."""
    obj = json.loads(sources_path.read_text())
    for entry in obj["sources"]:
        shown = subprocess.run(["apt-cache", "show", "--no-all-versions", entry["package"]], capture_output=True,
                               text=True, check=True).stdout
        entry["version"] = re.search(r"^Version: (\S+)", shown, re.M).group(1)
        entry["sha256"] = ""  # fetch checks a recorded checksum; the one served now is what gets recorded
        entry["sha256"] = sha256_file(fetch(Source.from_json(entry), cache))
    write_atomic(sources_path, json.dumps(obj, indent=2).encode() + b"\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path)
    parser.add_argument("--sources", type=Path, default=DEFAULT_SOURCES)
    parser.add_argument("--cache", type=Path, default=REPO / ".debcache", help="where .deb files are kept")
    parser.add_argument("--rows-from", type=Path, default=DEFAULT_ROWS_FROM,
                        help="pack whose chat/eval/preference rows the proof pack copies")
    parser.add_argument("--external-eval", type=Path, default=DEFAULT_EXTERNAL_EVAL,
                        help="multiple-choice questions the pack names as external_eval")
    parser.add_argument("--eval", type=lambda v: None if v == "none" else Path(v), default=DEFAULT_EVAL,
                        help="chat eval rows for the pack (none = the --rows-from pack's eval rows)")
    parser.add_argument("--record", action="store_true", help="pin the versions served now in --sources")
    args = parser.parse_args(argv)
    if args.record:
        record(args.sources, args.cache)
        return
    if args.out_dir is None:
        parser.error("--out-dir is required")
    manifest = build(load_sources(args.sources), args.cache, args.out_dir, args.rows_from, args.external_eval,
                     args.eval)
    totals = manifest["totals"]
    print(f"{args.out_dir}: {totals['documents']} documents, {totals['text_bytes'] / 1e6:.1f} MB of text from "
          f"{len(manifest['sources'])} packages", file=sys.stderr)


if __name__ == "__main__":
    main()
