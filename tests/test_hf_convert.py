"""The HF bridge against transformers' own PyTorch models: tiny random models built locally, no hub.

Import: our Decoder on converted weights gives transformers' logits (fp32, 1e-4) for every supported family.
Export: a native checkpoint exported and reloaded by stock AutoModelForCausalLM gives our logits, and the
exported tokenizer's apply_chat_template reproduces our native ids.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from picochat_jax.checkpoint import load_model_checkpoint, save_model_checkpoint
from picochat_jax.cli import main
from picochat_jax.config import ModelConfig, available_scales, load_scale
from picochat_jax.data.chat import encode_conversations, encode_prompt
from picochat_jax.data.pack import load_pack
from picochat_jax.data.records import read_chat_jsonl
from picochat_jax.hf import export as hf_export
from picochat_jax.hf import families as hf_families
from picochat_jax.hf import io as hf_io
from picochat_jax.model.transformer import make_model
from picochat_jax.tokenizer import train_tokenizer
from tests.test_generate import greedy_by_full_forwards

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256)
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 40))


def _save_random(cls, cfg, path, dtype=None, **save_kwargs):
    """A random transformers model whose norms and biases are not at their init values, saved to `path`."""
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path, **save_kwargs)
    return model


def _torch_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def _our_logits(params, cfg: ModelConfig, tokens=TOKENS) -> np.ndarray:
    return np.asarray(jax.jit(make_model(cfg).apply)({"params": params}, jnp.asarray(tokens)))


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES = {
    # Llama 3 style: untied, llama3 rope scaling (positions past the original 16 are in the scaled regime).
    "llama3": (LlamaForCausalLM, lambda: LlamaConfig(**SMALL, rope_theta=50000.0, rope_scaling=LLAMA3_ROPE),
               "llama"),
    # SmolLM style: tied embeddings; plus linear rope scaling and Llama's optional biases.
    "llama_tied": (LlamaForCausalLM, lambda: LlamaConfig(**SMALL, tie_word_embeddings=True, attention_bias=True,
                                                         mlp_bias=True, rope_scaling={"rope_type": "linear",
                                                                                      "factor": 2.0}), "llama"),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**SMALL, rope_theta=1e6), "qwen2"),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True), "qwen3"),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**SMALL, sliding_window=64), "mistral"),
    # A real sliding window, shorter than the 40 test tokens: later queries must not see early keys.
    "mistral_window": (MistralForCausalLM, lambda: MistralConfig(**SMALL, sliding_window=8), "mistral"),
    "phi3_window": (Phi3ForCausalLM, lambda: Phi3Config(**SMALL, pad_token_id=0, sliding_window=12), "phi3"),
    # YaRN: interpolated slow dimensions, a ramp, and the attention factor on cos/sin (positions past 16 are
    # in the extended range); mscale/mscale_all_dim as DeepSeek-style configs set them.
    "llama_yarn": (LlamaForCausalLM, lambda: LlamaConfig(**SMALL, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}), "llama"),
    "qwen2_yarn_mscale": (Qwen2ForCausalLM, lambda: Qwen2Config(**SMALL, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8, "mscale": 0.707,
        "mscale_all_dim": 1.0, "beta_fast": 16}), "qwen2"),
    # Dynamic NTK changes nothing inside max_position_embeddings, the context we serve.
    "llama_dynamic": (LlamaForCausalLM, lambda: LlamaConfig(**SMALL, max_position_embeddings=64, rope_scaling={
        "rope_type": "dynamic", "factor": 2.0}), "llama"),
    # Phi-3: fused qkv_proj and gate_up_proj (split on import), GQA, no biases.
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(**SMALL, pad_token_id=0, sliding_window=None), "phi3"),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_matches_transformers(name, tmp_path):
    cls, make_cfg, family = FAMILIES[name]
    ref_model = _save_random(cls, make_cfg(), tmp_path)
    hf = hf_io.load_hf_model(tmp_path)
    assert hf.family == family
    ours = _our_logits(hf.params, hf.config)
    np.testing.assert_allclose(ours, _torch_logits(ref_model), atol=1e-4, rtol=0)


def test_import_reads_config_details(tmp_path):
    _save_random(LlamaForCausalLM, FAMILIES["llama3"][1](), tmp_path / "llama")
    cfg = hf_io.load_hf_model(tmp_path / "llama").config
    assert (cfg.rope_theta, cfg.n_kv_heads, cfg.tie_embeddings, cfg.qk_norm) == (50000.0, 2, False, False)
    assert cfg.rope_scaling_dict["rope_type"] == "llama3" and cfg.rope_scaling_dict["factor"] == 8.0
    _save_random(MistralForCausalLM, FAMILIES["mistral"][1](), tmp_path / "mistral")
    # The window is modelled, so the context stays the model's own.
    mistral = hf_io.load_hf_model(tmp_path / "mistral").config
    assert (mistral.sliding_window, mistral.max_seq_len) == (64, MistralConfig().max_position_embeddings)


def test_legacy_rope_keys_are_read():
    hf = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1,
          "intermediate_size": 128, "vocab_size": 256, "rope_theta": 500000.0,
          "rope_scaling": {"type": "linear", "factor": 4.0}}
    _, cfg = hf_families.config_from_hf(hf)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}


def test_sharded_bf16_checkpoint(tmp_path):
    _save_random(Qwen2ForCausalLM, Qwen2Config(**SMALL), tmp_path, dtype=torch.bfloat16, max_shard_size="50KB")
    assert (tmp_path / hf_io.WEIGHTS_INDEX_NAME).exists()
    hf = hf_io.load_hf_model(tmp_path)
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(hf.params))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()  # same bf16 values, upcast
    np.testing.assert_allclose(_our_logits(hf.params, hf.config), _torch_logits(ref), atol=1e-4, rtol=0)


def test_hub_id_resolves_from_local_cache_only(tmp_path):
    model_dir = tmp_path / "src"
    _save_random(LlamaForCausalLM, LlamaConfig(**SMALL), model_dir)
    # The documented hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--tiny-llama"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hf = hf_io.load_hf_model("acme/tiny-llama", cache_dir=tmp_path / "cache")
    assert hf.path == repo / "snapshots" / commit and hf.family == "llama"
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        hf_io.resolve_model_dir("acme/not-downloaded", cache_dir=tmp_path / "cache")


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}))
    with pytest.raises(ValueError, match="GemmaForCausalLM") as err:
        hf_io.load_hf_model(tmp_path)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in str(err.value)
    with pytest.raises(ValueError, match="longrope"):
        hf_families.config_from_hf({**json.loads(LlamaConfig(**SMALL).to_json_string()),
                                    "rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}})


def test_weights_that_do_not_fit_the_config_are_an_error(tmp_path):
    _save_random(LlamaForCausalLM, LlamaConfig(**SMALL), tmp_path)
    tensors = hf_io.read_safetensors(tmp_path)
    family, cfg = hf_families.config_from_hf(hf_io.read_hf_config(tmp_path))
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.self_attn.k_proj.weight"}
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.weight"):
        hf_families.params_from_hf(missing, cfg, family)
    extra = {**tensors, "model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}
    with pytest.raises(ValueError, match="do not fit the config"):
        hf_families.params_from_hf(extra, cfg, family)


# ------------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def native_tokenizer(tmp_path_factory, example_pack):
    rows = read_chat_jsonl(load_pack(example_pack).chat)
    tok = train_tokenizer([m.content for r in rows for m in r.messages], "bpe", 400, 2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(path)
    return tok, path, rows


def _random_native(cfg: ModelConfig, seed: int = 0):
    """Random params of the Decoder's exact tree; norm scales near 1 and non-zero biases, so a wrong mapping
    cannot hide behind init values. numpy, not jax.random: no per-leaf compiles."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        base = 1.0 if getattr(path[-1], "key", "") == "scale" else 0.0
        return (base + rng.normal(0.0, 0.1, shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, hf_families.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


NATIVE = {
    # smoke/pico/small shape, with GQA and no out bias to exercise the kv-head repeat and zero-bias fill.
    "gpt2": (ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                         norm="layernorm", position="learned", activation="gelu", tie_embeddings=True,
                         qkv_bias=True, out_bias=False, mlp_bias=True), "GPT2LMHeadModel"),
    # h100-pilot shape: rmsnorm, rope, swiglu, qk-norm, GQA, tied.
    "qwen3": (ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                          norm_eps=1e-6, qk_norm=True, tie_embeddings=True, rope_theta=1e5), "Qwen3ForCausalLM"),
    # medium shape: relu^2 exports as Llama with hidden_act relu and gate_proj == up_proj.
    "llama_relu2": (ModelConfig(vocab_size=400, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                                max_seq_len=64, activation="relu2"), "LlamaForCausalLM"),
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_export_loads_in_transformers(name, tmp_path, native_tokenizer):
    cfg, arch = NATIVE[name]
    _, tok_path, _ = native_tokenizer
    params = _random_native(cfg)
    save_model_checkpoint(tmp_path / "ckpt", params, cfg, tok_path, {"stage": "test"})
    result = CliRunner().invoke(main, ["export", "hf", "--checkpoint", str(tmp_path / "ckpt"),
                                       "--out-dir", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    for name_ in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "hf" / name_).exists()
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 30))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(ref).__name__ == arch
    ours = _our_logits(params, cfg, tokens)
    np.testing.assert_allclose(_torch_logits(ref, tokens), ours, atol=1e-4, rtol=0)
    back = hf_io.load_hf_model(tmp_path / "hf")  # and our own importer reads the export back
    np.testing.assert_allclose(_our_logits(back.params, back.config, tokens), ours, atol=1e-5, rtol=0)


