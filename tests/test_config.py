"""The config tree: configs/base.yaml is the one place for defaults, unknown keys are errors naming the nearest
valid key, `--scale` takes a name or a YAML path, and `--set KEY.SUB=VALUE` overrides any key."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from picochat_jax.cli import main
from picochat_jax.config import (
    DPOConfig,
    HFSFTConfig,
    PerfConfig,
    ServeConfig,
    available_scales,
    load_defaults,
    load_scale,
)


def test_base_yaml_sections_equal_the_dataclass_defaults():
    """The library's keyword defaults and the YAML must not drift apart."""
    d = load_defaults()
    assert (d.dpo, d.hf_sft, d.serve, d.perf) == (DPOConfig(), HFSFTConfig(), ServeConfig(), PerfConfig())


@pytest.mark.parametrize("name", available_scales())
def test_every_shipped_scale_loads_strictly(name):
    cfg = load_scale(name)
    assert cfg.name == name and cfg.to_dict()["dpo"]["beta"] > 0


@pytest.mark.parametrize(("override", "message"), [
    ({"sfft": {"steps": 3}}, "unknown config key 'sfft'; did you mean 'sft'?"),
    ({"base": {"learnig_rate": 1e-3}}, "unknown config key 'base.learnig_rate'; did you mean 'base.learning_rate'?"),
    ({"train": {"stpes": 3}}, "unknown config key 'train.stpes'; did you mean 'train.steps'?"),
    ({"model": {"d_modle": 64}}, "unknown config key 'model.d_modle'; did you mean 'model.d_model'?"),
    ({"serve": {"max_batches": 4}}, "did you mean 'serve.max_batch'?"),
    ({"dpo": {"beta": -1}}, "dpo.beta must be > 0"),
])
def test_a_scale_yaml_with_a_bad_key_is_refused(tmp_path, override, message):
    raw = yaml.safe_load((load_scale.__globals__["CONFIG_DIR"] / "smoke.yaml").read_text())
    for key, value in override.items():
        raw[key] = {**(raw.get(key) or {}), **value}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace(".", r"\.")):
        load_scale(str(path))


def test_scale_accepts_a_yaml_path_and_set_overrides_any_key(tmp_path):
    path = tmp_path / "custom.yaml"
    model = {"vocab_size": 264, "d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 4, "d_ff": 64,
             "max_seq_len": 64}
    path.write_text(yaml.safe_dump({"name": "custom", "base": {"steps": 11}, "model": model,
                                    "tokenizer": {"kind": "byte", "vocab_size": 264}}))
    cfg = load_scale(str(path), ["sft.learning_rate=1e-4", "dpo.beta=0.25", "perf.ce_chunk_tokens=4096",
                                 "serve.max_prompt_tokens=null", "model.n_layers=2"])
    assert cfg.name == "custom" and cfg.base.steps == 11 and cfg.sft.learning_rate == 1e-4
    assert cfg.dpo.beta == 0.25 and cfg.perf.ce_chunk_tokens == 4096 and cfg.model.n_layers == 2
    with pytest.raises(ValueError, match="did you mean 'dpo.beta'"):
        load_scale("smoke", ["dpo.betta=0.2"])
    with pytest.raises(ValueError, match="--set expects KEY.SUB=VALUE"):
        load_scale("smoke", ["dpo.beta"])
    with pytest.raises(ValueError, match="unknown scale 'nope'"):
        load_scale("nope")


def test_cli_refuses_a_misspelled_set_before_doing_anything(tmp_path, example_pack):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "tiny", "--dataset-pack", str(example_pack), "--out-dir", str(out),
                                       "--scale", "smoke", "--set", "sfft.steps=2"])
    assert result.exit_code == 2 and "did you mean 'sft'" in result.output, result.output
    assert not out.exists()


def test_flag_defaults_come_from_the_config_tree():
    hf_help = " ".join(CliRunner().invoke(main, ["train", "hf-sft", "--help"]).output.split())
    assert "hf_sft.max_steps in the config tree, 200" in hf_help
    serve_help = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    assert "serve.max_request_bytes in the config tree, 1048576" in serve_help
