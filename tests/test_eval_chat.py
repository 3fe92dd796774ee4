"""Chat scoring rules, the eval / fit / loss reports on a trained tiny model, and the `eval` and `chat` CLIs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from picochat_jax.checkpoint import load_model_checkpoint
from picochat_jax.cli import main
from picochat_jax.cli.chat import fit_history
from picochat_jax.config import load_scale
from picochat_jax.data.loader import split_examples
from picochat_jax.data.records import Message, parse_eval_row, read_chat_jsonl, read_eval_jsonl
from picochat_jax.eval.chat import evaluate_chat, is_prompt_echo, is_refusal, score_reply
from picochat_jax.eval.fit import assistant_loss, sft_fit_report, token_f1
from picochat_jax.generate import SamplingParams, load_native
from picochat_jax.pipeline import RunOptions, run_tiny
from picochat_jax.tokenizer import ChatTokenizer


def row(**fields) -> object:
    """An eval row parsed exactly as a line of the original picochat's eval JSONL would be."""
    return parse_eval_row({"user": "What is Picochat?", **fields}, Path("eval.jsonl"), 1)


# ------------------------------------------------------------------------------------------ scoring rules


def test_must_include_needs_every_string_case_insensitively():
    r = row(must_include=["Picochat", "LLM factory"])
    assert score_reply(r, "picochat is an educational llm   FACTORY.") == (True, [])
    ok, reasons = score_reply(r, "Picochat is a toy.")
    assert not ok and reasons == ["missing 'LLM factory'"]


def test_must_include_any_needs_one_string_per_group():
    r = row(must_include_any=[["does not know", "avoid unsupported claims"], ["honest", "truthful"]])
    assert score_reply(r, "It should be HONEST and say it Does Not Know.")[0]
    ok, reasons = score_reply(r, "It should be truthful.")
    assert not ok and len(reasons) == 1 and "does not know" in reasons[0]


def test_must_not_include_forbids_every_string():
    r = row(must_include=["No"], must_not_include=["yes"])
    assert score_reply(r, "No, never.")[0]
    ok, reasons = score_reply(r, "No... well, YES.")
    assert not ok and reasons == ["contains forbidden 'yes'"]


def test_empty_reply_never_passes():
    assert score_reply(row(must_not_include=["yes"]), "  \n")[0] is False
    assert score_reply(row(must_not_include=["yes"]), "Certainly not.")[0] is True