def test_every_default_scale_is_exportable():
    expected = {"smoke": "gpt2", "pico": "gpt2", "small": "gpt2", "medium": "llama", "h100-pilot": "qwen3",
                "h100-100m": "qwen3", "h200-1b": "qwen3"}
    got = {name: hf_families.export_family(load_scale(name).model) for name in available_scales()}
    assert {k: got[k] for k in expected if k in got} == {k: v for k, v in expected.items() if k in got}
    assert set(got.values()) <= {"gpt2", "llama", "qwen3"}


def test_inexpressible_native_configs_name_the_option():
    base = NATIVE["qwen3"][0]
    cases = {"parallel_residual": dict(parallel_residual=True), "activation=gelu": dict(activation="gelu"),
             "mlp_bias": dict(mlp_bias=True), "position=learned": dict(position="learned")}
    for needle, change in cases.items():
        cfg = ModelConfig(**{**base.to_dict(), "rope_scaling": None, **change})
        with pytest.raises(ValueError, match=needle):
            hf_families.export_family(cfg)


def test_exported_tokenizer_reproduces_native_chat_ids(tmp_path, native_tokenizer):
    tok, tok_path, rows = native_tokenizer
    hf_export.export_tokenizer(tok_path, tmp_path, 256)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (tok.bos_id, tok.end_id, tok.pad_id)
    native = encode_conversations(rows, tok)
    for row, (ids, _) in zip(rows, native, strict=True):
        messages = [{"role": m.role, "content": m.content} for m in row.messages]
        full = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert list(full) == ids.tolist(), row.line
        prompt = hf_tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                            return_dict=True)["input_ids"]
        assert list(prompt) == encode_prompt(row.messages[:-1], tok).tolist(), row.line


