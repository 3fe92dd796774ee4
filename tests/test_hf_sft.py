"""Path B end to end on a tiny random Llama with a ChatML chat template, built locally (no hub).

One LoRA run (module fixture) feeds several checks: held-out loss goes down, the merged final_model loads in
transformers and equals PEFT's base + adapter, the adapter is in PEFT's format, the done file comes last.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from picochat_jax.cli import main
from picochat_jax.data.chat import encode_template_rows, template_examples
from picochat_jax.data.records import read_chat_jsonl
from picochat_jax.hf.chat_format import HFChatFormat
from picochat_jax.hf.io import load_hf_model
from picochat_jax.hf.sft import HFSFTOptions, run_hf_sft
from picochat_jax.model.lora import LoraConfig
from picochat_jax.model.transformer import make_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NAMES = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lu", "Max", "Ned", "Oz", "Pia",
         "Quin", "Rex", "Sue", "Tom", "Uma", "Vic", "Wes", "Xia", "Yul", "Zed", "Al", "Bea", "Cal", "Dot", "Eli", "Flo",
         "Gil", "Hana", "Ike", "Jan", "Kai", "Liv", "Mo", "Nia"]
LORA = LoraConfig(rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"))


def _make_model_folder(root: Path) -> tuple[Path, Path]:
    """A tiny random Llama + byte-level BPE tokenizer with a ChatML template, and a learnable chat file."""
    rows = [{"user": f"Say hello to {n}.", "assistant": f"Hello, {n}! Nice to meet you."} for n in NAMES]
    rows[3] = {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hi."},
                                                    {"role": "user", "content": "Say hello to Dee."},
                                                    {"role": "assistant", "content": "Hello, Dee! Nice to meet you."}]}
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"{r.get('user', '')} {r.get('assistant', '')}" for r in rows] + ["user assistant"],
                            trainer)
    model_dir = root / "tiny-llama"
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                     chat_template=CHATML)
    hf_tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=tok.get_vocab_size(), max_position_embeddings=256,
                      eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    return model_dir, chat


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _make_model_folder(tmp_path_factory.mktemp("hf_sft"))


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    model_dir, chat = tiny
    out = tmp_path_factory.mktemp("lora_out")
    opts = HFSFTOptions(model=str(model_dir), input=chat, out_dir=out / "run", max_steps=24, max_length=64,
                        peft="lora", lora=LORA, learning_rate=2e-2, batch_size=8, val_fraction=0.2,
                        done_file=out / "done.json")
    return run_hf_sft(opts, log=lambda _: None), out


def test_target_is_what_the_full_render_adds_beyond_the_prompt(tiny):
    model_dir, chat = tiny
    fmt = HFChatFormat.load(model_dir)
    rows = read_chat_jsonl(chat)
    encoded, mismatched = encode_template_rows(rows, fmt)
    assert mismatched == 0
    for row, (ids, mask) in zip(rows, encoded, strict=True):
        assert fmt.tokenizer.decode(ids[mask]) == f"{row.messages[-1].content}<|im_end|>\n"
        # everything before the target is exactly the generation prompt
        assert ids[~mask].tolist() == fmt.encode_prompt(row.messages[:-1])
    examples, stats = template_examples(rows, fmt, max_length=128)
    assert stats["rows"] == len(rows) and stats["truncated_rows"] == 0
    assert examples["inputs"].shape == (len(rows), stats["seq_len"])
    examples, stats = template_examples(rows, fmt, max_length=32)  # too long rows lose their start, not the target
    assert stats["truncated_rows"] > 0 and examples["inputs"].shape[1] == 32
    np.testing.assert_array_equal(examples["loss_mask"].sum(1), [m[1:].sum() for _, m in encoded])


def test_template_whose_prompt_is_not_a_prefix(tiny):
    model_dir, chat = tiny
    fmt = HFChatFormat.load(model_dir)
    # A template that closes the generation prompt differently from a rendered assistant turn.
    fmt.tokenizer.chat_template = CHATML.replace("<|im_start|>assistant\n{% endif %}",
                                                 "<|im_start|>assistant:{% endif %}")
    rows = read_chat_jsonl(chat)[:4]
    encoded, mismatched = encode_template_rows(rows, fmt)
    assert mismatched == len(rows)
    ids, mask = encoded[0]
    # The target starts where the renderings part ways ('\n' vs ':' after the shared 'assistant' token).
    assert fmt.tokenizer.decode(ids[mask]) == f"\n{rows[0].messages[-1].content}<|im_end|>\n"
    assert fmt.tokenizer.decode(ids[~mask]).endswith("<|im_start|>assistant")


def test_hf_chat_format_protocol(tiny):
    model_dir, _ = tiny
    fmt = HFChatFormat.load(model_dir)
    end = fmt.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fmt.stop_ids == (end,) and fmt.pad_id == fmt.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    prompt = fmt.encode_prompt([{"role": "user", "content": "Say hello to Bob."}])
    assert fmt.tokenizer.decode(prompt) == "<|im_start|>user\nSay hello to Bob.<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.decode(fmt.encode_text("Hello, Bob!") + [end]) == "Hello, Bob!"


@pytest.mark.slow
def test_lora_sft_lowers_held_out_loss(lora_run):
    report, out = lora_run
    assert report["split"] == {"train": 32, "val": 8, "val_fraction": 0.2}
    assert report["best_val_loss"] < report["initial_val_loss"] - 0.5
    assert report["peft"]["rank"] == 4 and report["trainable_params"] < report["params"] / 10
    rows = report["loss_curve"]
    assert set(rows[-1]) == {"step", "loss", "val_loss", "lr", "grad_norm", "elapsed_sec"}  # metrics.jsonl keys
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 24 and rows[-1]["val_loss"] is not None
    assert report["tokens_per_sec"] > 0
    saved = json.loads((out / "run" / "hf_sft_report.json").read_text())
    assert saved["best_step"] == report["best_step"]
    assert "held-out loss" in (out / "run" / "report.md").read_text()


@pytest.mark.slow
def test_done_file_is_written_last(lora_run):
    _, out = lora_run
    done = json.loads((out / "done.json").read_text())
    assert done["status"] == "completed"
    for key in ("final_model", "best_model", "final_adapter", "best_adapter", "report"):
        assert Path(done[key]).exists(), key
    newest_output = max(p.stat().st_mtime for p in (out / "run").rglob("*") if p.is_file())
    assert (out / "done.json").stat().st_mtime >= newest_output


@pytest.mark.slow
def test_merged_model_equals_peft_base_plus_adapter(lora_run, tiny):
    from peft import PeftModel

    model_dir, _ = tiny
    _, out = lora_run
    tokens = torch.tensor(np.random.default_rng(0).integers(0, 300, (2, 24)))
    merged = AutoModelForCausalLM.from_pretrained(out / "run" / "final_model").eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        merged_logits = merged(tokens).logits.numpy()
        base_logits = base(tokens).logits.numpy()
        peft_logits = PeftModel.from_pretrained(base, out / "run" / "final_adapter").eval()(tokens).logits.numpy()
    np.testing.assert_allclose(peft_logits, merged_logits, atol=1e-4, rtol=0)
    assert np.abs(merged_logits - base_logits).max() > 1e-2  # the adapter changed the model
    ours = load_hf_model(out / "run" / "final_model")  # and our side reads the same merged model
    np.testing.assert_allclose(np.asarray(make_model(ours.config).apply({"params": ours.params},
                                                                        jnp.asarray(tokens.numpy()))),
                               merged_logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_outputs_are_complete_hf_and_peft_folders(lora_run):
    _, out = lora_run
    for name in ("final_model", "best_model"):
        files = {p.name for p in (out / "run" / name).iterdir()}
        assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "chat_template.jinja"} <= files, name
    config = json.loads((out / "run" / "final_adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert sorted(config["target_modules"]) == sorted(LORA.targets)
    from safetensors.numpy import load_file

    tensors = load_file(out / "run" / "final_adapter" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)


@pytest.mark.slow
def test_cli_full_finetune(tiny, tmp_path):
    model_dir, chat = tiny
    done = tmp_path / "done.json"
    result = CliRunner().invoke(main, [
        "train", "hf-sft", "--model", str(model_dir), "--input", str(chat), "--out-dir", str(tmp_path / "o"),
        "--max-steps", "3", "--max-length", "64", "--device", "cpu", "--precision", "fp32", "--peft", "none",
        "--learning-rate", "1e-3", "--batch-size", "8", "--val-fraction", "0.2", "--gradient-checkpointing",
        "--done-file", str(done)])
    assert result.exit_code == 0, result.output
    status = json.loads(done.read_text())
    assert status["status"] == "completed" and "final_adapter" not in status
    assert not (tmp_path / "o" / "final_adapter").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "best_model")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_cli_rejects_lora_dropout_and_bad_targets(tiny, tmp_path):
    model_dir, chat = tiny
    args = ["train", "hf-sft", "--model", str(model_dir), "--input", str(chat), "--out-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args + ["--lora-dropout", "0.1"])
    assert result.exit_code != 0 and "--lora-dropout 0" in result.output
    result = CliRunner().invoke(main, args + ["--lora-targets", "qkv_proj"])
    assert result.exit_code != 0 and "unknown LoRA target" in result.output


def test_failure_still_writes_the_done_file(tiny, tmp_path):
    model_dir, _ = tiny
    opts = HFSFTOptions(model=str(model_dir), input=tmp_path / "missing.jsonl", out_dir=tmp_path / "o",
                        done_file=tmp_path / "done.json")
    with pytest.raises(FileNotFoundError):
        run_hf_sft(opts, log=lambda _: None)
    done = json.loads((tmp_path / "done.json").read_text())
    assert done["status"] == "failed" and "missing.jsonl" in done["error"]


@pytest.mark.slow
def test_eval_chat_with_hf_model_matches_transformers_greedy(tiny, tmp_path):
    """`eval chat --hf-model`: our engine + HFChatFormat decode exactly what transformers' greedy generate does."""
    model_dir, _ = tiny
    prompts = ["Say hello to Bob.", "Say hello to Zed."]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"user": p, "must_include": ["Hello"]}) + "\n"
                                                 for p in prompts))
    result = CliRunner().invoke(main, ["eval", "chat", "--hf-model", str(model_dir), "--input",
                                       str(tmp_path / "eval.jsonl"), "--out-dir", str(tmp_path / "ev"),
                                       "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    replies = [json.loads(line)["reply"] for line in (tmp_path / "ev" / "eval_results.jsonl").read_text().splitlines()]
    fmt = HFChatFormat.load(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for prompt, reply in zip(prompts, replies, strict=True):
        ids = fmt.encode_prompt([{"role": "user", "content": prompt}])
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                 eos_token_id=list(fmt.stop_ids), pad_token_id=fmt.pad_id)
        assert fmt.decode(out[0, len(ids):].tolist()) == reply
    both = CliRunner().invoke(main, ["eval", "chat", "--hf-model", str(model_dir), "--checkpoint", str(tmp_path),
                                     "--input", str(tmp_path / "eval.jsonl"), "--out-dir", str(tmp_path / "x")])
    assert both.exit_code != 0 and "exactly one of --checkpoint or --hf-model" in both.output


@pytest.mark.slow
def test_hf_sft_resumes_the_exact_trajectory_and_logs_the_common_metric_keys(tiny, lora_run, tmp_path):
    """hf-sft runs on the one driver: a run stopped after step 9 (as SIGTERM stops it) and resumed with
    --resume ends with the same losses as the uninterrupted run, and metrics.jsonl has the stages' keys."""
    model_dir, chat = tiny
    full_report, _ = lora_run
    kwargs = dict(model=str(model_dir), input=chat, out_dir=tmp_path / "run", max_steps=24, max_length=64,
                  peft="lora", lora=LORA, learning_rate=2e-2, batch_size=8, val_fraction=0.2, progress=False)
    stopped = run_hf_sft(HFSFTOptions(**kwargs, should_stop=lambda step: step == 9), log=lambda _: None)
    assert stopped["status"] == "interrupted" and stopped["step"] == 9
    with pytest.raises(ValueError, match="--resume"):  # an earlier output: resume or overwrite, never clobber
        run_hf_sft(HFSFTOptions(**kwargs), log=lambda _: None)
    resumed = run_hf_sft(HFSFTOptions(**kwargs, resume=True), log=lambda _: None)
    got = [r["loss"] for r in resumed["loss_curve"] if r["loss"] is not None]
    want = [r["loss"] for r in full_report["loss_curve"] if r["loss"] is not None]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert resumed["best_val_loss"] == pytest.approx(full_report["best_val_loss"], rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec"} <= set(rows[-2]) and "val_loss" in rows[-1]


@pytest.mark.slow
def test_done_and_progress_files_are_placed_as_the_original_places_them(tiny, tmp_path):
    """A bare --done-file/--progress-file name lands inside the out-dir, a path with a folder is used as given;
    the progress file ends with status done at the last step."""
    model_dir, chat = tiny
    base = ["train", "hf-sft", "--model", str(model_dir), "--input", str(chat), "--max-steps", "4",
            "--max-length", "64", "--batch-size", "8", "--no-progress"]
    result = CliRunner().invoke(main, [*base, "--out-dir", str(tmp_path / "a"), "--progress-file", "progress.json"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "a" / "done.txt").read_text())["status"] == "completed"  # the default, inside
    progress = json.loads((tmp_path / "a" / "progress.json").read_text())
    assert progress["status"] == "done" and progress["step"] == 4 and progress["max_steps"] == 4
    result = CliRunner().invoke(main, [*base, "--out-dir", str(tmp_path / "b"), "--done-file",
                                       str(tmp_path / "elsewhere" / "b.done")])
    assert result.exit_code == 0 and (tmp_path / "elsewhere" / "b.done").exists()
    assert not (tmp_path / "b" / "done.txt").exists()


def test_a_refused_out_dir_gets_no_done_file(tiny, tmp_path):
    """The done file is written on failure too, but never into a folder the run was refused (a user's)."""
    model_dir, chat = tiny
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine\n")
    result = CliRunner().invoke(main, ["train", "hf-sft", "--model", str(model_dir), "--input", str(chat),
                                       "--out-dir", str(user)])
    assert result.exit_code == 2 and "not a picochat output folder" in result.output
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]


def test_gate_judges_an_hf_sft_folder_through_the_bridge(lora_run, tiny, tmp_path):
    """`picochat gate OUT --eval-input ...` on an hf-sft out-dir: eval, external eval and honesty built with the
    fine-tuned model, then judged; an eval row copied from the SFT input is caught as contamination."""
    import shutil

    report, out = lora_run
    run = tmp_path / "hf_run"
    shutil.copytree(out / "run", run)
    model_dir, chat = tiny
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"user": f"Say hello to {n}.", "must_include": [n]}) + "\n"
                             for n in ("Ada", "Zoe", "Kit")))
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"Who is greeted? {n}", "choices": [n, "nobody"], "answer": 0})
                          + "\n" for n in ("Ada", "Bob")))
    res = CliRunner().invoke(main, ["gate", str(run), "--eval-input", str(evals), "--external-input", str(mc),
                                    "--set", "min_eval_rows=1", "--ci-bootstrap-samples", "50"])
    assert res.exit_code in (0, 1), res.output
    gate = json.loads((run / "release" / "gate.json").read_text())
    names = [c["name"] for c in gate["checks"]]
    assert gate["kind"] == "hf-sft" and gate["model"] == "final_model"
    assert names[0] == "training" and gate["checks"][0]["verdict"] == "pass"
    assert "preflight" not in names and "memorization_rate" not in names and "external_pass_rate" in names
    assert (run / "eval" / "eval_report.json").exists() and (run / "external_eval" / "external_summary.json").exists()
    honesty = json.loads((run / "honesty" / "honesty_report.json").read_text())
    assert honesty["eval_lines_in_sft"] == [1]  # "Say hello to Ada." is an SFT row
    assert "eval_in_sft" in gate["blocking"] and gate["decision"] == "blocked"
    again = CliRunner().invoke(main, ["gate", str(run), "--set", "min_eval_rows=1"])  # evidence is reused
    assert "built" not in again.output


