"""Hostile inputs to the CLI: folders a user owns, wrong tokenizers, broken files, bad resumes.

Each case is one row of a table: a setup that builds the situation in a tmp dir, the command a user would
type, and what must happen — exit code, a message fragment, and the files that must survive unchanged. The
server's hostile cases (oversized bodies, loose types, forged turns) live in tests/test_serve.py, next to the
server fixture. docs/reliability.md lists the same cases with what each now gets.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import pytest
from click.testing import CliRunner

from picochat_jax.checkpoint import save_model_checkpoint
from picochat_jax.cli import main
from picochat_jax.config import ModelConfig
from picochat_jax.model.transformer import init_params, make_model
from picochat_jax.outdir import MARKER, OutDirError, check_out_dir, claim_out_dir, delete_owned, write_marker
from picochat_jax.tokenizer import train_tokenizer
from picochat_jax.train.loop import read_history

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello there, how are you today?"] * 20
CFG = dict(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=64, norm="rmsnorm",
           position="rope", activation="swiglu")


def _checkpoint(folder: Path, vocab: int = 300) -> Path:
    """A tiny random native model folder with its own tokenizer.json (vocab tokens)."""
    tok = train_tokenizer(TEXTS, "bpe", vocab)
    tok_path = folder.parent / f"{folder.name}-tokenizer.json"
    tok.save(tok_path)
    cfg = ModelConfig(vocab_size=tok.vocab_size, **CFG)
    save_model_checkpoint(folder, init_params(make_model(cfg), jax.random.key(0)), cfg, tok_path, {"stage": "sft"})
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("models") / "ckpt")


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(["completely different words entirely"] * 10, "bpe", 280).save(path)
    return path


def _tree(folder: Path) -> dict[str, str]:
    """Every file under a folder with its sha256: what 'unchanged' means."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def _user_project(root: Path) -> Path:
    project = root / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('my code')\n")
    return project


def _pack(root: Path, corpus: bytes = b"Plain prose about foxes and dogs.\n", chat_rows: list | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_bytes(corpus)
    rows = chat_rows if chat_rows is not None else [{"user": f"q{i}", "assistant": f"a{i}"} for i in range(4)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "pack.json").write_text(json.dumps({"name": "p", "corpus": "corpus.txt", "chat": "chat.jsonl"}))
    return root / "pack.json"


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Path, Path], tuple[list[str], list[Path]]]  # -> (argv, folders that must not change)
    exit_code: int
    message: str


def _export_into_user_folder(tmp, model, _tok):
    project = _user_project(tmp)
    return ["export", "hf", "--checkpoint", str(model), "--out-dir", str(project)], [project]


def _export_overwrite_user_folder(tmp, model, _tok):
    project = _user_project(tmp)
    return ["export", "hf", "--checkpoint", str(model), "--out-dir", str(project), "--overwrite"], [project]


def _export_onto_a_file(tmp, model, _tok):
    target = tmp / "notes.txt"
    target.write_text("keep me\n")
    return ["export", "hf", "--checkpoint", str(model), "--out-dir", str(target)], [tmp]


def _export_twice_without_overwrite(tmp, model, _tok):
    out = tmp / "hf"
    assert CliRunner().invoke(main, ["export", "hf", "--checkpoint", str(model), "--out-dir", str(out)]).exit_code == 0
    return ["export", "hf", "--checkpoint", str(model), "--out-dir", str(out)], [out]


def _export_overwrite_deleting_its_input(tmp, model, _tok):
    out = tmp / "hf"
    claim_out_dir(check_out_dir(out, "hf-export"))
    inner = out / "ckpt"
    shutil.copytree(model, inner)
    return ["export", "hf", "--checkpoint", str(inner), "--out-dir", str(out), "--overwrite"], [out]


def _import_into_user_folder(tmp, model, _tok):
    project = _user_project(tmp)
    hf = tmp / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    return ["import", "hf", "--model", str(hf), "--out-dir", str(project), "--overwrite"], [project]


def _run_into_user_folder(tmp, _model, _tok):
    project = _user_project(tmp)
    return ["run", "tiny", "--dataset-pack", str(_pack(tmp / "pk")), "--out-dir", str(project), "--scale",
            "smoke"], [project]


