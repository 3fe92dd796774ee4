"""Gemma 2 and Gemma 3 (text) through the HF bridge, against transformers' own modelling code on tiny random
models: logits to 1e-4 (sandwich norms, (1 + w) RMSNorm weights, sqrt(d) embeddings, tanh-GELU MLP, per-layer
sliding windows shorter than the prompt, soft-capping, Gemma 3's QK-norm and its local RoPE theta next to a
scaled global RoPE), the KV-cache engine against full forwards, export round trips and PEFT adapters."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

from picochat_jax.hf import export as hf_export
from picochat_jax.hf import families as hf_families
from picochat_jax.hf import io as hf_io
from tests.test_hf_convert import (
    TOKENS,
    _our_logits,
    _save_random,
    _torch_logits,
    assert_cached_greedy_equals_full_forwards,
)

TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=96, vocab_size=256, max_position_embeddings=64, sliding_window=6, pad_token_id=0)


def gemma2_config() -> Gemma2Config:
    cfg = Gemma2Config(**TINY, query_pre_attn_scalar=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    cfg._attn_implementation = "eager"  # transformers' soft-capping runs on its eager path
    return cfg


def gemma3_config() -> Gemma3TextConfig:
    cfg = Gemma3TextConfig(**TINY, query_pre_attn_scalar=16,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1_000_000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    cfg._attn_implementation = "eager"
    return cfg


CASES = {"gemma2": (Gemma2ForCausalLM, gemma2_config), "gemma3_text": (Gemma3ForCausalLM, gemma3_config)}


@pytest.mark.parametrize("family", list(CASES))
def test_import_matches_transformers(family, tmp_path):
    cls, make_cfg = CASES[family]
    ref = _save_random(cls, make_cfg(), tmp_path)
    hf = hf_io.load_hf_model(tmp_path)
    assert hf.family == family
    cfg = hf.config
    assert cfg.sandwich_norm and cfg.embed_scale and cfg.activation == "geglu" and cfg.sliding_window == 6
    assert cfg.sliding_layers == ((True, False, True) if family == "gemma2" else (True, False, True))
    if family == "gemma2":
        assert (cfg.attn_softcap, cfg.logit_softcap, cfg.query_scale) == (5.0, 3.0, 24.0)
    else:
        assert cfg.qk_norm and cfg.rope_local_theta == 10_000.0 and cfg.rope_scaling_dict["factor"] == 2.0
    np.testing.assert_allclose(_our_logits(hf.params, cfg), _torch_logits(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(CASES))
def test_export_round_trip_and_peft_adapter(family, tmp_path):
    from peft import PeftModel

    from picochat_jax.model import lora

    cls, make_cfg = CASES[family]
    base_model = _save_random(cls, make_cfg(), tmp_path / "base")
    hf = hf_io.load_hf_model(tmp_path / "base")
    hf_export.save_hf_model(tmp_path / "again", hf.params, hf.config, family, hf.hf_config)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="eager").eval()
    np.testing.assert_allclose(_torch_logits(again), _torch_logits(base_model), atol=1e-5, rtol=0)
    # A config written from our ModelConfig alone (native export) describes the same model.
    native_cfg = hf_families.hf_config_from_native(hf.config, hf_families.export_family(hf.config),
                                                   {"bos": None, "eos": 1, "pad": 0})
    assert hf_families.config_from_hf(native_cfg) == (family, hf.config)
    lcfg = lora.LoraConfig(rank=2, alpha=4)
    rng = np.random.default_rng(0)
    adapters = {t: {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in ab.items()}
                for t, ab in lora.init_adapters(hf.params, lcfg, jax.random.key(0)).items()}
    hf_export.save_peft_adapter(tmp_path / "adapter", adapters, 2, 4.0, 0.0, 3, family, str(tmp_path / "base"))
    hf_export.save_hf_model(tmp_path / "merged", lora.merge_host(hf.params, adapters, lcfg), hf.config, family,
                            hf.hf_config)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
    np.testing.assert_allclose(_torch_logits(peft_model), _torch_logits(merged), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(CASES))
def test_kv_cache_decoding_matches_the_full_forward(family, tmp_path):
    """Windows per layer, local RoPE and soft-capping also hold in the KV-cache engine: greedy tokens equal the
    argmax of full forwards, for left-padded prompts longer than the window."""
    cls, make_cfg = CASES[family]
    _save_random(cls, make_cfg(), tmp_path)
    assert_cached_greedy_equals_full_forwards(hf_io.load_hf_model(tmp_path))


@pytest.mark.parametrize("family", list(CASES))
def test_continuous_batching_slots_match_the_static_engine(family, tmp_path):
    """Per-row cache slots keep Gemma's per-layer windows and local RoPE: replies equal the static engine's."""
    from picochat_jax.generate import Engine, SamplingParams

    cls, make_cfg = CASES[family]
    _save_random(cls, make_cfg(), tmp_path)
    hf = hf_io.load_hf_model(tmp_path)
    engine = Engine(hf.params, hf.config, max_len=64, max_batch=2, chunk_tokens=4)
    prompts = [TOKENS[0, :20].tolist(), TOKENS[1, :9].tolist()]
    want = [engine.generate([p], SamplingParams(max_new_tokens=10), stop_ids=())[0] for p in prompts]
    slots = engine.slots(stop_ids=())
    slots.admit(0, prompts[0], SamplingParams(max_new_tokens=10))
    got = {0: [], 1: []}
    for new, _ in slots.step().values():
        got[0] += new
    slots.admit(1, prompts[1], SamplingParams(max_new_tokens=10))  # joins mid-reply, at another length
    while slots.active():
        for slot, (new, _) in slots.step().items():
            got[slot] += new
    assert [got[0], got[1]] == want