def test_import_cli_writes_a_native_checkpoint(tmp_path):
    _save_random(Qwen3ForCausalLM, FAMILIES["qwen3"][1](), tmp_path / "hf")
    result = CliRunner().invoke(main, ["import", "hf", "--model", str(tmp_path / "hf"),
                                       "--out-dir", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    params, cfg, meta = load_model_checkpoint(tmp_path / "ckpt")
    assert meta["family"] == "qwen3" and cfg.qk_norm and cfg.head_dim == 32
    expected = hf_io.load_hf_model(tmp_path / "hf").params
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
    assert (tmp_path / "ckpt" / "hf_tokenizer").is_dir()


def test_peft_names_and_family_check():
    adapters = {"q_proj": {"a": np.ones((2, 8, 4)), "b": np.zeros((2, 4, 16))},
                "down_proj": {"a": np.ones((2, 32, 4)), "b": np.zeros((2, 4, 8))}}
    tensors, config = hf_export.peft_adapter(adapters, n_layers=2, family="qwen3", rank=4, alpha=8)
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, 8)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (16, 4)
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 32)
    assert len(tensors) == 2 * 2 * 2 and config["target_modules"] == ["down_proj", "q_proj"]
    with pytest.raises(ValueError, match="--peft none"):
        hf_families.check_peft_family("falcon")


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"),
                                     ("v_proj",), ("q_proj", "v_proj", "down_proj")])
