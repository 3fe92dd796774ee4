"""Bring real corpora in as dataset packs: any Hugging Face dataset (`data hf-import`) and ClimbMix-style
parquet shards (`data climbmix-import`).

Both stream rows through the `datasets` library (hub ids where the network allows; local parquet, JSON/JSONL,
CSV and Arrow files or `save_to_disk` folders always), keep rows whose text column holds at least `min_chars`
characters, and write them as JSONL document files of `document_shard_rows` rows under `PACK/corpus/`, each
written to a temp name and renamed. `dataset_pack.json` names the corpus (and chat/eval/preference files
copied in with the import), so `run tiny` takes the pack unchanged; `import_manifest.json` records the
sources (with sha256 of local files), rows read, written and skipped, bytes, and every file's checksum.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from picochat_jax.fileio import save_json, sha256_file

CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"  # nanochat's shuffled repack of nvidia/Nemotron-ClimbMix
CLIMBMIX_SHARDS = 6543  # shard_00000 ... shard_06542
LOCAL_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ValueError("importing datasets needs the `datasets` library: pip install 'picochat-jax[hub]'") from None
    return datasets


def local_data_files(path: Path) -> list[Path]:
    """The data files of a local dataset: the file itself, or every supported file under the folder."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in LOCAL_BUILDERS)
    if not files:
        raise ValueError(f"{path}: no dataset files ({', '.join(sorted(LOCAL_BUILDERS))}) found")
    kinds = {LOCAL_BUILDERS[f.suffix.lower()] for f in files if f.suffix.lower() in LOCAL_BUILDERS}
    if len(kinds) != 1:
        raise ValueError(f"{path}: mixes file types ({', '.join(sorted(kinds))}); import one type at a time")
    return files


