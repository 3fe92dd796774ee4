"""Training: loss falls, sharded steps equal the single-device step, resume replays the exact trajectory."""

from __future__ import annotations

import dataclasses
import os
import signal

import jax
import numpy as np
import pytest

from picochat_jax.config import ModelConfig, load_scale
from picochat_jax.data.loader import BatchSource
from picochat_jax.model.transformer import make_model
from picochat_jax.outdir import OutDirInUse
from picochat_jax.parallel import MeshShape, make_mesh, parse_mesh
from picochat_jax.train.loop import train, training_legs
from picochat_jax.train.optim import make_optimizer
from picochat_jax.train.step import build_trainer

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16,
                   qk_norm=True)
TRAIN = dataclasses.replace(load_scale("smoke").base, steps=8, batch_size=8, grad_accum_steps=2, warmup_steps=2,
                            log_every=1, eval_every=4, checkpoint_every=0, learning_rate=1e-2)


def _examples(n: int = 64, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # A learnable stream: token t+1 = (token t + 1) mod 64, with segment boundaries every 8 tokens.
    start = rng.integers(0, 64, (n, 1))
    stream = (start + np.arange(seq + 1)) % 64
    return {"inputs": stream[:, :-1].astype(np.int32), "targets": stream[:, 1:].astype(np.int32),
            "loss_mask": np.ones((n, seq), np.float32),
            "segment_ids": np.repeat(np.arange(seq // 8), 8)[None].repeat(n, 0).astype(np.int32)}


def _one_step(mesh_shape: MeshShape, cfg: ModelConfig = TINY, model=None):
    model = make_model(cfg) if model is None else model
    tx, schedule = make_optimizer(TRAIN)
    trainer = build_trainer(model, tx, schedule, np.ones(model.cfg.vocab_size), make_mesh(mesh_shape))
    state = trainer.init(jax.random.key_data(jax.random.key(0)))
    batch = BatchSource(_examples(), TRAIN.batch_size, TRAIN.grad_accum_steps, seed=0).batch(0)
    state, metrics = trainer.step(state, trainer.put_batch(batch))
    return jax.device_get(state.params), jax.device_get(metrics)


def test_parse_mesh():
    assert parse_mesh(None, 8) == MeshShape(8, 1, 1)
    assert parse_mesh("2x4", 8) == MeshShape(2, 4, 1)
    assert parse_mesh("1x4x2", 8) == MeshShape(1, 4, 2)
    with pytest.raises(ValueError, match="needs 4 devices but 8"):
        parse_mesh("2x2", 8)
    with pytest.raises(ValueError, match="DATAxFSDP"):
        parse_mesh("eight", 8)


@pytest.mark.slow
def test_sharded_step_matches_single_device():
    assert jax.device_count() == 8, "conftest should give 8 CPU devices"
    ref_params, ref_metrics = _one_step(MeshShape(1, 1, 1))
    for shape in (MeshShape(1, 8, 1), MeshShape(2, 4, 1), MeshShape(1, 4, 2)):
        params, metrics = _one_step(shape)
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
        jax.tree_util.tree_map(_assert_same_adam_step, params, ref_params)


def _assert_same_adam_step(a: np.ndarray, b: np.ndarray) -> None:
    """Params after the same AdamW steps agree to 1e-5, but for at most 0.1% of elements (none beyond 1e-4).

    Adam's update is about g / (|g| + eps) times the learning rate: an element whose gradient is near eps turns
    summation-order noise (sharded against single-device sums, or rows cut shorter against full rows) into a
    visible difference. On 2026-12-01 one gate_proj element of 4,096 differed by 1.4e-5 on every mesh, and one
    of 4,096 by 2.0e-5 between cut and full rows under unoptimised XLA:CPU code; a bug moves far more, far
    further.
    """
    diff = np.abs(np.asarray(a) - np.asarray(b))
    assert (diff > 1e-5).mean() <= 1e-3 and diff.max() <= 1e-4, (diff.max(), int((diff > 1e-5).sum()), diff.size)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_split_swiglu_backward_gives_the_packed_gradients(remat):
    """ops.swiglu_gate_up (d_gate and d_up kept apart: the GPU's choice where the Mosaic kernel takes no such
    shape) differentiates like autodiff through the packed gate/up matmul, for every param, rolled and under each
    remat policy."""
    model = make_model(TINY, remat=remat)
    params = model.init(jax.random.key(0), np.zeros((2, 16), np.int32))["params"]
    tokens = _examples(2)["inputs"]
    probe = np.random.default_rng(1).standard_normal((2, 16, TINY.vocab_size)).astype(np.float32)

    def grads(impl):
        variant = model.clone(swiglu_grad_impl=impl)
        loss = lambda p: (variant.apply({"params": p}, tokens) * probe).sum()  # noqa: E731
        return jax.make_jaxpr(loss)(params), jax.grad(loss)(params)

    (packed_jaxpr, packed), (split_jaxpr, split) = grads("packed"), grads("split")
    assert "swiglu_gate_up" in str(split_jaxpr) and "swiglu_gate_up" not in str(packed_jaxpr)
    flat_split = dict(jax.tree_util.tree_leaves_with_path(split))
    for path, a in jax.tree_util.tree_leaves_with_path(packed):
        b = flat_split[path]
        assert np.abs(a).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max(), err_msg=jax.tree_util.keystr(path))


def test_split_swiglu_backward_on_a_data_fsdp_mesh_takes_the_single_device_step():
    packed, packed_metrics = _one_step(MeshShape(1, 1, 1), model=make_model(TINY).clone(swiglu_grad_impl="packed"))
    split, split_metrics = _one_step(MeshShape(2, 4, 1), model=make_model(TINY).clone(swiglu_grad_impl="split"))
    for key in ("loss", "grad_norm"):
        assert float(split_metrics[key]) == pytest.approx(float(packed_metrics[key]), rel=1e-5), key
    jax.tree_util.tree_map(_assert_same_adam_step, split, packed)


def test_params_are_actually_sharded_on_the_mesh():
    model = make_model(TINY)
    tx, schedule = make_optimizer(TRAIN)
    trainer = build_trainer(model, tx, schedule, np.ones(64), make_mesh(MeshShape(1, 4, 2)))
    state = trainer.init(jax.random.key_data(jax.random.key(0)))
    q = state.params["layers"]["attn"]["q_proj"]["kernel"]  # (layers, embed, heads) -> (None, fsdp, tensor)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 8, 16)
    mu = state.opt_state[1][0].mu["layers"]["attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == q.sharding.spec


def test_fsdp_step_gathers_params_and_never_moves_whole_batch_activations():
    """On a pure-FSDP mesh XLA must gather each layer's params, not all-gather/all-reduce (batch, seq, ...)
    activations (which it did before the model pinned activations to the batch axes)."""
    import re

    model = make_model(TINY, precision="bf16")
    tx, schedule = make_optimizer(TRAIN)
    trainer = build_trainer(model, tx, schedule, np.ones(64), make_mesh(MeshShape(1, 8, 1)))
    micro, seq = TRAIN.batch_size, 16
    sharding = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp")))
    batch = {k: jax.ShapeDtypeStruct((TRAIN.grad_accum_steps, micro, seq), dtype, sharding=sharding)
             for k, dtype in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                              ("segment_ids", np.int32)]}
    hlo = trainer.step.lower(trainer.abstract_state(), batch).compile().as_text()
    moved = re.findall(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\(", hlo)
    assert any(op == "all-gather" for _, op in moved), "FSDP should all-gather params"
    whole_batch = [f"{op}: {types[:80]}" for types, op in moved if re.search(rf"\[{micro},{seq}[,\]]", types)]
    assert not whole_batch, whole_batch


def _padded_chat_rows(n: int = 64, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows like native SFT's: real tokens then padding (id 0, no loss), 3 to 7 real positions a row, so every
    batch's rows end by position 8 and trim to half the row."""
    rng = np.random.default_rng(seed)
    rows = _examples(n, seq, seed)
    lengths = rng.integers(3, 8, n)
    real = np.arange(seq)[None, :] < lengths[:, None]
    return {"inputs": np.where(real, rows["inputs"], 0).astype(np.int32),
            "targets": np.where(real, rows["targets"], 0).astype(np.int32),
            "loss_mask": (real & (np.arange(seq)[None, :] >= 1)).astype(np.float32)}


def test_trim_trailing_padding_cuts_to_a_bucket_and_keeps_everything_else():
    from picochat_jax.data.loader import kept_tokens, resolve_length_buckets, trim_trailing_padding

    batch = BatchSource(_padded_chat_rows(), 8, 2, seed=0).batch(0)
    trimmed = trim_trailing_padding(batch, 2)
    assert {k: v.shape for k, v in trimmed.items()} == {k: (2, 8, 8) for k in batch}
    for k in batch:
        np.testing.assert_array_equal(trimmed[k], batch[k][..., :8])
        assert not batch[k][..., 8:].any(), k  # only padding was cut
    assert trim_trailing_padding(batch, 1) is batch
    assert trim_trailing_padding(batch, 16)["inputs"].shape[-1] == 7  # the last loss position is 6
    # throughput counts the positions that ran: half of each 16-token row after cutting to 8
    assert kept_tokens(batch, trimmed, 2 * 8 * 16) == 2 * 8 * 8 and kept_tokens(batch, batch, 256) == 256
    full = BatchSource(_examples(), 8, 2, seed=0).batch(0)  # loss on every position: nothing to cut
    assert trim_trailing_padding(full, 4) is full
    pairs = {"chosen_inputs": np.zeros((1, 2, 16), np.int32)}  # preference pairs carry no loss_mask
    assert trim_trailing_padding(pairs, 4) is pairs
    assert resolve_length_buckets(None, "cpu") == 2 and resolve_length_buckets(None, "gpu") == 1
    assert resolve_length_buckets(3, "gpu") == 3
    with pytest.raises(ValueError, match="length_buckets"):
        dataclasses.replace(TRAIN, length_buckets=0)


def test_trimmed_batches_train_the_same_trajectory(tmp_path, monkeypatch):
    """The driver with length buckets computes shorter rows and the same losses and params as full rows."""
    from picochat_jax.train import loop

    rows = _padded_chat_rows()
    widths = []
    trim = loop.trim_trailing_padding

    def recording(batch, buckets):
        out = trim(batch, buckets)
        widths.append(out["inputs"].shape[-1])
        return out

    monkeypatch.setattr(loop, "trim_trailing_padding", recording)

    def run(name, buckets):
        cfg = dataclasses.replace(TRAIN, steps=3, eval_every=0, length_buckets=buckets)
        return train(stage="sft", model_cfg=TINY, train_cfg=cfg, train_rows=rows, val_rows=None,
                     out_dir=tmp_path / name, mesh_shape=MeshShape(1, 1, 1), token_bytes=np.ones(64),
                     tokenizer_path=None, progress=False)

    full, trimmed = run("full", 1), run("trimmed", 2)
    assert widths == [16] * 3 + [8] * 3
    np.testing.assert_allclose([r["loss"] for r in trimmed.history], [r["loss"] for r in full.history], rtol=1e-5)
    np.testing.assert_allclose([r["bpb"] for r in trimmed.history], [r["bpb"] for r in full.history], rtol=1e-5)
    jax.tree_util.tree_map(_assert_same_adam_step, trimmed.params, full.params)  # Adam's eps: see its docstring


def _run(out_dir, steps_cfg, **kw):
    return train(stage="base", model_cfg=TINY, train_cfg=steps_cfg, train_rows=_examples(),
                 val_rows=_examples(16, seed=1), out_dir=out_dir, mesh_shape=MeshShape(1, 1, 1),
                 token_bytes=np.ones(64), tokenizer_path=None, progress=False, **kw)


@pytest.mark.slow
def test_loss_falls_and_resume_continues_the_exact_trajectory(tmp_path):
    full = _run(tmp_path / "full", TRAIN)
    losses = [r["loss"] for r in full.history]
    assert len(losses) == TRAIN.steps
    assert losses[-1] < 0.75 * losses[0]
    assert full.val_history and (tmp_path / "full" / "best_checkpoint" / "model_config.json").exists()

    part = _run(tmp_path / "part", TRAIN, should_stop=lambda step: step == 3)
    assert part.status == "interrupted" and part.final_step == 3
    with pytest.raises(OutDirInUse, match="--resume"):
        _run(tmp_path / "part", TRAIN)
    other = dataclasses.replace(TRAIN, learning_rate=TRAIN.learning_rate * 2, seed=TRAIN.seed + 1)
    with pytest.raises(ValueError, match=r"train\.learning_rate: .*; train\.seed: "):
        _run(tmp_path / "part", other, resume=True)  # names every differing key, restores and writes nothing
    with (tmp_path / "part" / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "lo')  # a kill mid-write: the torn line is dropped with a warning
    with pytest.warns(UserWarning, match="torn last line"):
        resumed = _run(tmp_path / "part", TRAIN, resume=True)
    assert resumed.status == "completed"
    resumed_losses = [r["loss"] for r in resumed.history]  # history reloaded from metrics.jsonl + new steps
    np.testing.assert_allclose(resumed_losses, losses, rtol=1e-6)
    np.testing.assert_allclose(resumed.val_history[-1]["val_loss"], full.val_history[-1]["val_loss"], rtol=1e-6)
    # The summary covers both legs: clocks summed, throughput over each leg's windows after its compile window.
    assert [r["leg"] for r in resumed.history] == [1, 1, 1] + [2] * 5
    assert resumed.summary["wall_sec"] > part.summary["wall_sec"]
    steady = [r["tokens_per_sec"] for r in resumed.history if r["step"] not in (1, 4)]
    assert resumed.summary["tokens_per_sec"] == pytest.approx(float(np.mean(steady)))


def test_training_legs_split_at_each_process_and_drop_its_compile_window():
    rows = [{"step": s, "tokens_per_sec": 10.0 * s, "elapsed_sec": e, "leg": leg}
            for s, e, leg in [(1, 9.0, 1), (2, 9.5, 1), (3, 10.0, 1), (4, 12.0, 2), (5, 12.5, 2)]]
    # the second process compiled for longer than the first ran: its clock never went back, its leg number did
    assert [[r["step"] for r in leg] for leg in training_legs(rows)] == [[2, 3], [5]]
    old_files = [{k: v for k, v in r.items() if k != "leg"} for r in rows]
    old_files[3]["elapsed_sec"] = 1.0  # rows written before legs were numbered: a clock restart opens a leg
    assert [[r["step"] for r in leg] for leg in training_legs(old_files)] == [[2, 3], [5]]


@pytest.mark.slow
def test_sigterm_saves_a_resume_checkpoint_and_stops(tmp_path):
    def send_sigterm(step: int) -> bool:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what a preempting scheduler does
        return False

    result = _run(tmp_path / "run", TRAIN, should_stop=send_sigterm)
    # the flag is seen at the next step boundary: one more step runs, then the checkpoint is saved
    assert result.status == "interrupted" and result.final_step == 3
    from picochat_jax.train.checkpoint import ResumeManager

    assert ResumeManager(tmp_path / "run" / "resume_checkpoint", 2).latest_step() == 3


@pytest.mark.slow
def test_resuming_a_finished_run_is_a_no_op(tmp_path):
    first = _run(tmp_path / "run", TRAIN)
    again = _run(tmp_path / "run", TRAIN, resume=True)
    assert again.status == "completed" and again.final_step == TRAIN.steps
    assert [r["loss"] for r in again.history] == [r["loss"] for r in first.history]
    assert len(again.val_history) == len(first.val_history)  # no duplicate evaluation rows


def test_eval_batches_count_every_validation_row_once():
    from picochat_jax.data.loader import eval_batches

    examples = _examples(n=5)
    batches = eval_batches(examples, batch_size=4, max_batches=10)
    assert len(batches) == 2 and all(b["inputs"].shape == (1, 4, 16) for b in batches)
    counted = sum(float(b["loss_mask"].sum()) for b in batches)
    assert counted == float(examples["loss_mask"].sum())


def test_sft_stage_resamples_its_train_rows_by_category(tmp_path):
    """`sft.sampling: balanced` gives each category the same share of an epoch (the biggest keeps one copy of
    each row, smaller ones are repeated) and the run records it as a setting a resume must match."""
    from picochat_jax.data.records import Conversation, Message
    from picochat_jax.pipeline import sft_stage
    from picochat_jax.tokenizer import train_tokenizer

    tok = train_tokenizer(["question answer words"] * 10, "byte", 0)
    convs = [Conversation((Message("user", f"q{i}"), Message("assistant", f"a{i}")), "big" if i < 12 else "small")
             for i in range(15)]
    cfg = dataclasses.replace(load_scale("smoke").sft, steps=2, batch_size=8, val_fraction=0.0, sampling="balanced",
                              eval_every=0, checkpoint_every=0)
    model_cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32,
                            max_seq_len=32)
    result = sft_stage(model_cfg, cfg, tok, None, convs, None, tmp_path / "sft", MeshShape(1, 1, 1), progress=False)
    assert result.summary["train_examples"] == 24  # 12 big rows once, 3 small rows 4 times each
    with pytest.raises(ValueError, match="train.sampling: 'balanced' -> 'sqrt'"):
        sft_stage(model_cfg, dataclasses.replace(cfg, sampling="sqrt", steps=3), tok, None, convs, None,
                  tmp_path / "sft", MeshShape(1, 1, 1), progress=False, resume=True)