def _run_overwrite_non_run_folder(tmp, _model, _tok):
    folder = tmp / "results"
    (folder / "dpo").mkdir(parents=True)
    (folder / "dpo" / "mine.txt").write_text("hours of work\n")
    return ["run", "tiny", "--dataset-pack", str(_pack(tmp / "pk")), "--out-dir", str(folder), "--overwrite",
            "--scale", "smoke"], [folder]


def _run_resume_with_another_scale(tmp, model, _tok):
    run = tmp / "run"
    pack = _pack(tmp / "pk")
    claim_out_dir(check_out_dir(run, "run"))
    (run / "tokenizer.json").write_text((model / "tokenizer.json").read_text())
    settings = {"pack": str(pack.absolute()), "scale": {"name": "pico"}, "base": {"steps": 240}}
    (run / "run_config.json").write_text(json.dumps({"settings": settings}))
    return ["run", "tiny", "--dataset-pack", str(pack), "--out-dir", str(run), "--resume", "--scale", "smoke"], [run]


def _run_into_a_file(tmp, _model, _tok):
    target = tmp / "out.txt"
    target.write_text("x\n")
    return ["run", "tiny", "--dataset-pack", str(_pack(tmp / "pk")), "--out-dir", str(target)], [tmp]


def _run_resume_nothing(tmp, _model, _tok):
    return ["run", "tiny", "--dataset-pack", str(_pack(tmp / "pk")), "--out-dir", str(tmp / "fresh"), "--resume",
            "--scale", "smoke"], [tmp]


def _run_non_utf8_corpus(tmp, _model, _tok):
    pack = _pack(tmp / "pk", corpus=b"good text\nthen a bad byte \xff here\n")
    return ["run", "tiny", "--dataset-pack", str(pack), "--out-dir", str(tmp / "out"), "--scale", "smoke"], [tmp]


def _run_empty_corpus(tmp, _model, _tok):
    return ["run", "tiny", "--dataset-pack", str(_pack(tmp / "pk", corpus=b"")), "--out-dir", str(tmp / "out"),
            "--scale", "smoke"], [tmp]


def _run_huge_chat_row(tmp, _model, _tok):
    rows = [{"user": "q", "assistant": "a"}, {"user": "q", "assistant": "x" * 1_100_000}]
    return ["run", "tiny", "--dataset-pack", str(_pack(tmp / "pk", chat_rows=rows)), "--out-dir",
            str(tmp / "out"), "--scale", "smoke"], [tmp]


def _sft_overwrite_onto_a_stage_holding_its_checkpoint(tmp: Path, model: Path, kind: str) -> tuple[list[str], list]:
    """`train sft --checkpoint STAGE/checkpoint --out-dir STAGE --overwrite`, STAGE marked as `kind`."""
    stage = tmp / "rr" / "stage"
    write_marker(stage.parent, "run")
    write_marker(stage, kind)
    shutil.copytree(model, stage / "checkpoint")
    chat = tmp / "chat.jsonl"
    chat.write_text(json.dumps({"user": "q", "assistant": "a"}) + "\n")
    return ["train", "sft", "--checkpoint", str(stage / "checkpoint"), "--input", str(chat), "--out-dir",
            str(stage), "--overwrite"], [stage]


def _sft_overwrite_own_input(tmp, model, _tok):
    return _sft_overwrite_onto_a_stage_holding_its_checkpoint(tmp, model, "train-base")


def _sft_overwrite_input_inside_same_kind(tmp, model, _tok):
    return _sft_overwrite_onto_a_stage_holding_its_checkpoint(tmp, model, "train-sft")


def _eval_with_foreign_tokenizer(tmp, model, tok):
    rows = tmp / "eval.jsonl"
    rows.write_text(json.dumps({"user": "hi", "must_include": ["x"]}) + "\n")
    return ["eval", "chat", "--checkpoint", str(model), "--tokenizer", str(tok), "--input", str(rows), "--out-dir",
            str(tmp / "ev")], [tmp / "ev"]


def _export_with_foreign_tokenizer(tmp, model, tok):
    return ["export", "hf", "--checkpoint", str(model), "--tokenizer", str(tok), "--out-dir", str(tmp / "hf")], \
        [tmp / "hf"]


def _eval_into_earlier_eval(tmp, model, _tok):
    out = tmp / "ev"
    write_marker(out, "eval-chat")
    rows = tmp / "eval.jsonl"
    rows.write_text(json.dumps({"user": "hi", "must_include": ["x"]}) + "\n")
    return ["eval", "chat", "--checkpoint", str(model), "--input", str(rows), "--out-dir", str(out)], [out]


