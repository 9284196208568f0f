"""Config layering and every validation error, through the library and the CLI."""

from __future__ import annotations

import tomllib

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.config import Config, available_presets, config_from_dict, load_config, parse_override
from llmctl.errors import ConfigError


def test_layers_defaults_then_preset_then_set():
    defaults = Config()
    assert defaults.pretrain.lr == 3e-4 and defaults.pretrain.warmup_steps == 500
    assert defaults.pretrain.weight_decay == 0.1 and defaults.pretrain.betas == [0.9, 0.999]
    assert defaults.pretrain.grad_clip == 1.0
    assert defaults.pretrain.eval_every == 500 and defaults.pretrain.save_every == 2000

    tiny = load_config("tiny")
    assert tiny.model.d_model == 64  # from the preset
    assert tiny.pretrain.weight_decay == 0.1  # untouched default

    cfg = load_config("tiny", ["pretrain.lr=0.01", "model.n_layers=3", 'data.datasets=["text:a.txt:5"]',
                               "run.device=cpu"], run_name="mine")
    assert cfg.pretrain.lr == 0.01 and cfg.model.n_layers == 3
    assert cfg.data.datasets == ["text:a.txt:5"]
    assert cfg.run.device == "cpu"  # bare word falls back to a string
    assert cfg.run.name == "mine"


def test_presets_exist_with_promised_shapes():
    assert {"tiny", "local", "gpu"} <= set(available_presets())
    local, gpu = load_config("local"), load_config("gpu")
    assert local.data.datasets == ["wikitext-2-raw-v1"] and local.pretrain.batch_size == 64
    assert gpu.pretrain.batch_size == 128 and gpu.run.dtype == "bfloat16"
    assert len(gpu.data.datasets) >= 3 and any(":" in d for d in gpu.data.datasets)


def test_int_accepted_for_float_and_default_run_name():
    cfg = load_config("tiny", ["pretrain.lr=1"])
    assert cfg.pretrain.lr == 1.0 and isinstance(cfg.pretrain.lr, float)
    assert cfg.run.name.startswith("tiny-")


def test_toml_round_trip():
    cfg = load_config("gpu", run_name="r")
    assert config_from_dict(tomllib.loads(cfg.to_toml())) == cfg


def test_a_retired_key_is_unknown_to_users_and_dropped_from_saved_configs(tmp_path):
    preset = tmp_path / "old.toml"
    preset.write_text("[data]\ntokenizer_min_count = 0\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.tokenizer_min_count' in .*old.toml"):
        load_config(str(preset))
    # what a checkpoint or config.toml written before the key's removal holds
    saved = load_config("tiny", run_name="old").to_dict()
    for value in (0, 1):
        saved["data"]["tokenizer_min_count"] = value
        cfg = config_from_dict(saved)
        assert not hasattr(cfg.data, "tokenizer_min_count") and cfg == load_config("tiny", run_name="old")
    assert saved["data"]["tokenizer_min_count"] == 1  # the caller's dict is left as it was
    with pytest.raises(ConfigError, match="unknown config key 'data.tokenizer_max_count' in saved config"):
        config_from_dict({"data": {"tokenizer_max_count": 1}})  # only the retired keys are forgiven


def test_parse_override_reads_toml_else_string():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=hello world") == ("a.b", "hello world")
    assert parse_override("a.b=true") == ("a.b", True)


@pytest.mark.parametrize("override, fragment", [
    ("pretrain.lr=0", "pretrain.lr must be > 0"),
    ("pretrain.lr=-1e-3", "pretrain.lr must be > 0"),
    ("pretrain.lr=fast", "pretrain.lr expects a number"),
    ("pretrain.max_steps=1.5", "pretrain.max_steps expects an integer"),
    ("pretrain.micro_batch_size=5", "must be divisible by pretrain.micro_batch_size"),
    ("pretrain.batch_size=0", "pretrain.batch_size must be >= 1"),
    ("pretrain.warmup_steps=-1", "pretrain.warmup_steps must be >= 0"),
    ("pretrain.betas=[0.9]", "pretrain.betas must be two numbers"),
    ("pretrain.lr_schedule=linear", "pretrain.lr_schedule must be one of"),
    ("pretrain.optimizer=sgd", "pretrain.optimizer must be one of adamw, muon"),
    ("pretrain.optimizer=muon run.distributed=fsdp", "which run.distributed = \"fsdp\" shards"),
    ("pretrain.lrr=1", "unknown config key 'pretrain.lrr'"),
    ("pretrian.lr=1", "unknown config section 'pretrian'"),
    ("model.n_heads=5", "must be divisible by model.n_heads"),
    ("model.n_kv_heads=3", "must be divisible by model.n_kv_heads"),
    ("model.use_attention_sinks=1", "model.use_attention_sinks expects a boolean"),
    ("run.dtype=float8", "run.dtype must be one of"),
    ("run.device=tpu", "run.device must be"),
    ("run.name=a/b", "run.name must be a plain directory name"),
    ("data.datasets=[]", "data.datasets is empty"),
    ("data.datasets=wikitext", "data.datasets expects a list of strings"),
    ("data.validation_fraction=0.9", "data.validation_fraction must be in"),
    ("eval.max_tokens=-5", "eval.max_tokens must be >= 0"),
    ("lr=1", "must be section.key"),
    ("pretrain.lr", "is not of the form section.key=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", override.split())
    assert fragment in str(e.value)


def test_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'pretrain.max_steps'"):
        load_config("tiny", ["pretrain.max_step=3"])
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tinny")


def test_preset_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="preset file not found"):
        load_config(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain\nlr = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[model]\nwidth = 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.width'"):
        load_config(str(unknown))
    good = tmp_path / "mine.toml"
    good.write_text("[model]\nd_model = 32\nn_heads = 2\n")
    assert load_config(str(good)).model.d_model == 32


@pytest.mark.parametrize("args, fragment", [
    (["--set", "pretrain.lr=-1"], "pretrain.lr must be > 0"),
    (["--set", "pretrain.micro_batch_size=7"], "divisible"),
    (["--set", "nope.key=1"], "unknown config section 'nope'"),
    (["--set", "data.tokenizer_min_count=1"], "unknown config key 'data.tokenizer_min_count' in --set"),
    (["--preset", "nonexistent"], "unknown preset 'nonexistent'"),
])
def test_cli_config_errors_are_one_line_exit_2_and_create_nothing(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["pretrain", "--preset", "tiny", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
