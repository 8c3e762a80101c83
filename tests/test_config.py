"""Config loading: YAML + dotted overrides into typed dataclasses, one-line errors naming the key."""

import dataclasses
import re
from pathlib import Path

import pytest

from icegrt_jax.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
)
from icegrt_jax.config_loader import config_to_yaml, load_config
from icegrt_jax.data.templates import TEMPLATES
from icegrt_jax.data.tokenize import TRUNCATION_POLICIES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = ["model.preset=tiny", "data.tokenizer_path=tok"]


def write_yaml(tmp_path, text):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return str(path)


def load_error(path=None, overrides=()):
    with pytest.raises(ConfigError) as error:
        load_config(SFTConfig, path, list(overrides))
    assert "\n" not in str(error.value)
    return str(error.value)


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    path = write_yaml(tmp_path, "model:\n  preset: tiny\noptimizer:\n  lr: 2e-5\n  warmup_steps: 7\n"
                                "data:\n  tokenizer_path: tok\n  train_files: [a.jsonl]\n")
    overrides = ["optimizer.warmup_steps=9", "data.train_files=[b.jsonl,c.jsonl]",
                 "training.steps=null", "mesh.rules=[[batch,data,fsdp],[embed,null]]"]
    cfg = load_config(SFTConfig, path, overrides)
    assert isinstance(cfg, SFTConfig) and isinstance(cfg.model, ModelConfig)
    assert cfg.optimizer.lr == 2e-5 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.warmup_steps == 9
    assert cfg.data.train_files == ["b.jsonl", "c.jsonl"]
    assert cfg.training.steps is None and cfg.data.max_length == DataConfig().max_length
    assert cfg.mesh.axis_rules() == (("batch", ("data", "fsdp")), ("embed", None))


def test_unknown_keys_are_named(tmp_path):
    path = write_yaml(tmp_path, "model:\n  preset: tiny\noptimizer:\n  lrr: 1.0\n")
    assert load_error(path) == f"{path}: unknown key 'optimizer.lrr'"
    assert load_error(None, [*MINIMAL, "training.stepz=3"]) == (
        "override 'training.stepz=3': unknown key 'training.stepz'")


def test_wrong_types_are_named_with_the_expected_type(tmp_path):
    path = write_yaml(tmp_path, "model:\n  preset: tiny\ntraining:\n  seed: abc\n")
    assert load_error(path) == f"{path}: 'training.seed' expected int, got 'abc'"
    assert load_error(None, [*MINIMAL, "training.steps=abc"]) == (
        "override 'training.steps=abc': 'training.steps' expected int or null, got 'abc'")
    assert "'data.bucket_boundaries[1]' expected int" in load_error(
        None, [*MINIMAL, "data.bucket_boundaries=[8,x]"])
    assert "'data.train_files' expected a list of str" in load_error(
        None, [*MINIMAL, "data.train_files=[[a.jsonl]]"])


def test_enumerations_name_the_key_and_the_allowed_values():
    assert load_error(None, [*MINIMAL, "model.dtype=fp16"]) == (
        "override 'model.dtype=fp16': 'model.dtype' must be one of 'float32', 'bfloat16', got 'fp16'")
    message = load_error(None, [*MINIMAL, "data.truncation=cut"])
    assert "'data.truncation' must be one of 'drop_example', 'drop_earliest_rounds'" in message


def test_enumerations_match_the_data_modules():
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(DataConfig)}
    assert set(choices["template"]) == set(TEMPLATES)
    assert set(choices["truncation"]) == set(TRUNCATION_POLICIES)


@pytest.mark.parametrize("overrides, message", [
    (["data.tokenizer_path=tok"], "model: set exactly one of 'hf_path' and 'preset'"),
    (["model.preset=tiny"], "data.tokenizer_path: required when model.hf_path is not set"),
    ([*MINIMAL, "data.batch_size=0"], "data.batch_size: must be >= 1, got 0"),
    ([*MINIMAL, "data.bucket_boundaries=[64,32]"], "data.bucket_boundaries: must be positive and"),
    ([*MINIMAL, "mesh.data=-1", "mesh.fsdp=-1"], "mesh: at most one mesh axis may be -1"),
    ([*MINIMAL, "mesh.rules=[[embed,model]]"], "mesh.rules[0]: unknown mesh axis 'model'"),
    ([*MINIMAL, "foo"], "override 'foo': expected key=value"),
    ([*MINIMAL, "training..steps=3"], "override 'training..steps=3': an empty part in the key"),
])
def test_inconsistent_values_are_named(overrides, message):
    assert load_error(None, overrides).startswith(message)