def test_original_options_schedule_eval_input_revision_and_remote_code(tiny, tmp_path):
    from picochat_jax.hf.sft import hf_train_config

    model_dir, chat = tiny
    evals = tmp_path / "eval.jsonl"
    evals.write_text(json.dumps({"user": "Say hello to Ada.", "must_include": ["Ada"]}) + "\n")
    result = CliRunner().invoke(main, [
        "train", "hf-sft", "--model", str(model_dir), "--input", str(chat), "--out-dir", str(tmp_path / "o"),
        "--max-steps", "4", "--max-length", "64", "--device", "cpu", "--peft", "lora", "--learning-rate", "1e-3",
        "--batch-size", "8", "--lr-warmup-steps", "2", "--lr-decay", "linear", "--min-lr-ratio", "0.5",
        "--eval-input", str(evals), "--trust-remote-code", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "hf_sft_report.json").read_text())
    cfg = report["train_config"]
    assert (cfg["warmup_steps"], cfg["decay"], cfg["min_lr_ratio"]) == (2, "linear", 0.5)
    lrs = [r["lr"] for r in report["loss_curve"] if r["lr"] is not None]
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] < max(lrs)  # warmed up to the peak, then decayed
    assert report["eval"]["rows"] == 1 and (tmp_path / "o" / "eval" / "eval_report.json").exists()
    assert "eval (" in (tmp_path / "o" / "report.md").read_text()
    # --revision applies to hub ids only.
    bad = CliRunner().invoke(main, ["train", "hf-sft", "--model", str(model_dir), "--revision", "main", "--input",
                                    str(chat), "--out-dir", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "applies to hub ids" in bad.output
    # A checkpoint defined by its own shipped code is refused with the reason, flag or not.
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "my_arch", "architectures": ["MyArchForCausalLM"],
                                                    "auto_map": {"AutoModelForCausalLM": "modeling.MyArch"}}))
    refused = CliRunner().invoke(main, ["train", "hf-sft", "--model", str(custom), "--trust-remote-code", "--input",
                                        str(chat), "--out-dir", str(tmp_path / "c")])
    assert refused.exit_code == 2 and "never runs remote code" in refused.output
    from picochat_jax.config import HFSFTConfig
    from picochat_jax.hf.sft import HFSFTOptions

    opts = HFSFTOptions(model="m", input=chat, out_dir=tmp_path, max_steps=100, optimizer=HFSFTConfig())
    assert hf_train_config(opts).warmup_steps == 10  # the fraction when no fixed warmup is set