def open_dataset(dataset: str, config: str | None, split: str, streaming: bool = True) -> tuple[Any, list[dict]]:
    """(an iterable of rows, the sources to record) for a hub id, a local file/folder or a saved dataset."""
    datasets = _datasets()
    path = Path(dataset)
    if path.exists():
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{path}: no split {split!r} (has {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded, [{"dataset": str(path), "kind": "save_to_disk", "split": split}]
        files = local_data_files(path)
        builder = LOCAL_BUILDERS[files[0].suffix.lower()]
        rows = datasets.load_dataset(builder, data_files={split: [str(f) for f in files]}, split=split,
                                     streaming=streaming)
        return rows, [{"file": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files]
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset) is None:
        raise FileNotFoundError(f"dataset not found: {dataset} is neither a local path nor a hub id")
    try:
        rows = datasets.load_dataset(dataset, config, split=split, streaming=streaming)
    except Exception as exc:  # the hub client raises many types; the user needs the cause in one line
        raise ValueError(f"could not open {dataset!r} (config {config!r}, split {split!r}): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    return rows, [{"dataset": dataset, "config": config, "split": split}]


def climbmix_files(shards: str) -> tuple[list[str], bool]:
    """Parquet files for `--shards`: a local glob (or one path), or shard ids of the ClimbMix repack on the hub
    ("4" = the first four, "0-3,7" = ids). Returns (files, on_hub)."""
    spec = shards.strip()
    if re.fullmatch(r"\d+", spec):
        ids = list(range(int(spec)))
    elif re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", spec):
        ids = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            ids += list(range(int(lo), int(hi or lo) + 1))
    else:
        files = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
        if not files:
            raise FileNotFoundError(f"--shards {shards}: no files match")
        bad = [f for f in files if not f.endswith(".parquet")]
        if bad:
            raise ValueError(f"--shards {shards}: {bad[0]} is not a .parquet file")
        return files, False
    if not ids or max(ids) >= CLIMBMIX_SHARDS:
        raise ValueError(f"--shards {shards}: ClimbMix has shard ids 0-{CLIMBMIX_SHARDS - 1}")
    return [f"hf://datasets/{CLIMBMIX_REPO}/shard_{i:05d}.parquet" for i in ids], True


def open_climbmix(shards: str, streaming: bool = True) -> tuple[Any, list[dict]]:
    files, on_hub = climbmix_files(shards)
    rows = _datasets().load_dataset("parquet", data_files={"train": files}, split="train", streaming=streaming)
    sources = ([{"file": f} for f in files] if on_hub else
               [{"file": f, "bytes": Path(f).stat().st_size, "sha256": sha256_file(Path(f))} for f in files])
    return rows, sources


def checked_rows(rows: Iterable[dict], column: str, where: str) -> Iterator[dict]:
    """The rows, after checking (on the first one, before anything is written) that the text column exists."""
    it = iter(rows)
    first = next(it, None)
    if first is None:
        raise ValueError(f"{where}: the split has no rows")
    if column not in first:
        raise ValueError(f"{where}: no column {column!r} (columns: {', '.join(sorted(first))}); pick one with "
                         "--text-column")
    return itertools.chain([first], it)


def _texts(rows: Iterable[dict], column: str, counts: dict[str, int]) -> Iterator[str]:
    for row in rows:
        counts["read"] += 1
        if column not in row:
            raise ValueError(f"row {counts['read']} has no column {column!r} (columns: {', '.join(sorted(row))}); "
                             "pick one with --text-column")
        text = row[column]
        if not isinstance(text, str):
            counts["skipped_not_text"] += 1
            continue
        yield text


def write_import_pack(rows: Iterable[dict], pack_out: Path, *, name: str, description: str,
                      sources: list[dict], text_column: str = "text", max_rows: int | None = None,
                      min_chars: int = 20, document_shard_rows: int = 1000, chat: Path | None = None,
                      eval_file: Path | None = None, preferences: Path | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Stream rows into PACK/corpus/*.jsonl plus dataset_pack.json and import_manifest.json. `pack_out` must
    already be claimed (outdir policy)."""
    corpus = pack_out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    counts = {"read": 0, "written": 0, "skipped_short": 0, "skipped_not_text": 0}
    files: list[dict[str, Any]] = []
    buffer: list[str] = []
    total_bytes = 0

    def flush() -> None:
        if not buffer:
            return
        name_ = f"part-{len(files):05d}.jsonl"
        tmp = corpus / f".{name_}.tmp"
        with tmp.open("w", encoding="utf-8") as fh:
            fh.writelines(buffer)
        os.replace(tmp, corpus / name_)
        files.append({"file": f"corpus/{name_}", "rows": len(buffer), "bytes": (corpus / name_).stat().st_size,
                      "sha256": sha256_file(corpus / name_)})
        buffer.clear()

    bar = tqdm(total=max_rows, unit="row", desc="import", disable=not progress, dynamic_ncols=True)
    for text in _texts(rows, text_column, counts):
        bar.update(1)
        if len(text.strip()) < min_chars:
            counts["skipped_short"] += 1
        else:
            buffer.append(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            counts["written"] += 1
            total_bytes += len(text.encode("utf-8"))
            if len(buffer) >= document_shard_rows:
                flush()
        if max_rows is not None and counts["read"] >= max_rows:
            break
    flush()
    bar.close()
    if counts["written"] == 0:
        raise ValueError(f"no rows were written: {counts['read']} read, {counts['skipped_short']} shorter than "
                         f"{min_chars} characters, {counts['skipped_not_text']} not text")
    pack: dict[str, Any] = {"name": name, "description": description, "corpus": {"input": "corpus"}}
    for key, src in (("chat", chat), ("eval", eval_file), ("preferences", preferences)):
        if src is not None:
            shutil.copyfile(src, pack_out / f"{key}.jsonl")
            pack[key] = f"{key}.jsonl"
    save_json(pack_out / "dataset_pack.json", pack)
    manifest = {"name": name, "sources": sources, "text_column": text_column, "min_chars": min_chars,
                "max_rows": max_rows, "document_shard_rows": document_shard_rows, "rows": counts,
                "text_bytes": total_bytes, "files": files,
                "copied": {k: str(v) for k, v in (("chat", chat), ("eval", eval_file), ("preferences", preferences))
                           if v is not None}}
    save_json(pack_out / "import_manifest.json", manifest)
    return manifest