def _validate_non_utf8(tmp, _model, _tok):
    pack = _pack(tmp / "pk")
    (tmp / "pk" / "chat.jsonl").write_bytes(b'{"user": "q", "assistant": "a"}\n{"user": "\xfe", "assistant": "a"}\n')
    return ["data", "validate", str(pack)], [tmp]


def _validate_folder_as_file(tmp, _model, _tok):
    pack = _pack(tmp / "pk")
    (tmp / "pk" / "chat.jsonl").unlink()
    (tmp / "pk" / "chat.jsonl").mkdir()
    return ["data", "validate", str(pack)], [tmp]


def _validate_every_error(tmp, _model, _tok):
    rows = [{"user": "q"} for _ in range(25)] + [{"user": "q", "assistant": "a"}]
    return ["data", "validate", str(_pack(tmp / "pk", chat_rows=rows))], [tmp]


def _validate_pack_is_a_folder(tmp, _model, _tok):
    (tmp / "pk").mkdir()
    return ["data", "validate", str(tmp / "pk")], [tmp]


def _train_resume_without_checkpoint(tmp, model, _tok):
    out = tmp / "sft"
    write_marker(out, "train-sft")
    chat = tmp / "chat.jsonl"
    chat.write_text("".join(json.dumps({"user": f"q{i}", "assistant": f"a{i}"}) + "\n" for i in range(4)))
    return ["train", "sft", "--checkpoint", str(model), "--input", str(chat), "--out-dir", str(out), "--resume",
            "--scale", "smoke", "--no-progress"], [out]


def _tokenizer_train_onto_existing_file(tmp, _model, _tok):
    out = tmp / "tokenizer.json"
    out.write_text("mine\n")
    return ["tokenizer", "train", "--dataset-pack", str(_pack(tmp / "pk")), "--out", str(out)], [tmp]


def _gate_on_a_user_folder(tmp, _model, _tok):
    return ["gate", str(_user_project(tmp))], [tmp]