def test_packed_hf_rows_give_the_unpacked_loss(tiny):
    """Packing is exact on an HF model too: the pad id is the eos id here, so lengths come from the template."""
    from picochat_jax.data.packing import pack_examples
    from picochat_jax.model.loss import loss_sums

    model_dir, chat = tiny
    hf = load_hf_model(model_dir)
    fmt = HFChatFormat.load(hf.path)
    examples, stats = template_examples(read_chat_jsonl(chat), fmt, max_length=64)
    lengths = examples.pop("length")
    packed = pack_examples(examples, 2 * stats["seq_len"], fmt.pad_id, lengths)  # rows with room for two
    assert len(packed["inputs"]) < len(examples["inputs"])
    model = make_model(hf.config)
    tb = jnp.ones(hf.config.vocab_size)
    wide = {k: np.pad(v, ((0, 0), (0, stats["seq_len"])), constant_values=fmt.pad_id if k != "loss_mask" else 0)
            for k, v in examples.items()}  # the unpacked rows at the packed width: the same model shapes
    plain, pk = loss_sums(model, hf.params, wide, tb), loss_sums(model, hf.params, packed, tb)
    assert float(pk[1]) == float(plain[1])
    np.testing.assert_allclose(float(pk[0]), float(plain[0]), rtol=1e-5)


