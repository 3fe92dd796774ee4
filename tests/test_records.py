"""Every malformed input names its file, line and field; good rows parse in every accepted shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.data.pack import load_pack, validate_pack
from picochat_jax.data.records import DataError, read_chat_jsonl, read_eval_jsonl, read_preference_jsonl


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_accepted_chat_shapes(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [
        {"user": "q", "assistant": "a", "category": "c", "group": "g"},
        "",
        {"system": "sys", "tools": [{"name": "get_weather"}],
         "messages": [{"role": "User", "content": "q"}, {"role": "ASSISTANT", "content": "call"},
                      {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "done"}]},
    ])
    rows = read_chat_jsonl(path)
    assert len(rows) == 2  # blank line skipped
    assert rows[0].messages[-1].content == "a" and rows[0].category == "c"
    first = rows[1].messages[0]
    assert first.role == "system" and "sys" in first.content and "get_weather" in first.content
    assert [m.role for m in rows[1].messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert rows[1].line == 3


@pytest.mark.parametrize("row, line_field", [
    ('{"user": "q", "assistant": ', (1, None)),
    ({"user": "q"}, (1, "assistant")),
    ({"user": "", "assistant": "a"}, (1, "user")),
    ({"user": 3, "assistant": "a"}, (1, "user")),
    ({"messages": [{"role": "user", "content": "q"}]}, (1, "messages")),
    ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
     (1, "messages[0].role")),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, (1, "messages[1].content")),
    ({"tools": "nope", "user": "q", "assistant": "a"}, (1, "tools")),
])
def test_bad_chat_rows_name_file_line_and_field(tmp_path, row, line_field):
    path = _write(tmp_path / "chat.jsonl", [row])
    with pytest.raises(DataError) as info:
        read_chat_jsonl(path)
    err = info.value
    assert (err.line, err.field) == line_field
    assert err.path == str(path) and str(path) in str(err)
    if line_field[1]:
        assert f"'{line_field[1]}'" in str(err)


def test_bad_row_later_in_file_reports_its_line(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [{"user": "q", "assistant": "a"}, "", {"user": "q2"}])
    with pytest.raises(DataError, match=r"chat.jsonl:3: field 'assistant' is missing"):
        read_chat_jsonl(path)


def test_eval_rows_and_errors(tmp_path):
    good = _write(tmp_path / "eval.jsonl", [
        {"user": "What is Picochat?", "category": "project", "answerable": True,
         "must_include": ["Picochat"], "must_not_include": ["I do not know"]},
        {"user": "q", "must_include_any": [["a", "b"]]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ref"}]},
    ])
    rows = read_eval_jsonl(good)
    assert rows[0].must_include == ("Picochat",) and rows[1].must_include_any == (("a", "b"),)
    assert rows[2].reference == "ref" and rows[2].prompt[-1].role == "user"
    bad = _write(tmp_path / "bad_eval.jsonl", [{"user": "q", "must_include_any": ["a"]}])
    with pytest.raises(DataError, match="bad_eval.jsonl:1: field 'must_include_any'"):
        read_eval_jsonl(bad)
    bad2 = _write(tmp_path / "bad_eval2.jsonl", [{"user": "q", "answerable": "yes"}])
    with pytest.raises(DataError, match="field 'answerable'"):
        read_eval_jsonl(bad2)


def test_preferences(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                         {"user": "u", "chosen": "c", "rejected": "r"}])
    assert [r.prompt[-1].content for r in read_preference_jsonl(path)] == ["p", "u"]
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError, match="bad.jsonl:1: field 'rejected' is missing"):
        read_preference_jsonl(bad)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_chat_jsonl(tmp_path / "nope.jsonl")
    pack = tmp_path / "pack.json"
    pack.write_text(json.dumps({"name": "p", "corpus": "corpus.txt", "chat": "chat.jsonl"}))
    with pytest.raises(DataError, match="corpus.path"):
        load_pack(pack)


def test_validate_cli_prints_summary_or_errors(tmp_path, example_pack):
    runner = CliRunner()
    ok = runner.invoke(main, ["data", "validate", str(example_pack)])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output and "chat: rows=" in ok.output
    (tmp_path / "corpus.txt").write_text("Some prose.\n")
    _write(tmp_path / "chat.jsonl", [{"user": "q", "assistant": "a"}, {"user": "q"}])
    pack = tmp_path / "pack.json"
    pack.write_text(json.dumps({"name": "p", "corpus": "corpus.txt", "chat": "chat.jsonl", "future_key": 1}))
    bad = runner.invoke(main, ["data", "validate", str(pack)])
    assert bad.exit_code == 1
    assert "chat.jsonl:2: field 'assistant' is missing" in bad.output
    summary, errors = validate_pack(pack)
    assert summary["unknown_keys"] == ["future_key"] and len(errors) == 1


def test_pack_resolves_external_eval_and_names_a_missing_one(tmp_path):
    (tmp_path / "corpus.txt").write_text("Some prose.\n")
    _write(tmp_path / "bench.jsonl", [{"user": "q", "must_include": ["a"]}])
    pack = tmp_path / "pack.json"
    pack.write_text(json.dumps({"name": "p", "corpus": "corpus.txt", "external_eval": "bench.jsonl"}))
    assert load_pack(pack).external_eval == tmp_path / "bench.jsonl"
    pack.write_text(json.dumps({"name": "p", "corpus": "corpus.txt", "external_eval": "gone.jsonl"}))
    with pytest.raises(DataError, match="field 'external_eval' points to a missing file"):
        load_pack(pack)


def test_category_sampling_balances_or_sqrt_weights_every_epoch():
    from picochat_jax.data.loader import category_repeats, resample_by_category

    cats = ["big"] * 16 + ["mid"] * 4 + ["small"] * 1
    assert category_repeats(cats, "uniform").tolist() == [1] * 21
    balanced = category_repeats(cats, "balanced")
    per_cat = {c: int(balanced[[i for i, x in enumerate(cats) if x == c]].sum()) for c in set(cats)}
    assert per_cat == {"big": 16, "mid": 16, "small": 16}  # equal shares; the biggest keeps one copy per row
    root = category_repeats(cats, "sqrt")
    per_cat = {c: int(root[[i for i, x in enumerate(cats) if x == c]].sum()) for c in set(cats)}
    assert per_cat == {"big": 16, "mid": 8, "small": 4}  # shares 4 : 2 : 1 = sqrt(16) : sqrt(4) : sqrt(1)
    examples = {"inputs": np.arange(21)[:, None]}
    out = resample_by_category(examples, cats, "balanced")
    assert len(out["inputs"]) == 48 and set(out["inputs"][:, 0].tolist()) == set(range(21))  # no row dropped
    with pytest.raises(ValueError, match="uniform|balanced|sqrt"):
        category_repeats(cats, "weighted")