def test_missing_and_malformed_files(tmp_path):
    assert load_error(str(tmp_path / "none.yaml")) == f"{tmp_path / 'none.yaml'}: no such config file"
    path = write_yaml(tmp_path, "model: [unclosed\n")
    assert load_error(path).startswith(f"{path}: invalid YAML")
    path = write_yaml(tmp_path, "- a\n- b\n")
    assert load_error(path) == f"{path}: expected a mapping at the top level"
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("model: {preset: caf\u00e9}\n".encode("latin-1"))
    assert load_error(str(latin)).startswith(f"{latin}: not UTF-8 text (invalid")


def test_saved_yaml_loads_back_to_an_equal_config(tmp_path):
    cfg = load_config(SFTConfig, None, [*MINIMAL, "optimizer.lr=3e-4", "data.eval_files=[e.jsonl]"])
    path = write_yaml(tmp_path, config_to_yaml(cfg))
    assert load_config(SFTConfig, path, []) == cfg


@pytest.mark.parametrize("name", ["demo.yaml", "vicuna-7b.yaml", "vicuna-13b.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(SFTConfig, str(CONFIGS / name), [], section="sft")
    assert cfg.data.template == "icegrt" and cfg.data.train_files
    if name == "demo.yaml":
        assert cfg.model.hf_path == "runs/demo/pretrain/final"  # the demo's stage 0 output
    else:
        assert cfg.model.hf_path and cfg.model.dtype == "bfloat16" and cfg.optimizer.lr == 2e-5
        # FastChat's 128 sequences a step, as micro-batches that split over 8 devices
        micro, rest = divmod(cfg.data.batch_size, cfg.optimizer.grad_accum_steps)
        assert cfg.data.batch_size == 128 and rest == 0 and micro % 8 == 0


def test_shipped_configs_load_with_the_papers_ppo_hyperparameters():
    from icegrt_jax.config import PPOConfig

    cfg = load_config(PPOConfig, str(CONFIGS / "vicuna-13b-ppo.yaml"), section="ppo")  # as `icegrt ppo` reads it
    assert (cfg.actor_optimizer.lr, cfg.critic_optimizer.lr) == (5e-6, 5e-7)
    assert (cfg.ppo.clip_eps, cfg.ppo.gamma, cfg.model.dtype) == (0.2, 0.95, "bfloat16")
    # bf16 weights would round those steps away (a weight near 0.02 moves only by steps > ~6e-5)
    assert cfg.model.param_dtype == "float32"


def test_section_of_a_multi_run_file(tmp_path):
    from icegrt_jax.config import RewardConfig

    path = tmp_path / "multi.yaml"
    path.write_text("sft:\n  model: {preset: tiny}\n  data: {tokenizer_path: t}\n"
                    "reward:\n  model: {preset: tiny}\n  data: {tokenizer_path: t}\n  loss: {margin: 2.0}\n")
    assert load_config(RewardConfig, str(path), section="reward").loss.margin == 2.0
    with pytest.raises(ConfigError, match=r"multi\.yaml\[reward\]: unknown key 'loss.nope'"):
        path.write_text("reward:\n  loss: {nope: 1}\n")
        load_config(RewardConfig, str(path), section="reward")


def test_plan_refuses_a_bad_device_memory_and_an_unknown_section(capsys):
    import jax

    from icegrt_jax import cli

    plan = ["plan", "--config", str(CONFIGS / "demo.yaml"), "--devices", str(jax.device_count())]
    for memory in ("nan", "-1", "0"):
        assert cli.main([*plan, "--device-memory", memory]) == 2
        assert "--device-memory must be a positive number of GiB" in capsys.readouterr().err
    assert cli.main([*plan, "--device-memory", "80", "--section", "ppo"]) == 2  # its model is not on disk (yet)
    assert "plan with a preset instead (model.hf_path=null model.preset=NAME)" in capsys.readouterr().err
    assert cli.main([*plan, "--device-memory", "80", "--section", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "--section nosuch: " in err and "holds several runs but no such top-level key (it has: demo, pretrain, sft" in err


def test_demo_fast_overrides_must_be_lists_of_strings(tmp_path):
    from icegrt_jax.demo.pipeline import load_run

    for fast in ("5", "{sft: 5}", "{sft: training.steps=1}"):
        path = write_yaml(tmp_path, f"fast: {fast}\n")
        with pytest.raises(ConfigError, match="'fast' must map each section to a list of key=value overrides"):
            load_run(str(tmp_path / "out"), path, fast=True)


def test_demo_config_values_are_checked_when_it_loads(tmp_path):
    from icegrt_jax.demo.pipeline import load_run

    for line, message in (("samples_per_prompt: -5", "samples_per_prompt: must be >= 1, got -5"),
                          ("ranking_eval_fraction: 1.5", "ranking_eval_fraction: must be in (0, 1), got 1.5"),
                          ("held_out_arithmetic: 400", "held_out_arithmetic: must leave at least 3 of the"),
                          ("eval_ad_prompts: 5000", "eval_ad_prompts: must be at most")):
        path = write_yaml(tmp_path, f"demo:\n  {line}\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_run(str(tmp_path / "out"), path)


@pytest.mark.parametrize("override, value", [("ppo.kl_target=0", 0), ("ppo.kl_target=-1.5", -1.5),
                                             ("ppo.value_clip=0", 0), ("ppo.value_clip=-0.2", -0.2)])
def test_ppo_kl_target_and_value_clip_must_be_positive_or_null(override, value):
    from icegrt_jax.config import PPOConfig

    minimal = ["model.preset=tiny", "data.tokenizer_path=tok", "reward.function=m:f"]
    with pytest.raises(ConfigError) as error:
        load_config(PPOConfig, None, [*minimal, override])
    key = override.split("=")[0]
    assert str(error.value) == f"{key}: must be > 0 or null, got {float(value)}"
    cfg = load_config(PPOConfig, None, [*minimal, "ppo.kl_target=null", "ppo.value_clip=null"])
    assert cfg.ppo.kl_target is None and cfg.ppo.value_clip is None


def test_reward_margin_defaults_by_loss_type_and_a_given_one_is_used(tmp_path):
    """Margin ranking (the paper's) defaults to margin 1, Bradley-Terry to 0 (its standard form);
    a given margin holds for either, whichever is set first, and the saved config keeps it."""
    import jax.numpy as jnp

    from icegrt_jax.config import RewardConfig
    from icegrt_jax.train.reward import per_pair_loss

    def loaded(*overrides):
        cfg = load_config(RewardConfig, None, [*MINIMAL, *overrides])
        assert load_config(RewardConfig, write_yaml(tmp_path, config_to_yaml(cfg))) == cfg
        return cfg.loss

    assert (loaded().type, loaded().margin) == ("margin_ranking", 1.0)
    bradley_terry = loaded("loss.type=bradley_terry")
    assert bradley_terry.margin == 0.0
    chosen, rejected = jnp.array([0.5, -1.0]), jnp.array([0.25, 2.0])
    assert jnp.allclose(per_pair_loss(bradley_terry.type, bradley_terry.margin, chosen, rejected),
                        -jnp.log(jnp.array([1 / (1 + jnp.exp(-0.25)), 1 / (1 + jnp.exp(3.0))])))
    assert loaded("loss.margin=0.5", "loss.type=bradley_terry").margin == 0.5
    assert loaded("loss.type=margin_ranking", "loss.margin=0").margin == 0.0
    assert loaded("loss.type=bradley_terry", "loss.margin=null").margin == 0.0


def test_each_trainer_defaults_to_its_own_run_directory():
    """An sft run then a reward run, neither naming training.output_dir, must not collide."""
    common = ["model.preset=tiny", "data.tokenizer_path=tok"]
    dirs = [load_config(cls, None, common + extra).training.output_dir for cls, extra in (
        (SFTConfig, []), (RewardConfig, []), (PPOConfig, ["reward.function=m:f"]))]
    assert dirs == ["runs/sft", "runs/reward", "runs/ppo"]


def test_a_trainer_without_any_config_says_what_to_give(capsys):
    from icegrt_jax import cli

    assert cli.main(["reward"]) == 2
    assert capsys.readouterr().err.strip() == ("icegrt reward: error: give a config: --config FILE (configs/) and/or "
                                               "dotted overrides (see icegrt reward --help)")