def test_original_picochat_eval_rows_parse_and_score(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(
        '{"user":"Should Picochat make things up?","category":"honesty","answerable":false,'
        '"must_include":["No","honest"],"must_not_include":["yes"]}\n'
        '{"user":"What should Picochat do when it does not know?","category":"refusal","answerable":false,'
        '"must_include_any":[["does not know","avoid unsupported claims"]]}\n')
    first, second = read_eval_jsonl(path)
    assert score_reply(first, "No. Picochat stays honest.")[0]
    assert not score_reply(first, "Yes, honestly.")[0]
    assert score_reply(second, "Say it does not know.")[0]
    assert not score_reply(second, "Make something up.")[0]


def test_prompt_echo_detection():
    prompt = "What does a tokenizer do?"
    assert is_prompt_echo(prompt, "what does a tokenizer do")
    assert is_prompt_echo(prompt, "What does a tokenizer do? It splits text.")
    assert is_prompt_echo(prompt, "Question: what does a tokenizer do?")
    assert not is_prompt_echo(prompt, "A tokenizer turns text into token ids.")
    assert not is_prompt_echo(prompt, "")
    # Repeating a one-word greeting inside a longer reply is an answer, not an echo.
    assert not is_prompt_echo("Hello", "Hello! How can I help?")
    assert is_prompt_echo("Hello", "hello")


def test_refusal_detection():
    for reply in ("I don't know.", "I\u2019m not sure about that.", "Sorry, I cannot answer that.",
                  "I do not have enough information to say.", "I am unable to help with that."):
        assert is_refusal(reply), reply
    for reply in ("Paris is the capital of France.", "I know the answer: blue.",
                  "If you do not know, say so.", ""):
        assert not is_refusal(reply), reply


def test_token_f1():
    assert token_f1("The sky is blue.", "the sky is BLUE") == 1.0
    assert token_f1("sky blue", "the sky is blue") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("green grass", "the sky is blue") == 0.0


def test_chat_history_drops_whole_old_turns_but_keeps_the_system_prompt():
    history = [Message("system", "s"), Message("user", "u1 " * 5), Message("assistant", "a1 " * 5),
               Message("user", "u2 " * 5), Message("assistant", "a2 " * 5), Message("user", "u3")]
    encode = lambda msgs: " ".join(m.content for m in msgs).split()  # noqa: E731 - one token per word
    kept = fit_history(history, encode, budget=12)
    assert [m.content.split()[0] for m in kept] == ["s", "u2", "a2", "u3"]
    assert fit_history(history, encode, budget=1)[-1].content == "u3"
    assert fit_history(history, encode, budget=100) == history


# ------------------------------------------------------------------------------------- a trained tiny model

TAUGHT = [  # (prompt, answer, category, a word only this answer has)
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day.", "weather", "blue"),
    ("What do bees make?", "Bees make honey in the hive.", "nature", "honey"),
    ("Which season has snow?", "Winter is the season with snow.", "weather", "winter"),
    ("What does a baker bake?", "A baker bakes bread every morning.", "kitchen", "bread"),
    ("Where do fish live?", "Fish live in rivers and the sea.", "nature", "rivers"),
    ("What is rice cooked in?", "Rice is cooked in boiling water.", "kitchen", "boiling"),
    ("What lights the night sky?", "The moon lights the night sky.", "sky", "moon"),
    ("How many wheels has a bicycle?", "A bicycle has two wheels.", "things", "two wheels"),
]
UNSEEN = [  # prompts and answers the model never saw
    {"user": "What is the capital of France?", "category": "unseen", "must_include": ["Paris"]},
    {"user": "Which planet has rings?", "category": "unseen", "must_include_any": [["Saturn", "Uranus"]]},
    {"user": "Who wrote Hamlet?", "category": "unseen", "answerable": False, "must_include": ["Shakespeare"]},
]
CORPUS = ("A garden needs water and sun. Letters travel by post to every town. Rivers run down to the sea. "
          "Printing made books cheap. A library sorts its books by subject and author. ") * 8
SCALE, BASE_STEPS, SFT_STEPS = "pico", 5, 100


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Memorise eight SFT rows (pico scale, ~20 s on two CPU cores); one row is the SFT val split."""
    root = tmp_path_factory.mktemp("eval_pack")
    (root / "corpus.txt").write_text(CORPUS)
    (root / "chat.jsonl").write_text("".join(json.dumps({"user": q, "assistant": a, "category": c}) + "\n"
                                             for q, a, c, _ in TAUGHT))
    (root / "dataset_pack.json").write_text(json.dumps({"name": "eval-test", "corpus": "corpus.txt",
                                                        "chat": "chat.jsonl"}))
    run = root / "run"
    # No corpus canaries: the honesty stage's memorisation replay is not what these tests are about.
    run_tiny(root / "dataset_pack.json", run, RunOptions(scale=SCALE, base_steps=BASE_STEPS, sft_steps=SFT_STEPS,
                                                         progress=False, memorization_canaries=0))
    # The SFT stage holds rows out for validation; ask the same split which rows were really taught.
    sft = load_scale(SCALE).sft
    train_idx, val_idx = split_examples({"i": np.arange(len(TAUGHT))}, sft.val_fraction, sft.seed)
    taught, held_out = train_idx["i"].tolist(), val_idx["i"].tolist()
    assert taught and held_out
    rows = [{"user": TAUGHT[i][0], "category": TAUGHT[i][2], "must_include": [TAUGHT[i][3]],
             "must_not_include": [TAUGHT[j][3] for j in taught if j != i][:2]} for i in taught + held_out]
    eval_path = root / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows + UNSEEN))
    return {"run": run, "chat": root / "chat.jsonl", "eval": eval_path, "taught": taught, "held_out": held_out}


@pytest.fixture(scope="module")
def native(trained):
    return load_native(trained["run"] / "sft" / "checkpoint", trained["run"] / "tokenizer.json")


@pytest.mark.slow
def test_taught_rows_pass_and_unseen_rows_fail(trained, native, tmp_path):
    engine, fmt = native
    rows = read_eval_jsonl(trained["eval"])
    report = evaluate_chat(engine, fmt, rows, tmp_path, SamplingParams(max_new_tokens=24), batch_size=4)
    results = [json.loads(line) for line in (tmp_path / "eval_results.jsonl").read_text().splitlines()]
    n_taught = len(trained["taught"])
    assert [r["line"] for r in results] == [r.line for r in rows]
    assert all(r["pass"] for r in results[:n_taught]), [(r["prompt"], r["reply"]) for r in results[:n_taught]]
    assert not any(r["pass"] for r in results[n_taught:]), [(r["prompt"], r["reply"]) for r in results[n_taught:]]
    assert report["passed"] == n_taught and report["rows"] == len(rows)
    assert report["pass_rate"] == pytest.approx(n_taught / len(rows))
    assert report["by_category"]["unseen"] == {"rows": 3, "passed": 0, "pass_rate": 0.0}
    assert report["unanswerable"]["rows"] == 1 and report["unanswerable"]["passed"] == 0
    assert report["prompt_echo_rate"] == 0.0
    assert json.loads((tmp_path / "eval_report.json").read_text())["passed"] == n_taught
    assert "| unseen | 3 | 0 | 0.0% |" in (tmp_path / "eval_report.md").read_text()


@pytest.mark.slow
def test_sft_fit_report_reproduces_taught_rows_only(trained, native, tmp_path):
    engine, fmt = native
    conversations = read_chat_jsonl(trained["chat"])
    report = sft_fit_report(engine, fmt, conversations, tmp_path, SamplingParams(max_new_tokens=8))
    results = [json.loads(line) for line in (tmp_path / "fit_results.jsonl").read_text().splitlines()]
    assert report["sampling"]["max_new_tokens"] > 8  # raised to fit the longest target
    assert all(results[i]["reproduced"] and results[i]["f1"] == 1.0 for i in trained["taught"])
    assert not any(results[i]["reproduced"] for i in trained["held_out"])
    assert report["reproduced"] == len(trained["taught"]) and report["rows"] == len(TAUGHT)
    assert report["mean_f1"] < 1.0
    assert (tmp_path / "fit_report.md").read_text().startswith("# SFT fit report")
    assert sft_fit_report(engine, fmt, conversations, tmp_path / "two", SamplingParams(), max_rows=2)["rows"] == 2


@pytest.mark.slow
def test_assistant_loss_is_lower_on_taught_rows(trained, tmp_path):
    params, cfg, _ = load_model_checkpoint(trained["run"] / "sft" / "checkpoint")
    tok = ChatTokenizer.load(trained["run"] / "tokenizer.json")
    convs = read_chat_jsonl(trained["chat"])
    taught = assistant_loss(params, cfg, tok, [convs[i] for i in trained["taught"]], batch_size=4)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"user": r["user"], "assistant": "It is " + r["user"].lower()}) + "\n"
                             for r in UNSEEN))
    unseen = assistant_loss(params, cfg, tok, read_chat_jsonl(other), batch_size=4)
    assert taught["rows"] == len(trained["taught"]) and taught["tokens"] > 0
    assert taught["loss"] < 0.5 < unseen["loss"]
    assert taught["bpb"] < unseen["bpb"]


@pytest.mark.slow
def test_cli_eval_chat_fit_and_loss_write_their_reports(trained, tmp_path):
    ckpt, tok = str(trained["run"] / "sft" / "checkpoint"), str(trained["run"] / "tokenizer.json")
    runner = CliRunner()
    out = tmp_path / "eval"
    res = runner.invoke(main, ["eval", "chat", "--checkpoint", ckpt, "--tokenizer", tok, "--input",
                               str(trained["eval"]), "--out-dir", str(out), "--max-new-tokens", "24",
                               "--batch-size", "8"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} >= {"eval_results.jsonl", "eval_report.json", "eval_report.md"}
    report = json.loads((out / "eval_report.json").read_text())
    assert report["passed"] == len(trained["taught"]) and report["input"] == str(trained["eval"])
    assert len((out / "eval_results.jsonl").read_text().splitlines()) == report["rows"]
    assert f"{report['passed']}/{report['rows']} passed" in res.output

    res = runner.invoke(main, ["eval", "fit", "--checkpoint", ckpt, "--input", str(trained["chat"]),
                               "--out-dir", str(tmp_path / "fit")])  # tokenizer from the checkpoint folder
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "fit" / "fit_report.json").read_text())["reproduced"] == len(trained["taught"])

    res = runner.invoke(main, ["eval", "loss", "--checkpoint", ckpt, "--tokenizer", tok, "--input",
                               str(trained["chat"]), "--out-dir", str(tmp_path / "loss")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "loss" / "loss_report.json").read_text())["rows"] == len(TAUGHT)

    res = runner.invoke(main, ["eval", "chat", "--checkpoint", str(tmp_path / "nowhere"), "--input",
                               str(trained["eval"]), "--out-dir", str(tmp_path / "x")])
    assert res.exit_code != 0 and "nowhere" in res.output


@pytest.mark.slow
def test_cli_chat_repl_keeps_history_and_resets(trained):
    i = trained["taught"][0]
    question, answer = TAUGHT[i][0], TAUGHT[i][1]
    res = CliRunner().invoke(main, ["chat", "--checkpoint", str(trained["run"] / "sft" / "checkpoint"),
                                    "--max-new-tokens", "24"], input=f"{question}\n/reset\n{question}\n/quit\n")
    assert res.exit_code == 0, res.output
    assert res.output.count(f"assistant> {answer}") == 2
    assert "(conversation cleared)" in res.output
