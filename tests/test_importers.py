"""`data hf-import` and `data climbmix-import` on local datasets made on the fly (never the hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.data.importers import climbmix_files
from picochat_jax.data.pack import iter_documents, load_pack

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")


def _texts(n: int, start: int = 0) -> list[str]:
    return [f"Document {i}: the river carries water to the sea, and the sea returns it as rain." * (1 + i % 3)
            for i in range(start, start + n)]


def _parquet(path: Path, texts: list[str], column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)
    return path


def _invoke(*args: str) -> object:
    return CliRunner().invoke(main, [*args, "--no-progress"])


def test_hf_import_local_parquet_folder_writes_a_pack_with_manifest(tmp_path: Path) -> None:
    src = tmp_path / "ds"
    _parquet(src / "a.parquet", _texts(7) + ["short"])
    _parquet(src / "b.parquet", _texts(5, start=7))
    res = _invoke("data", "hf-import", "--dataset", str(src), "--text-column", "text", "--document-shard-rows", "4",
                  "--pack-out", str(tmp_path / "pack"))
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "pack" / "import_manifest.json").read_text())
    assert manifest["rows"] == {"read": 13, "written": 12, "skipped_short": 1, "skipped_not_text": 0}
    assert [f["rows"] for f in manifest["files"]] == [4, 4, 4]
    assert all(len(f["sha256"]) == 64 for f in manifest["files"] + manifest["sources"])
    pack = load_pack(tmp_path / "pack" / "dataset_pack.json")
    docs = [d for d, _ in iter_documents(pack)]
    assert docs == _texts(12)  # every kept row, in order, as one document each
    assert "no chat rows" in res.output


def test_hf_import_jsonl_max_rows_and_bad_column(tmp_path: Path) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in _texts(10)))
    res = _invoke("data", "hf-import", "--dataset", str(src), "--text-column", "text", "--pack-out",
                  str(tmp_path / "p1"))
    assert res.exit_code == 2 and "no column 'text'" in res.output and "body" in res.output
    assert not (tmp_path / "p1").exists()  # refused before anything was written
    res = _invoke("data", "hf-import", "--dataset", str(src), "--text-column", "body", "--max-rows", "6",
                  "--pack-out", str(tmp_path / "p2"))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p2" / "import_manifest.json").read_text())["rows"]["written"] == 6


def test_hf_import_save_to_disk_folder(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": _texts(4)}),
                          "test": datasets.Dataset.from_dict({"text": _texts(2, 50)})}).save_to_disk(tmp_path / "sd")
    res = _invoke("data", "hf-import", "--dataset", str(tmp_path / "sd"), "--split", "test", "--pack-out",
                  str(tmp_path / "pack"))
    assert res.exit_code == 0, res.output
    assert [d for d, _ in iter_documents(load_pack(tmp_path / "pack" / "dataset_pack.json"))] == _texts(2, 50)


def test_climbmix_shard_specs() -> None:
    files, on_hub = climbmix_files("2")
    assert on_hub and files == [f"hf://datasets/karpathy/climbmix-400b-shuffle/shard_0000{i}.parquet" for i in (0, 1)]
    assert [f[-13:-8] for f in climbmix_files("0-2,9")[0]] == ["00000", "00001", "00002", "00009"]
    with pytest.raises(ValueError, match="shard ids"):
        climbmix_files("7000")


@pytest.mark.slow
def test_climbmix_import_then_run_tiny_takes_the_pack(tmp_path: Path, example_pack: Path) -> None:
    shards = tmp_path / "climbmix"
    _parquet(shards / "shard_00000.parquet", _texts(40))
    _parquet(shards / "shard_00001.parquet", _texts(40, start=40))
    res = _invoke("data", "climbmix-import", "--shards", str(shards / "shard_*.parquet"), "--pack-out",
                  str(tmp_path / "pack"), "--chat", str(example_pack.parent / "chat.jsonl"), "--eval",
                  str(example_pack.parent / "eval.jsonl"))
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "pack" / "import_manifest.json").read_text())
    assert manifest["rows"]["written"] == 80 and len(manifest["sources"]) == 2
    res = _invoke("run", "tiny", "--dataset-pack", str(tmp_path / "pack" / "dataset_pack.json"), "--out-dir",
                  str(tmp_path / "run"), "--scale", "smoke", "--base-steps", "4", "--sft-steps", "4")
    assert res.exit_code in (0, 1), res.output  # 1 = the gate blocked this 4-step model, as it should
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["base"]["steps"] == 4 and (tmp_path / "run" / "release" / "gate.json").exists()