def test_hf_dpo_learns_preferences_and_writes_hf_sft_shaped_outputs(tiny, tmp_path):
    """`train hf-dpo` with LoRA on the tiny Llama: the implicit reward accuracy rises from 0 (policy = reference)
    on held-in pairs, and the outputs are hf-sft's: merged HF folders, PEFT adapters, report, done file."""
    model_dir, _ = tiny
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Say hello to {n}.", "chosen": f"Hello, {n}! Nice to meet you.",
                                         "rejected": "No."}) + "\n" for n in NAMES[:16]))
    out = tmp_path / "dpo"
    res = CliRunner().invoke(main, [
        "train", "hf-dpo", "--model", str(model_dir), "--input", str(prefs), "--out-dir", str(out),
        "--max-steps", "12", "--max-length", "64", "--device", "cpu", "--peft", "lora", "--learning-rate", "2e-2",
        "--batch-size", "8", "--val-fraction", "0.25", "--beta", "0.5", "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "hf_dpo_report.json").read_text())
    d = report["dpo"]
    assert report["stage"] == "hf-dpo" and d["before"]["reward_accuracy"] == 0.0
    assert d["after"]["reward_accuracy"] >= 0.75 and d["after"]["margin"] > 0
    for folder in ("final_model", "best_model", "final_adapter", "best_adapter"):
        assert (out / folder).is_dir(), folder
    assert json.loads((out / "done.txt").read_text())["status"] == "completed"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_reward_accuracy" in r for r in rows) and any("reward_accuracy" in r for r in rows)
    assert type(AutoModelForCausalLM.from_pretrained(out / "final_model")).__name__ == "LlamaForCausalLM"
    assert "reward accuracy 0.00 ->" in (out / "report.md").read_text()
    # QLoRA DPO: the default reference is the NF4 base the policy starts from, so they start equal too.
    res = CliRunner().invoke(main, [
        "train", "hf-dpo", "--model", str(model_dir), "--input", str(prefs), "--out-dir", str(tmp_path / "qdpo"),
        "--max-steps", "12", "--max-length", "64", "--device", "cpu", "--peft", "lora", "--learning-rate", "2e-2",
        "--batch-size", "8", "--val-fraction", "0.25", "--beta", "0.5", "--no-progress", "--quantize", "4bit"])
    assert res.exit_code == 0, res.output
    q = json.loads((tmp_path / "qdpo" / "hf_dpo_report.json").read_text())
    assert q["quantize"] == "4bit" and q["dpo"]["before"]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert q["dpo"]["after"]["reward_accuracy"] >= 0.75


def _cli_like_lora_run(tiny, out: Path, *extra: str) -> dict:
    """`train hf-sft` through the CLI with the LoRA fixture's settings plus `extra` flags: its report."""
    model_dir, chat = tiny
    result = CliRunner().invoke(main, [
        "train", "hf-sft", "--model", str(model_dir), "--input", str(chat), "--out-dir", str(out),
        "--max-steps", "24", "--max-length", "64", "--device", "cpu", "--lora-rank", "4", "--lora-alpha", "8",
        "--learning-rate", "2e-2", "--batch-size", "8", "--val-fraction", "0.2", "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "hf_sft_report.json").read_text())


@pytest.mark.slow
def test_qlora_trains_over_an_nf4_base_and_exports_what_it_trained(tiny, lora_run, tmp_path):
    """--quantize 4bit: the same run as the LoRA fixture over an NF4 base lands near its loss, the merged
    final_model (adapters over the dequantised base) is what transformers computes, and the report says so."""
    model_dir, _chat = tiny
    lora_report, _ = lora_run
    out = tmp_path / "qlora"
    report = _cli_like_lora_run(tiny, out, "--quantize", "4bit")
    assert report["quantize"] == "4bit" and "dequantised NF4 base" in report["warnings"][0]
    assert "QLoRA (NF4 base)" in (out / "report.md").read_text()
    assert report["best_val_loss"] < report["initial_val_loss"] - 0.5
    assert abs(report["best_val_loss"] - lora_report["best_val_loss"]) < 0.1 * lora_report["best_val_loss"]
    # The NF4 base is not the float base: its starting loss differs a little.
    assert report["initial_val_loss"] != pytest.approx(lora_report["initial_val_loss"], abs=1e-6)

    tokens = np.random.default_rng(0).integers(0, 300, (2, 20))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out / "final_model").eval()(torch.tensor(tokens)).logits.numpy()
    ours = load_hf_model(out / "final_model")
    np.testing.assert_allclose(np.asarray(make_model(ours.config).apply({"params": ours.params},
                                                                        jnp.asarray(tokens))), theirs, atol=1e-4)
    base = load_hf_model(model_dir)
    merged_into_float_base = np.abs(np.asarray(ours.params["layers"]["attn"]["q_proj"]["kernel"])
                                    - np.asarray(base.params["layers"]["attn"]["q_proj"]["kernel"]))
    assert merged_into_float_base.max() > 0  # adapters + quantisation moved the weights


def test_quantize_needs_lora(tiny, tmp_path):
    model_dir, chat = tiny
    with pytest.raises(ValueError, match="--quantize 4bit .* needs --peft lora"):
        HFSFTOptions(model=str(model_dir), input=chat, out_dir=tmp_path / "o", peft="none", quantize="4bit")
    from picochat_jax.hf.sft import quantize_warnings

    assert "Qwen" in quantize_warnings("4bit", "qwen2")[0] and quantize_warnings("none", "qwen2") == []


@pytest.mark.slow
def test_chunked_cross_entropy_gives_the_same_run(tiny, lora_run, tmp_path):
    """--ce-chunk-tokens computes the loss a few rows at a time: the LoRA fixture's run, loss for loss."""
    lora_report, _ = lora_run
    report = _cli_like_lora_run(tiny, tmp_path / "chunked", "--ce-chunk-tokens", "64")
    assert report["ce_chunk_tokens"] == 64
    got = [r["loss"] for r in report["loss_curve"] if r["loss"] is not None]
    want = [r["loss"] for r in lora_report["loss_curve"] if r["loss"] is not None]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert report["best_val_loss"] == pytest.approx(lora_report["best_val_loss"], rel=1e-4)


def test_chunked_cross_entropy_shrinks_the_lora_step_memory():
    """At a large vocabulary the whole batch's float32 logits dominate a LoRA step's temporaries; in chunks of
    one row they are an eighth. Measured on the compiled CPU program (shapes only, nothing runs)."""
    import jax

    from picochat_jax import parallel
    from picochat_jax.config import ModelConfig, load_scale
    from picochat_jax.model.transformer import init_params
    from picochat_jax.train.optim import make_optimizer
    from picochat_jax.train.step import build_trainer

    cfg = ModelConfig(vocab_size=32768, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128)
    base = init_params(make_model(cfg), jax.random.key(0))
    optimizer, schedule = make_optimizer(load_scale("smoke").base)
    batch = {k: jax.ShapeDtypeStruct((1, 8, 128), dtype) for k, dtype in
             [("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.float32)]}

    def temp_bytes(chunk: int) -> int:
        trainer = build_trainer(make_model(cfg), optimizer, schedule, np.zeros(cfg.vocab_size, np.float32),
                                parallel.make_mesh(parallel.MeshShape(1, 1, 1)), lora_cfg=LORA, base_params=base,
                                ce_chunk_tokens=chunk)
        return trainer.step.lower(trainer.abstract_state(), batch).compile().memory_analysis().temp_size_in_bytes

    logits = 8 * 128 * cfg.vocab_size * 4  # 134 MB
    whole, chunked = temp_bytes(0), temp_bytes(128)
    assert whole > logits and whole - chunked > 0.6 * logits
