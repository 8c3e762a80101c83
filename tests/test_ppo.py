"""ICE-GRT PPO: the loop on tiny random models, learning, KL control, reward placement,
advantage normalisation, independent learning rates, exact resume mid-iteration, bad input."""

import functools
import json
import math
import re
import signal
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import run_cli_killed_at

from icegrt_jax import cli, rl
from icegrt_jax.checkpoint import load_model, save_model
from icegrt_jax.config import ConfigError, PPOConfig, PPOLossConfig, RewardModelConfig
from icegrt_jax.config_loader import load_config
from icegrt_jax.data.sources import DataError
from icegrt_jax.data.tokenize import load_tokenizer
from icegrt_jax.models.heads import ScoreModel
from icegrt_jax.models.llama import preset
from icegrt_jax.sharding import Partitioner
from icegrt_jax.train import ppo, rollout
from icegrt_jax.train.model_init import frozen_config, init_model
from icegrt_jax.train.ppo import run_ppo
from icegrt_jax.train.rollout import (
    compute_advantages,
    experience_from_scores,
    shape_scores,
)

SCORER = "ppo_scorers:letter_e_share"


@pytest.fixture
def ppo_setup(tmp_path, tiny_tokenizer_dir):
    with open(tmp_path / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": f"Write {i} words about the sea."}) + "\n" for i in range(32))
    config = {
        "model": {"preset": "tiny", "vocab_size": 400},
        "actor_optimizer": {"lr": 3e-3, "schedule": "constant"},
        "critic_optimizer": {"lr": 3e-3, "schedule": "constant"},
        "data": {"prompt_files": [str(tmp_path / "prompts.jsonl")], "tokenizer_path": tiny_tokenizer_dir,
                 "prompts_per_iteration": 16},
        "rollout": {"max_new_tokens": 8},
        "reward": {"function": SCORER},
        "ppo": {"kl_coef": 0.01, "minibatches": 2, "epochs": 2},
        "training": {"steps": 24, "save_every": 100, "log_every": 1, "output_dir": str(tmp_path / "run")},
        "logging": {"progress": False},
    }
    (tmp_path / "ppo.yaml").write_text(json.dumps(config))
    return tmp_path, str(tmp_path / "ppo.yaml")


def _metrics(path):
    return [json.loads(line) for line in open(path / "metrics.jsonl")]


def test_learns_from_a_programmatic_scorer_while_kl_stays_bounded(ppo_setup):
    tmp_path, config = ppo_setup
    free = _run(config, tmp_path / "free", "ppo.kl_coef=0.01")
    assert (tmp_path / "free" / "data_report.txt").read_text() == (  # 32 prompts fill 2 iterations exactly
        "32 prompts (0 longer than data.max_prompt_length dropped; each epoch's last iteration repeats 0 to fill "
        "its batch); 24 iterations\n")
    tied = _run(config, tmp_path / "tied", "ppo.kl_coef=1.0")
    first, last = np.mean([m["score_raw_mean"] for m in free[:4]]), np.mean([m["score_raw_mean"] for m in free[-4:]])
    assert last > first + 0.05, (first, last)  # the share of 'e' rises clearly (0.05 -> ~0.2 here)
    assert max(m["kl"] for m in free) < 30.0  # nats per 8-token response: bounded, not diverging
    tied_last = np.mean([m["score_raw_mean"] for m in tied[-4:]])
    assert np.mean([m["kl"] for m in tied[-6:]]) < 0.5 * np.mean([m["kl"] for m in free[-6:]])
    assert tied_last < last - 0.05  # the KL penalty holds the policy near the reference
    for key in ("score_mean", "score_std", "kl", "kl_coef", "policy_loss", "value_loss", "clip_frac", "approx_kl",
                "entropy", "value_clip_frac", "response_length", "truncation_rate", "advantage_mean", "return_mean",
                "explained_variance", "time_generate_s", "time_score_s", "time_update_s", "tokens_per_s",
                "rlhf_reward", "value_mean", "response_length_min", "response_length_max"):
        assert np.isfinite(free[-1][key]), key
    assert free[-1]["actor_lr"] == free[-1]["critic_lr"] == pytest.approx(3e-3)  # constant schedules
    assert "loss" not in free[-1]  # policy_loss and value_loss each keep one meaning
    documented = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    assert [key for key in free[-1] if key != "step" and f"`{key}`" not in documented] == []
    assert free[-1]["response_length_min"] <= free[-1]["response_length"] <= free[-1]["response_length_max"]


def test_the_prompt_report_counts_blank_lines_and_repeated_prompts(ppo_setup):
    tmp_path, config = ppo_setup
    lines = [json.dumps({"prompt": p}) for p in ("a b", "c d", "a b")]
    (tmp_path / "blank.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    cfg = load_config(PPOConfig, config, [f"data.prompt_files=[{tmp_path / 'blank.jsonl'}]"])
    prompts, dropped, source = ppo.load_prompts(cfg, load_tokenizer(cfg.data.tokenizer_path))
    assert len(prompts) == 3 and dropped == 0
    assert source.summary() == "1 blank line skipped; 1 record repeats an earlier one (kept: " \
        f"{tmp_path / 'blank.jsonl'}:4 repeats {tmp_path / 'blank.jsonl'}:1)"


def _run(config, out, *overrides):
    run_ppo(load_config(PPOConfig, config, [f"training.output_dir={out}", *overrides]))
    return _metrics(out)


def test_reward_lands_on_eos_or_last_generated_token():
    # Row 0: prompt [5, 6], response [7, EOS=2] then padding. Row 1: prompt [5], response [8, 9, 10]
    # truncated at max_new_tokens (no EOS). Scores are fractional: an integer cast would show.
    tokens = np.array([[0, 5, 6, 7, 2, 0], [0, 0, 5, 8, 9, 10]])
    response_mask = np.array([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    mask = jnp.asarray(response_mask[:, 1:])
    zeros = jnp.zeros(mask.shape)
    scores = jnp.array([0.75, -1.25])
    adv = compute_advantages(scores, zeros, zeros, zeros, mask, 0.0, PPOLossConfig())
    expected = np.zeros(mask.shape, np.float32)
    expected[0, 3] = 0.75  # action index 3 emits tokens[0, 4] = EOS
    expected[1, 4] = -1.25  # action index 4 emits tokens[1, 5] = 10, the last generated token
    assert tokens[0, 3 + 1] == 2 and tokens[1, 4 + 1] == 10
    np.testing.assert_array_equal(np.asarray(adv.rewards), expected)
    assert adv.rewards.dtype == jnp.float32


@pytest.mark.parametrize("whiten", [True, False])
def test_advantage_normalisation_switch(whiten):
    rng = np.random.default_rng(0)
    mask = jnp.asarray(np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    logprobs, ref, values = (jnp.asarray(rng.normal(size=(3, 5)), jnp.float32) for _ in range(3))
    scores = jnp.asarray(rng.normal(size=3), jnp.float32)
    cfg = PPOLossConfig(whiten_advantages=whiten, gamma=0.95, lam=0.9)
    adv = compute_advantages(scores, logprobs, ref, values, mask, 0.1, cfg)
    rewards = rl.shaped_rewards(scores, logprobs, ref, mask, 0.1)
    raw, returns = rl.gae(rewards, values, mask, 0.95, 0.9)
    np.testing.assert_allclose(adv.raw_advantages, raw, rtol=1e-6)
    np.testing.assert_allclose(adv.returns, returns, rtol=1e-6)
    expected = rl.masked_whiten(raw, mask) if whiten else raw
    np.testing.assert_allclose(adv.advantages, expected, rtol=1e-5, atol=1e-6)
    if whiten:
        on = np.asarray(mask, bool)
        assert abs(np.asarray(adv.advantages)[on].mean()) < 1e-5


@pytest.mark.parametrize("normalize", ["none", "stats", "running"])
@pytest.mark.parametrize("penalty, clip", [(None, None), (1.5, 0.8)])
def test_shape_scores_follow_the_formula_over_two_batches(normalize, penalty, clip):
    """score = clip(normalise(raw) - penalty x [no EOS], +-clip), as a plain-Python loop; "running"
    standardises with the mean and unbiased std of every raw score seen so far, this batch
    included (atol 1e-5: fp32 of values O(1))."""
    rng = np.random.default_rng(0)
    stats = {"score_mean": 1.5, "score_std": 2.5}
    moments, seen = rl.init_running_moments(), []
    for _ in range(2):
        raw, ended = rng.normal(2.0, 3.0, 6).astype(np.float32), rng.random(6) < 0.5
        scores, moments = shape_scores(jnp.asarray(raw), jnp.asarray(ended), moments, normalize, stats, clip, penalty)
        seen += raw.tolist()
        mean = sum(seen) / len(seen)
        std = math.sqrt(sum((x - mean) ** 2 for x in seen) / (len(seen) - 1))
        for i, x in enumerate(raw.tolist()):
            y = {"none": x, "stats": (x - 1.5) / (2.5 + 1e-8), "running": (x - mean) / (std + 1e-8)}[normalize]
            y -= penalty if penalty is not None and not ended[i] else 0.0
            y = y if clip is None else min(max(y, -clip), clip)
            assert abs(float(scores[i]) - y) < 1e-5, (i, float(scores[i]), y)
        assert int(moments.count) == len(seen)


def test_stats_normalised_scores_beyond_ten_without_a_clip_warn():
    """reward.normalize=stats divides by the reward model's held-out std, which can be small: a
    rollout scored beyond +-10 with no reward.clip gets a one-line warning naming the fix."""
    stats = {"score_mean": 0.3, "score_std": 0.04}
    cfg = RewardModelConfig(path="rm", normalize="stats")
    message = rollout.large_score_warning(jnp.float32(15.5), cfg, stats)
    assert message == ("warning: reward.normalize=stats gave scores up to 15.5 in absolute value "
                       "(reward_stats.json: score_std 0.04); set reward.clip (e.g. 5) to bound them")
    assert rollout.large_score_warning(jnp.float32(10.0), cfg, stats) is None
    assert rollout.large_score_warning(jnp.float32(jnp.nan), cfg, stats) is None  # non-finite: the run stops
    assert rollout.large_score_warning(jnp.float32(15.5), RewardModelConfig(path="rm", normalize="stats", clip=5.0), stats) is None
    running = RewardModelConfig(function=SCORER, normalize="running")
    assert rollout.large_score_warning(jnp.float32(15.5), running, None) is None


def test_frozen_roles_are_kept_in_the_compute_dtype_and_score_bitwise_alike(ppo_setup, tiny_tokenizer_dir,
                                                                            tmp_path):
    """bf16 compute over fp32 master weights: the frozen reference and reward model are placed in
    bf16, half the memory, and their forwards equal the fp32 weights' bitwise (each forward casts
    every weight to the compute dtype first), so the KL to the reference starts at exactly 0. The
    reward model runs with the run's numerics, whatever its checkpoint was trained with."""
    _, config = ppo_setup
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    saved_cfg = preset("tiny", vocab_size=400)  # a reward model trained and saved in fp32
    saved = nnx.split(ScoreModel(saved_cfg, nnx.Rngs(1)))[1]
    save_model(saved_cfg, saved, str(tmp_path / "rm"), tokenizer=tokenizer, kind="score")
    cfg = load_config(PPOConfig, config, ["model.dtype=bfloat16", "model.param_dtype=float32",
                                          "reward.function=null", f"reward.path={tmp_path / 'rm'}"])
    partitioner = Partitioner.from_config(cfg.mesh)
    llama, _, actor_params, _, roles, _ = ppo.build_roles(cfg, tokenizer, partitioner)
    assert {x.dtype for x in jax.tree.leaves(actor_params)} == {jnp.dtype(jnp.float32)}
    for frozen in (roles.reference_params, roles.reward_params):
        assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert nnx.merge(roles.reward_graphdef, roles.reward_params).cfg.dtype == "bfloat16"
    tokens = np.random.default_rng(0).integers(3, llama.vocab_size, (2, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    score = lambda params: rollout.sequence_logprobs_without_entropy(roles.actor_graphdef, params, tokens, mask, 1.0, 6)
    np.testing.assert_array_equal(score(roles.reference_params), score(actor_params))
    reward = lambda params: rollout.reward_model_scores(roles.reward_graphdef, params, tokens, mask)
    np.testing.assert_array_equal(reward(roles.reward_params), reward(saved))
    assert frozen_config(llama).param_dtype == "bfloat16" and frozen_config(preset("tiny")) == preset("tiny")


def test_experience_steps_the_adaptive_kl_controller_with_the_mean_sequence_kl():
    """Ziegler's controller in the trainer's experience step, as a plain loop: KL = the mean over
    rows of sum_t (log pi - log pi_ref) over each row's response; beta <- beta (1 + clip(KL /
    target - 1, +-0.2) x rows / horizon). The advantages use the coefficient before the step;
    log-probs off the mask (NaN here) reach nothing."""
    rng = np.random.default_rng(1)
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.float32)
    logprobs = rng.normal(-2, 1, (3, 5)).astype(np.float32)
    ref = (logprobs - rng.uniform(0, 0.1, (3, 5))).astype(np.float32)
    values, scores = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    logprobs_nan = np.where(mask > 0, logprobs, np.nan).astype(np.float32)
    kl = rl.init_kl_controller(0.1, target=0.05, horizon=100.0)
    loss_cfg = PPOLossConfig(gamma=0.95, lam=0.9)
    _, adv, sequence_kl, stepped, _ = experience_from_scores(
        jnp.asarray(scores), jnp.ones(3, bool), jnp.asarray(logprobs_nan), jnp.asarray(ref), jnp.asarray(values),
        jnp.asarray(mask), kl, rl.init_running_moments(), reward_cfg=RewardModelConfig(), reward_stats=None,
        loss_cfg=loss_cfg)
    per_row = [sum(float(logprobs[i, t]) - float(ref[i, t]) for t in range(5) if mask[i, t]) for i in range(3)]
    np.testing.assert_allclose(sequence_kl, per_row, rtol=1e-5)
    error = min(max(sum(per_row) / 3 / 0.05 - 1, -0.2), 0.2)
    np.testing.assert_allclose(float(stepped.kl_coef), 0.1 * (1 + error * 3 / 100.0), rtol=1e-6)
    expected = compute_advantages(jnp.asarray(scores), jnp.asarray(logprobs), jnp.asarray(ref), jnp.asarray(values),
                                  jnp.asarray(mask), 0.1, loss_cfg)
    np.testing.assert_allclose(adv.advantages, expected.advantages, rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(adv.advantages)).all() and np.isfinite(np.asarray(adv.returns)).all()


def _initial_params(config):
    cfg = load_config(PPOConfig, config, [])
    return init_model(cfg.model, cfg.training.seed, Partitioner.from_config(cfg.mesh))[1]


def _changed(a, b):
    return any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_actor_and_critic_learning_rates_are_independent(ppo_setup):
    tmp_path, config = ppo_setup
    initial = _initial_params(config)
    for frozen, lr_key in (("actor", "actor_optimizer.lr=0"), ("critic", "critic_optimizer.lr=0")):
        out = tmp_path / frozen
        run_ppo(load_config(PPOConfig, config, [f"training.output_dir={out}", "training.steps=1", lr_key]))
        actor = load_model(str(out / "final"))[1]
        critic = load_model(str(out / "final-critic"))[1]
        critic_backbone = {k: critic[k] for k in ("embed", "layers", "final_norm")}
        actor_backbone = {k: initial[k] for k in ("embed", "layers", "final_norm")}
        assert _changed(actor, initial) == (frozen == "critic")
        assert _changed(critic_backbone, actor_backbone) == (frozen == "actor")


UPDATE_FACTORIES = ("make_joint_update", "make_critic_update_with_values", "make_actor_update", "make_critic_update")


def test_fused_update_programs_equal_the_separate_path(ppo_setup, monkeypatch):
    """One epoch, one minibatch, three ways: the joint program (both forwards, the experience and
    both steps in one: the default here), the critic's step with the values + the actor's update
    (forced by 2 actor micro-batches, exactly accumulated), and all separate (2 critic micro-batches
    too). One iteration each: the same rollout, so its metrics agree to float32 reduction order
    (rtol 1e-4); each run builds only the programs it uses."""
    tmp_path, config = ppo_setup
    calls = Counter()
    for name in UPDATE_FACTORIES:
        factory = getattr(ppo, name)
        monkeypatch.setattr(ppo, name, lambda *a, _f=factory, _n=name, **k: calls.update([_n]) or _f(*a, **k))
    one = ("training.steps=1", "ppo.epochs=1", "ppo.minibatches=1")
    runs = {}
    for name, overrides, built in (
            ("joint", (), {"make_joint_update"}),
            ("critic_fused", ("actor_optimizer.grad_accum_steps=2",), {"make_critic_update_with_values",
                                                                       "make_actor_update"}),
            ("separate", ("actor_optimizer.grad_accum_steps=2", "critic_optimizer.grad_accum_steps=2"),
             {"make_actor_update", "make_critic_update"})):
        calls.clear()
        runs[name] = _run(config, tmp_path / name, *one, *overrides)
        assert calls == dict.fromkeys(built, 1), name
        assert runs[name][0]["time_update_s"] > 0 and np.isfinite(runs[name][0]["value_loss"])
    for name in ("joint", "critic_fused"):
        for key in ("value_loss", "value_clip_frac", "critic_grad_norm", "advantage_mean", "advantage_std",
                    "return_mean", "explained_variance", "kl", "score_mean", "policy_loss", "actor_grad_norm",
                    "entropy", "rollout_entropy", "ratio_mean"):
            np.testing.assert_allclose(runs[name][0][key], runs["separate"][0][key], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{name}: {key}")


@pytest.mark.parametrize("minibatches, factory, kill_on_call", [
    (2, "make_critic_update", 6),  # 2 critic updates an iteration: the second minibatch of iteration 3
    (1, "make_joint_update", 3),  # the default shape: iteration 3's joint update, after its rollout
])
def test_exact_resume_after_sigkill_mid_iteration(ppo_setup, minibatches, factory, kill_on_call):
    tmp_path, config = ppo_setup
    # the adaptive KL controller and the running reward moments are state the checkpoint must carry
    short = ["training.steps=4", "training.save_every=1", "ppo.epochs=1", f"ppo.minibatches={minibatches}",
             "ppo.kl_target=0.5", "ppo.kl_horizon=10", "reward.normalize=running"]
    assert cli.main(["ppo", "--config", config, *short, f"training.output_dir={tmp_path / 'straight'}"]) == 0
    args = ["ppo", "--config", config, *short, f"training.output_dir={tmp_path / 'resumed'}"]
    killed = run_cli_killed_at("icegrt_jax.train.ppo", kill_on_call, "SIGKILL", args, factory=factory)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert cli.main(args) == 0
    for name in ("final", "final-critic"):
        assert (tmp_path / "straight" / name / "tokenizer.json").is_file(), name  # each exports with its tokenizer
        straight = jax.tree.leaves(load_model(str(tmp_path / "straight" / name))[1])
        resumed = jax.tree.leaves(load_model(str(tmp_path / "resumed" / name))[1])
        for a, b in zip(straight, resumed, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b)), name
    untimed = lambda rows: [{k: v for k, v in row.items() if "time" not in k and "per_s" not in k} for row in rows]
    straight, resumed = untimed(_metrics(tmp_path / "straight")), untimed(_metrics(tmp_path / "resumed"))
    assert resumed == straight  # every iteration's row once, as if uninterrupted
    assert len({row["kl_coef"] for row in straight}) == 4 and len({row["score_mean"] for row in straight}) == 4


@pytest.mark.parametrize("override, message", [
    ("reward.function=nowhere:nothing", "cannot import module 'nowhere' (No module named 'nowhere'); its directory"),
    ("reward.function=ppo_scorers:nothing", "reward.function: module 'ppo_scorers' has no 'nothing'"),
    ("reward.function=ppo_scorers", "reward.function: 'ppo_scorers' is not of the form 'module:function'"),
    ("data.prompts_per_iteration=15", "data.prompts_per_iteration: 15 is not divisible"),
    ("data.prompt_files=[/nonexistent/p.jsonl]", "icegrt ppo: error: /nonexistent/p.jsonl: no such file"),
    ("data.prompt_files=[{tmp}/empty.jsonl]", "empty.jsonl: no prompts (the files are empty)"),
    ("rollout.temperature=0",
     "icegrt ppo: error: rollout.temperature: must be >= 1e-05 for PPO (log-probs divide by it), got 0.0"),
    ("reward.function=null reward.path=/nonexistent/rm", "reward.path: /nonexistent/rm: no such directory"),
    ("rollout.stop_token_ids=[99999]", "rollout.stop_token_ids: [99999] outside the model's vocabulary [0, 400)"),
    ("ppo.kl_coef=.nan", "ppo.kl_coef: must be a finite number, got nan"),
    ("rollout.old_logprobs=sampler rollout.top_k=5", "rollout.old_logprobs: 'sampler' needs top_k 0 and top_p 1"),
    ("rollout.micro_batch_size=5", "rollout.micro_batch_size: 5 does not divide data.prompts_per_iteration 16"),
    ("rollout.micro_batch_size=0", "rollout.micro_batch_size: must be >= 1, got 0"),
    ("ppo.kl_target=6 ppo.kl_horizon=3", "ppo.kl_horizon: 3 is under data.prompts_per_iteration / 5 = 3.2"),
    ("model.max_position_embeddings=16", "32 prompt(s) leave no room for a response in the model's context of 16"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(ppo_setup, capsys, override, message):
    tmp_path, config = ppo_setup
    (tmp_path / "empty.jsonl").write_text("")
    assert cli.main(["ppo", "--config", config, *override.format(tmp=tmp_path).split()]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_prompts_are_checked_against_the_models_context_at_the_start(capsys):
    from icegrt_jax.train.ppo import check_prompt_room

    prompts = [np.zeros(10, np.int32), np.zeros(3, np.int32)]
    check_prompt_room(prompts, 12, 4)
    assert "[ppo] note: 1 prompt(s) leave less than rollout.max_new_tokens=4 tokens of the model's context of 12" \
        in capsys.readouterr().out
    with pytest.raises(DataError, match=r"1 prompt\(s\) leave no room .* context of 10 tokens \(the longest has 10\)"):
        check_prompt_room(prompts, 10, 4)


def test_a_scorers_output_is_checked_and_named():
    assert rollout.checked_scores([1, 2.5], 2, "m:f").tolist() == [1.0, 2.5]
    assert rollout.checked_scores([True, False], 2, "m:f").tolist() == [1.0, 0.0]  # pass/fail rewards
    for scores, message in (([1.0], r"returned shape \(1,\) for 2 responses"),
                            (["x", "y"], "returned list values that are not numbers"),
                            (["1", "0.5"], "returned list values that are not numbers"),  # not parsed
                            ([1.0, None], "returned list values that are not numbers"),
                            ([[1.0], [2.0, 3.0]], "returned list values that are not numbers"),
                            ([1.0, float("nan")], "returned a non-finite score")):
        with pytest.raises(ConfigError, match=f"reward.function m:f: {message}"):
            rollout.checked_scores(scores, 2, "m:f")


def test_reward_model_with_another_tokenizer_gets_retokenized_text(tiny_tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from icegrt_jax.data.templates import ICEGRT
    from icegrt_jax.data.tokenize import load_tokenizer, tokenize_prompt
    from icegrt_jax.train.rollout import retokenize_for_reward, same_tokenizer

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.train_from_iterator([ICEGRT.preamble + ICEGRT.prompt("sea poem") + " waves roll in"],
                              trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=words, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                            unk_token="[UNK]").save_pretrained(tmp_path / "words")
    actor, reward = load_tokenizer(tiny_tokenizer_dir), load_tokenizer(str(tmp_path / "words"))
    assert same_tokenizer(actor, actor) and not same_tokenizer(actor, reward)
    assert rollout.passes_tokens_through(actor, actor, (actor.eos_token_id,))
    assert not rollout.passes_tokens_through(actor, actor, (actor.eos_token_id, 5))  # another stop token: retokenised
    assert not rollout.passes_tokens_through(actor, reward, (actor.eos_token_id,))

    tokens, mask = retokenize_for_reward(reward, ICEGRT, ["sea poem", "sea poem"], ["waves roll in", "waves"],
                                         np.array([True, False]), pad_id=0)
    prompt = list(tokenize_prompt(reward, ICEGRT, "sea poem"))
    full = prompt + reward(" waves roll in", add_special_tokens=False)["input_ids"] + [reward.eos_token_id]
    truncated = prompt + reward(" waves", add_special_tokens=False)["input_ids"]  # no EOS: it never ended
    assert tokens[0].tolist() == full and mask[0].tolist() == [1] * len(full)
    assert tokens[1, :len(truncated)].tolist() == truncated and mask[1].sum() == len(truncated)
    assert (tokens[1, len(truncated):] == 0).all() and reward.unk_token_id not in full
    # A response that spells the EOS token out is text, as in training: no EOS inside a response.
    spelled, _ = retokenize_for_reward(actor, ICEGRT, ["sea poem"], ["waves </s> roll"], np.array([False]), pad_id=0)
    assert actor.eos_token_id not in spelled[0].tolist()


def test_scoring_forward_recomputes_the_samplers_logprobs_on_the_response_only():
    """PPO's old log-probs are log_softmax(logits / T) of a full forward; on a sampled rollout
    they equal the sampler's own log-probs (top_k 0, top_p 1) within 1e-4 (fp32; the decode path
    sums attention over the cache in another order). With ``response_actions`` only the response
    block goes through the LM head: identical there, 0 before."""

    from icegrt_jax.models.llama import Llama
    from icegrt_jax.sampling import SamplingParams, generate
    from icegrt_jax.train.rollout import sequence_logprobs

    model = Llama(preset("tiny", vocab_size=64), nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 4, 4, 4, 4, 4, 8]]
    result = generate(model, prompts, SamplingParams(temperature=0.7, max_new_tokens=6, eos_token_ids=(2,), seed=4))
    tokens, attention = jnp.asarray(result.tokens), jnp.asarray(result.attention_mask)
    full, full_entropy = sequence_logprobs(graphdef, params, tokens, attention, 0.7)
    response, response_entropy = sequence_logprobs(graphdef, params, tokens, attention, 0.7, 6)
    mask = result.mask[:, 1:].astype(bool)
    assert mask.sum() > len(prompts)
    np.testing.assert_allclose(np.asarray(full)[mask], result.logprobs[:, 1:][mask], atol=1e-4)
    first = tokens.shape[1] - 1 - 6
    np.testing.assert_allclose(np.asarray(response)[:, first:], np.asarray(full)[:, first:], atol=1e-6)
    np.testing.assert_allclose(np.asarray(response_entropy)[:, first:], np.asarray(full_entropy)[:, first:],
                               atol=1e-6)
    assert (np.asarray(response)[:, :first] == 0).all() and not mask[:, :first].any()


@pytest.mark.parametrize("old_logprobs, tolerance", [("recompute", 1e-6), ("sampler", 1e-4)])
def test_first_update_starts_at_ratio_one(ppo_setup, old_logprobs, tolerance):
    """With 1 epoch x 1 minibatch the update's ratio pi/pi_old is 1 at its start: to rounding
    (1e-6) with old log-probs from the separate scoring forward, which checks that it scores the
    same actions as the update (the actor accumulates over 2 micro-batches, so the joint program,
    whose old log-probs are its own forward's, does not run); within 1e-4 (fp32) with the
    sampler's, which also checks that the sampler's log-prob of token t + 1 lands on action t."""
    tmp_path, config = ppo_setup
    metrics = _run(config, tmp_path / old_logprobs, "training.steps=2", "ppo.epochs=1", "ppo.minibatches=1",
                   "rollout.temperature=0.8", f"rollout.old_logprobs={old_logprobs}",
                   "actor_optimizer.grad_accum_steps=2")
    for m in metrics:
        assert abs(m["ratio_mean"] - 1) < tolerance and abs(m["approx_kl"]) < tolerance and m["clip_frac"] == 0
    assert ("rollout_entropy" in metrics[0]) == (old_logprobs == "recompute")


def test_scoring_in_row_chunks_equals_all_rows_at_once_in_less_memory():
    """``in_row_chunks``: 4 pieces of 2 of 8 rows (piece i rows i and i + 4) give every row's log-probs and values as one forward over all rows
    (fp32: a GEMM's blocking depends on its rows, so to rounding), with the activations of one
    piece: the compiled temporaries shrink."""
    from icegrt_jax.models.heads import ScoreModel
    from icegrt_jax.models.llama import Llama

    cfg = preset("tiny", vocab_size=64)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, 64, (8, 24)), jnp.int32)
    mask = jnp.asarray(np.arange(24)[None] >= rng.integers(0, 12, 8)[:, None], jnp.int32)
    for model, forward, static in ((Llama(cfg, nnx.Rngs(1)), rollout.sequence_logprobs, (0.7, 12)),
                                   (ScoreModel(cfg, nnx.Rngs(2)), rollout.critic_values, ())):
        graphdef, params = nnx.split(model)
        whole = jax.jit(functools.partial(forward, graphdef), static_argnums=tuple(range(3, 3 + len(static))))
        pieces = jax.jit(rollout.in_row_chunks(functools.partial(forward, graphdef), 4),
                         static_argnums=tuple(range(3, 3 + len(static))))
        for a, b in zip(jax.tree.leaves(pieces(params, tokens, mask, *static)),
                        jax.tree.leaves(whole(params, tokens, mask, *static)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        temp = [f.lower(params, tokens, mask, *static).compile().memory_analysis().temp_size_in_bytes
                for f in (pieces, whole)]
        assert temp[0] < 0.6 * temp[1], (forward.__name__, temp)


def test_micro_batched_rollouts_train_as_the_whole_batch(ppo_setup, monkeypatch):
    """``rollout.micro_batch_size=4`` of 16 prompts: the sampler runs 4 batches of 4, each of the 3
    scoring forwards 4 pieces; a row's sample depends on (seed, prompt, step) only, so the
    rollouts, and the two iterations trained on them, agree with the whole batch's to fp32
    rounding (and exactly in lengths and scores on this machine)."""
    from icegrt_jax import sampling

    tmp_path, config = ppo_setup
    batches, pieces = [], []
    real_batch, real_chunks = sampling._generate_batch, rollout.in_row_chunks
    monkeypatch.setattr(sampling, "_generate_batch", lambda *a, **k: batches.append(len(a[4])) or real_batch(*a, **k))
    monkeypatch.setattr(rollout, "in_row_chunks", lambda f, chunks: pieces.append(chunks) or real_chunks(f, chunks))
    separate = ("training.steps=2", "ppo.epochs=1", "actor_optimizer.grad_accum_steps=2",
                "critic_optimizer.grad_accum_steps=2")  # every scoring forward runs (no fused update)
    whole = _run(config, tmp_path / "whole", *separate)
    assert batches == [16, 16] and pieces == [1, 1, 1]
    batches.clear(), pieces.clear()
    micro = _run(config, tmp_path / "micro", *separate, "rollout.micro_batch_size=4")
    assert batches == [4] * 8 and pieces == [4, 4, 4]  # 2 iterations x 4 batches; old and reference log-probs, values
    for a, b in zip(micro, whole, strict=True):
        assert a["response_length"] == b["response_length"] and a["score_raw_mean"] == b["score_raw_mean"]
        for key in ("kl", "policy_loss", "value_loss", "advantage_mean", "return_mean", "rollout_entropy"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)


def _save_reward_model(path, tokenizer, **overrides):
    """A tiny random ICE-Reward checkpoint (vocabulary 400, the ``ppo_setup`` policy's) at ``path``."""
    cfg = preset("tiny", vocab_size=400, **overrides)
    save_model(cfg, nnx.split(ScoreModel(cfg, nnx.Rngs(1)))[1], str(path), tokenizer=tokenizer, kind="score")
    return str(path)


def _bad_run(config, capsys, tmp_path, *overrides):
    """``icegrt ppo`` with ``overrides`` fails at the start: exit 2, one line, nothing written."""
    assert cli.main(["ppo", "--config", config, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    return err


def test_a_critic_from_the_reward_model_reads_the_policys_tokens_within_its_context(ppo_setup, tiny_tokenizer_dir,
                                                                                   capsys):
    """``critic_init: reward`` feeds the reward model's weights the policy's token ids: another
    tokenizer (here one more token) reads them as other text, and a shorter context than the
    rollout's rows gives positions it never saw. Both stop the run at the start, naming the key."""
    tmp_path, config = ppo_setup
    other = load_tokenizer(tiny_tokenizer_dir)
    other.add_tokens(["<extra>"])
    rm = ["reward.function=null", "ppo.critic_init=reward"]
    err = _bad_run(config, capsys, tmp_path, *rm, f"reward.path={_save_reward_model(tmp_path / 'other', other)}")
    assert err.endswith(f"ppo.critic_init: 'reward' needs the reward model to read the policy's tokens, but "
                        f"{tmp_path / 'other'}'s tokenizer differs from the policy's (use critic_init: actor)"), err
    short = _save_reward_model(tmp_path / "short", load_tokenizer(tiny_tokenizer_dir), max_position_embeddings=8)
    err = _bad_run(config, capsys, tmp_path, *rm, f"reward.path={short}")
    assert "ppo.critic_init: the critic reads rollout rows of up to " in err and "but its context is 8;" in err, err


def test_a_reward_model_reading_the_policys_tokens_is_checked_against_its_context(ppo_setup, tiny_tokenizer_dir):
    """The rollout rows reach up to the longest prompt + rollout.max_new_tokens (8 here), within the
    policy's context; a reward model they pass through to must hold them. Retokenised rows (another
    stop token) have lengths not known in advance: not checked."""
    from types import SimpleNamespace

    _, config = ppo_setup
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    cfg = load_config(PPOConfig, config, ["reward.function=null", "reward.path=rm"])
    policy = preset("tiny", vocab_size=400, max_position_embeddings=20)
    prompts = [np.zeros(5, np.int32), np.zeros(10, np.int32)]  # rows up to 18 tokens

    def check(reward_context, policy=policy, cfg=cfg):
        roles = SimpleNamespace(reward_config=preset("tiny", max_position_embeddings=reward_context))
        ppo.check_readers_context(cfg, prompts, policy, policy, roles, tokenizer, tokenizer)

    check(18)
    with pytest.raises(ConfigError, match=re.escape(
            "reward.path: the reward model reads rollout rows of up to 18 tokens (the longest prompt, 10, + "
            "rollout.max_new_tokens=8, within the policy's context of 20) but its context is 17; lower "
            "data.max_prompt_length or rollout.max_new_tokens")):
        check(17)
    check(16, policy=policy.replace(max_position_embeddings=16))  # the sampler ends the responses there
    check(17, cfg=load_config(PPOConfig, config, ["reward.function=null", "reward.path=rm",
                                                  "rollout.stop_token_ids=[2,5]"]))  # retokenised
