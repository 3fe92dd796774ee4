"""Best-fit packed SFT rows compute exactly what one example per row computes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from picochat_jax.config import ModelConfig
from picochat_jax.data.chat import sft_examples
from picochat_jax.data.packing import pack_examples
from picochat_jax.data.records import read_chat_jsonl
from picochat_jax.model.loss import loss_sums
from picochat_jax.model.transformer import make_model
from picochat_jax.tokenizer import train_tokenizer

LEARNED = ModelConfig(vocab_size=0, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_seq_len=128,
                      position="learned", norm="layernorm", activation="gelu")


@pytest.fixture(scope="module")
def chat(example_pack):
    convs = read_chat_jsonl(example_pack.parent / "chat.jsonl")[:24]
    tok = train_tokenizer((m.content for c in convs for m in c.messages), "bpe", 300, 2)
    examples, _ = sft_examples(convs, tok, 128)
    return tok, examples


def test_packing_keeps_every_example_whole_with_its_mask(chat):
    tok, examples = chat
    packed = pack_examples(examples, examples["inputs"].shape[1], tok.pad_id)
    assert len(packed["inputs"]) < len(examples["inputs"])  # rows actually share
    assert packed["loss_mask"].sum() == examples["loss_mask"].sum()
    assert (packed["inputs"] != tok.pad_id).sum() == (examples["inputs"] != tok.pad_id).sum()
    seg, pos = packed["segment_ids"], packed["positions"]
    starts = (seg > 0) & (pos == 0)
    assert starts.sum() == len(examples["inputs"])  # every example once
    # Each example starts where it started unpacked: its BOS (or, if left-truncated, its first kept token).
    assert sorted(packed["inputs"][starts].tolist()) == sorted(examples["inputs"][:, 0].tolist())
    for r in range(len(seg)):
        for s in np.unique(seg[r][seg[r] > 0]):
            where = np.flatnonzero(seg[r] == s)
            assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
            assert np.array_equal(pos[r, where], np.arange(len(where)))


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_packed_loss_equals_unpacked_loss(chat, position):
    tok, examples = chat
    cfg = dataclasses.replace(LEARNED, vocab_size=tok.vocab_size, position=position)
    model = make_model(cfg)
    params = model.init(jax.random.key(0), examples["inputs"][:1])["params"]
    token_bytes = np.ones(tok.vocab_size, np.float32)
    plain = loss_sums(model, params, examples, token_bytes)
    packed = loss_sums(model, params, pack_examples(examples, examples["inputs"].shape[1], tok.pad_id), token_bytes)
    assert float(packed[1]) == float(plain[1])  # the same target tokens
    np.testing.assert_allclose(float(packed[0]), float(plain[0]), rtol=1e-5)


@pytest.mark.slow
def test_run_tiny_sft_with_packing(tmp_path, example_pack):
    from click.testing import CliRunner

    from picochat_jax.cli import main

    res = CliRunner().invoke(main, ["run", "tiny", "--dataset-pack", str(example_pack), "--out-dir",
                                    str(tmp_path / "run"), "--scale", "smoke", "--base-steps", "3", "--sft-steps",
                                    "12", "--no-dpo", "--no-progress", "--set", "sft.packing=bos_bestfit"])
    assert res.exit_code in (0, 1), res.output
    assert "[sft] packed" in res.output
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sft"]["final_loss"] < summary["sft"]["first_loss"]