def test_gpt2_peft_adapter_equals_our_merge(targets, tmp_path):
    """GPT-2 fuses q/k/v into c_attn: our separate adapters become one block-structured PEFT adapter."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    from picochat_jax.model import lora

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=100, n_positions=32,
                     activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base_model = _save_random(GPT2LMHeadModel, cfg, tmp_path / "base")
    hf = hf_io.load_hf_model(tmp_path / "base")
    lcfg = lora.LoraConfig(rank=3, alpha=6, targets=targets)
    rng = np.random.default_rng(0)
    adapters = {t: {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in ab.items()}
                for t, ab in lora.init_adapters(hf.params, lcfg, jax.random.key(0)).items()}
    hf_export.save_peft_adapter(tmp_path / "adapter", adapters, 3, 6.0, 0.0, 2, "gpt2", str(tmp_path / "base"))
    merged = lora.merge_host(hf.params, adapters, lcfg)
    hf_export.save_hf_model(tmp_path / "merged", merged, hf.config, "gpt2", hf.hf_config)
    tokens = np.random.default_rng(1).integers(0, 100, (2, 20))
    merged_logits = _torch_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), tokens)
    base_logits = _torch_logits(base_model, tokens)  # before PEFT wraps (and so changes) the base in place
    peft_model = PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
    np.testing.assert_allclose(_torch_logits(peft_model, tokens), merged_logits, atol=1e-4, rtol=0)
    assert np.abs(merged_logits - base_logits).max() > 1e-2


def test_phi3_round_trip_and_fused_peft_adapter(tmp_path):
    """A Phi-3 folder comes in split and goes out fused (transformers reads our export to the same logits), and
    our q/k/v and gate/up adapters become one block-structured PEFT adapter per fused module."""
    from peft import PeftModel

    from picochat_jax.model import lora

    base_model = _save_random(Phi3ForCausalLM, Phi3Config(**SMALL, pad_token_id=0, sliding_window=None),
                              tmp_path / "base")
    hf = hf_io.load_hf_model(tmp_path / "base")
    hf_export.save_hf_model(tmp_path / "again", hf.params, hf.config, "phi3", hf.hf_config)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    np.testing.assert_allclose(_torch_logits(again), _torch_logits(base_model), atol=1e-5, rtol=0)
    lcfg = lora.LoraConfig(rank=2, alpha=4)  # all seven projections
    rng = np.random.default_rng(0)
    adapters = {t: {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in ab.items()}
                for t, ab in lora.init_adapters(hf.params, lcfg, jax.random.key(0)).items()}
    hf_export.save_peft_adapter(tmp_path / "adapter", adapters, 2, 4.0, 0.0, 2, "phi3", str(tmp_path / "base"))
    hf_export.save_hf_model(tmp_path / "merged", lora.merge_host(hf.params, adapters, lcfg), hf.config, "phi3",
                            hf.hf_config)
    merged_logits = _torch_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval())
    peft_model = PeftModel.from_pretrained(base_model, tmp_path / "adapter").eval()
    np.testing.assert_allclose(_torch_logits(peft_model), merged_logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="adapt all of"):
        hf_export.peft_adapter({"q_proj": adapters["q_proj"]}, 2, "phi3", 2, 4.0)


def test_sliding_window_decoding_matches_the_full_forward(tmp_path):
    """The KV-cache engine applies the window too: greedy tokens equal the argmax of full forwards, over prompts
    (left-padded to a shared bucket) longer than the window."""
    _save_random(MistralForCausalLM, MistralConfig(**SMALL, sliding_window=6, max_position_embeddings=64),
                 tmp_path)
    assert_cached_greedy_equals_full_forwards(hf_io.load_hf_model(tmp_path))


def assert_cached_greedy_equals_full_forwards(hf: hf_io.HFModel, new_tokens: int = 6) -> None:
    """The KV-cache engine's greedy replies to two left-padded prompts (20 and 13 tokens) equal the argmax of
    full forwards over the growing sequence."""
    from picochat_jax.generate import Engine, SamplingParams

    engine = Engine(hf.params, hf.config, max_len=64, max_batch=2, chunk_tokens=4)
    prompts = [TOKENS[0, :20].tolist(), TOKENS[1, :13].tolist()]
    got = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens), stop_ids=())
    model = make_model(hf.config)
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    width = max(len(p) for p in prompts) + new_tokens
    for prompt, tokens in zip(prompts, got, strict=True):
        assert list(tokens) == greedy_by_full_forwards(lambda ids: forward(hf.params, ids), prompt, new_tokens, width)


def test_check_hf_export_tool_passes_on_a_true_export(load_tool, tmp_path, native_tokenizer, example_pack,
                                                      monkeypatch):
    """tools/check_hf_export.py (run on the proof runs' checkpoints on the GPU machine): on a random qwen3-shaped
    checkpoint the chat-template ids, logits and greedy replies all agree, and a broken export is caught."""
    cfg, _ = NATIVE["qwen3"]
    _, tok_path, _ = native_tokenizer
    save_model_checkpoint(tmp_path / "ckpt", _random_native(cfg), cfg, tok_path, {"stage": "test"})
    tool = load_tool("check_hf_export")
    eval_path = load_pack(example_pack).eval
    report = tool.main(["--checkpoint", str(tmp_path / "ckpt"), "--eval", str(eval_path), "--out-dir",
                        str(tmp_path / "check"), "--prompts", "3", "--max-new-tokens", "8"])
    assert report["passed"], report
    assert report["architecture"] == "Qwen3ForCausalLM" and report["greedy_equal"] == 3
    assert report["logits"]["max_abs_diff"] < 1e-4 and report["logits"]["min_argmax_agree"] == 1.0
    assert all(len(r["ours"]) > 0 for r in report["replies"])
    assert json.loads((tmp_path / "check" / "hf_export_check.json").read_text())["passed"]

    # An export that is wrong by a little (one MLP weight of one layer scaled) must fail the check.
    real = hf_export.params_to_hf

    def skewed(params, cfg_, family):
        tensors = dict(real(params, cfg_, family))
        name = "model.layers.1.mlp.down_proj.weight"
        tensors[name] = tensors[name] * 1.5
        return tensors

    monkeypatch.setattr(hf_export, "params_to_hf", skewed)
    report = tool.check(tmp_path / "ckpt", eval_path, tmp_path / "check_bad", 3, 8, 1e-4)
    assert not report["passed"] and report["logits"]["max_abs_diff"] > 1e-3