CASES = [
    Case("export hf into a user's folder", _export_into_user_folder, 2, "is not a picochat output folder"),
    Case("export hf --overwrite into a user's folder", _export_overwrite_user_folder, 2, "src/main.py"),
    Case("export hf onto a regular file", _export_onto_a_file, 2, "is a file, not a folder"),
    Case("export hf twice without --overwrite", _export_twice_without_overwrite, 2, "--overwrite"),
    Case("export hf --overwrite deleting its own input", _export_overwrite_deleting_its_input, 2,
         "an input of this command"),
    Case("import hf --overwrite into a user's folder", _import_into_user_folder, 2, "is not a picochat output"),
    Case("run tiny into a user's folder", _run_into_user_folder, 2, "is not a picochat output folder"),
    Case("run tiny --overwrite into a non-run folder", _run_overwrite_non_run_folder, 2, "dpo/mine.txt"),
    Case("run tiny --resume with another --scale", _run_resume_with_another_scale, 2, "scale.name: 'pico' -> 'smoke'"),
    Case("run tiny into a regular file", _run_into_a_file, 2, "is a file, not a folder"),
    Case("run tiny --resume with nothing to resume", _run_resume_nothing, 2, "nothing to resume"),
    Case("run tiny on a non-UTF-8 corpus", _run_non_utf8_corpus, 2, "corpus.txt:2: is not valid UTF-8 (byte 0xff at "
         "byte offset 26)"),
    Case("run tiny on an empty corpus file", _run_empty_corpus, 2, "corpus.txt: is empty"),
    Case("run tiny with a 1.1 MB chat row", _run_huge_chat_row, 2, "chat.jsonl:2: row is 1,100,031 bytes"),
    Case("train sft --overwrite on the base stage it reads", _sft_overwrite_own_input, 2,
         "holds a picochat 'train-base' output"),
    Case("train sft --overwrite on a folder holding its checkpoint", _sft_overwrite_input_inside_same_kind, 2,
         "an input of this command"),
    Case("eval chat with another run's tokenizer", _eval_with_foreign_tokenizer, 2, "does not belong to the model"),
    Case("export hf with another run's tokenizer", _export_with_foreign_tokenizer, 2, "does not belong to the model"),
    Case("eval chat into an earlier eval", _eval_into_earlier_eval, 2, "--overwrite"),
    Case("data validate on a non-UTF-8 chat row", _validate_non_utf8, 1, "chat.jsonl:2: is not valid UTF-8 (byte "
         "0xfe at byte offset 42)"),
    Case("data validate with a folder for the chat file", _validate_folder_as_file, 1, "is a folder, expected a file"),
    Case("data validate lists every error", _validate_every_error, 1, "and 5 more errors in this file"),
    Case("data validate on a folder instead of a pack", _validate_pack_is_a_folder, 1, "is a folder"),
    Case("train sft --resume with no checkpoint", _train_resume_without_checkpoint, 2, "no complete checkpoint"),
    Case("tokenizer train onto an existing file", _tokenizer_train_onto_existing_file, 2, "already exists"),
    Case("gate on a user's folder", _gate_on_a_user_folder, 2, "is not a `picochat run`"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_cli_case(case: Case, tmp_path: Path, model_dir: Path, other_tokenizer: Path) -> None:
    argv, guarded = case.setup(tmp_path, model_dir, other_tokenizer)
    before = {str(g): _tree(g) for g in guarded}
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == case.exit_code, result.output
    assert case.message in result.output, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    for g in guarded:  # nothing a user owns was written, replaced or deleted
        assert _tree(g) == before[str(g)], f"{g} changed"


def test_every_error_listed_is_a_real_row(tmp_path):
    rows = [{"user": "q"} for _ in range(25)] + [{"user": "q", "assistant": "a"}]
    result = CliRunner().invoke(main, ["data", "validate", str(_pack(tmp_path, chat_rows=rows))])
    listed = [line for line in result.output.splitlines() if "field 'assistant' is missing" in line]
    assert [int(line.split("chat.jsonl:")[1].split(":")[0]) for line in listed] == list(range(1, 21))


def test_max_row_bytes_is_configurable(tmp_path):
    rows = [{"user": "q", "assistant": "x" * 2000}]
    pack = _pack(tmp_path, chat_rows=rows)
    small = CliRunner().invoke(main, ["data", "validate", str(pack), "--max-row-bytes", "1000"])
    assert small.exit_code == 1 and "over the limit of 1,000" in small.output
    assert CliRunner().invoke(main, ["data", "validate", str(pack)]).exit_code == 0


def test_export_overwrite_replaces_only_its_own_export(tmp_path, model_dir):
    out = tmp_path / "hf"
    runner = CliRunner()
    assert runner.invoke(main, ["export", "hf", "--checkpoint", str(model_dir), "--out-dir", str(out)]).exit_code == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "hf-export" and marker["tokenizer"]["vocab_size"] > 256
    again = runner.invoke(main, ["export", "hf", "--checkpoint", str(model_dir), "--out-dir", str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert (out / "model.safetensors").exists() and (out / MARKER).exists()


def test_checkpoint_records_its_tokenizer_and_the_default_is_its_own(tmp_path, model_dir):
    meta = json.loads((model_dir / "checkpoint.json").read_text())
    own = hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert meta["tokenizer"]["sha256"] == own
    from picochat_jax.checkpoint import checkpoint_tokenizer

    assert checkpoint_tokenizer(model_dir) == model_dir / "tokenizer.json"


def test_serve_and_chat_refuse_a_foreign_tokenizer(model_dir, other_tokenizer):
    from picochat_jax.serve.backend import load_backend

    with pytest.raises(ValueError, match="does not belong to the model"):
        load_backend(model_dir, other_tokenizer, warmup=False)
    chat = CliRunner().invoke(main, ["chat", "--checkpoint", str(model_dir), "--tokenizer", str(other_tokenizer)],
                              input="/quit\n")
    assert chat.exit_code == 2 and "does not belong" in chat.output


def test_delete_owned_refuses_a_folder_without_the_marker(tmp_path):
    project = _user_project(tmp_path)
    with pytest.raises(OutDirError, match="did not create it"):
        delete_owned(project)
    assert (project / "src" / "main.py").exists()


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl:3: dropped a torn last line"):
        rows = read_history(path, 10)
    assert [r["step"] for r in rows] == [1, 2]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.5}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        read_history(path, 10)


def test_resume_or_start_starts_when_there_is_nothing_to_resume(tmp_path):
    plan = check_out_dir(tmp_path / "new", "run", resume_or_start=True)
    assert plan.action == "create"
    with pytest.raises(OutDirError, match="nothing to resume"):
        check_out_dir(tmp_path / "new", "run", resume=True)
