"""DPO: response-only log-probs, the loss formula, a frozen reference, and a margin that actually grows."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from picochat_jax.checkpoint import load_model_checkpoint, save_model_checkpoint
from picochat_jax.cli import main
from picochat_jax.config import ModelConfig
from picochat_jax.data.chat import preference_examples
from picochat_jax.data.records import Message, PreferenceRow
from picochat_jax.model.transformer import init_params, make_model
from picochat_jax.tokenizer import train_tokenizer
from picochat_jax.train.dpo import dpo_losses, pair_logps, sequence_logps

PROMPTS = ["Can you help me plan a picnic?", "Will you check my essay?", "Could you explain rainbows?",
           "Can you suggest a book?", "Would you review my code?", "Can you name a river?",
           "Could you teach me a word?", "Will you share a recipe?"]


def _rows() -> list[PreferenceRow]:
    return [PreferenceRow((Message("user", p),), chosen="Yes, gladly. Here is how.", rejected="No. Go away.",
                          line=i + 1) for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["x"], "byte", 0)


@pytest.fixture(scope="module")
def tiny_cfg(tok) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=64,
                       max_seq_len=96, norm="layernorm", position="learned", activation="gelu", tie_embeddings=True)


def test_mask_covers_exactly_the_response(tok):
    rows = _rows()
    ex, truncated = preference_examples(rows, tok, max_seq_len=96)
    assert truncated == 0 and ex["chosen_inputs"].shape == ex["rejected_inputs"].shape
    for side in ("chosen", "rejected"):
        for i, row in enumerate(rows):
            masked = ex[f"{side}_targets"][i][ex[f"{side}_mask"][i] > 0]
            assert tok.decode(masked.tolist(), skip_special_tokens=False) == getattr(row, side) + "<|end|>"
            # everything before the response (bos, role tokens, the prompt) is context only
            prompt_len = len(tok.encode(row.prompt[0].content)) + 3
            assert ex[f"{side}_mask"][i][: prompt_len - 1].sum() == 0


def test_loss_formula_and_reference_equality():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(size=5) * 3) for _ in range(4))
    losses, parts = dpo_losses(pc, pr, rc, rr, beta=0.2)
    z = 0.2 * ((np.asarray(pc) - np.asarray(rc)) - (np.asarray(pr) - np.asarray(rr)))
    np.testing.assert_allclose(losses, np.log1p(np.exp(-z)), rtol=1e-5)
    np.testing.assert_allclose(parts["margin"], z / 0.2, rtol=1e-5)
    same, _ = dpo_losses(pc, pr, pc, pr, beta=0.2)  # policy == reference: no preference yet
    np.testing.assert_allclose(same, math.log(2), rtol=1e-6)


def test_sequence_logps_sum_response_tokens_only(tok, tiny_cfg):
    model = make_model(tiny_cfg)
    params = init_params(model, jax.random.key(1))
    ex, _ = preference_examples(_rows()[:2], tok, 96)
    batch = {k: jnp.asarray(v) for k, v in ex.items()}
    chosen, rejected = jax.jit(lambda p, b: pair_logps(model, p, b))(params, batch)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, batch["chosen_inputs"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picked = np.take_along_axis(logp, ex["chosen_targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(chosen, (picked * ex["chosen_mask"]).sum(-1), rtol=1e-4)
    direct = jax.jit(lambda p, b: sequence_logps(model, p, b["rejected_inputs"], b["rejected_targets"],
                                                 b["rejected_mask"]))(params, batch)
    np.testing.assert_allclose(rejected, direct, rtol=1e-5)


def _margin(model, params, ex) -> float:
    c, r = jax.jit(lambda p, b: pair_logps(model, p, b))(params, {k: jnp.asarray(v) for k, v in ex.items()})
    return float(jnp.mean(c - r))


@pytest.mark.slow
def test_train_dpo_command_raises_the_chosen_rejected_margin(tmp_path, tok, tiny_cfg):
    model = make_model(tiny_cfg)
    params = init_params(model, jax.random.key(0))
    tok.save(tmp_path / "tokenizer.json")
    save_model_checkpoint(tmp_path / "sft", params, tiny_cfg, tmp_path / "tokenizer.json", {"stage": "sft"})
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": r.prompt[0].content, "chosen": r.chosen, "rejected": r.rejected})
                             + "\n" for r in _rows()))
    out = tmp_path / "dpo"
    result = CliRunner().invoke(main, ["train", "dpo", "--checkpoint", str(tmp_path / "sft"), "--input", str(prefs),
                                       "--out-dir", str(out), "--steps", "12", "--batch-size", "8",
                                       "--learning-rate", "3e-3", "--beta", "0.1", "--no-progress"])
    assert result.exit_code == 0, result.output
    for name in ("checkpoint/model_config.json", "best_checkpoint/tokenizer.json", "metrics.jsonl", "summary.json",
                 "resume_checkpoint"):
        assert (out / name).exists(), name
    s = json.loads((out / "summary.json").read_text())
    assert s["before"]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # reference == starting policy
    assert s["after"]["reward_accuracy"] == 1.0 and s["final_loss"] < s["first_loss"]

    # Independently of the trainer's own bookkeeping: the saved model prefers "chosen" more than the start did.
    trained, cfg, meta = load_model_checkpoint(out / "checkpoint")
    assert cfg == tiny_cfg and meta["stage"] == "dpo" and meta["beta"] == 0.1
    ex, _ = preference_examples(_rows(), tok, 96)
    before, after = _margin(model, params, ex), _margin(model, trained, ex)
    assert after > before + 1.0
    assert s["after"]["logp_margin"] == pytest.approx(after, rel=1e-3)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 12 and all(math.isfinite(r.get("loss", 0)) for r in rows)


@pytest.mark.slow
def test_dpo_accumulates_gradients_and_shards_like_one_big_batch(tmp_path, tok, tiny_cfg):
    """DPO runs on the one trainer: 2 micro-batches of 4 on a 2x1 mesh take the same steps as one batch of 8 on
    one device (the same 8 pairs per step, the loss a mean over all of them)."""
    import dataclasses

    from picochat_jax.config import DPOConfig, load_scale
    from picochat_jax.parallel import MeshShape
    from picochat_jax.train.dpo import dpo_train_config, train_dpo

    params = init_params(make_model(tiny_cfg), jax.random.key(0))
    base = dpo_train_config(load_scale("smoke").sft, DPOConfig(), steps=4, learning_rate=3e-3)
    runs = {}
    for name, batch, accum, mesh in (("one", 8, 1, MeshShape(1, 1, 1)), ("accum_mesh", 4, 2, MeshShape(2, 1, 1))):
        cfg = dataclasses.replace(base, batch_size=batch, grad_accum_steps=accum, log_every=1, eval_every=0)
        runs[name] = train_dpo(model_cfg=tiny_cfg, train_cfg=cfg, dpo_cfg=DPOConfig(0.1), tok=tok, rows=_rows(),
                               init_params=params, out_dir=tmp_path / name, mesh_shape=mesh, tokenizer_path=None,
                               progress=False)
    losses = {k: [json.loads(x)["loss"] for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in x] for k in runs}
    assert len(losses["one"]) == 4
    np.testing.assert_allclose(losses["accum_mesh"], losses["one"], rtol=2e-5)
    assert runs["accum_mesh"].summary["after"]["loss"] == pytest.approx(runs["one"].summary["after"]["loss"], rel=1e-4)
