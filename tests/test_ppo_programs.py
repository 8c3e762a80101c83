"""The fused PPO update programs against the separate ones on the same rollout rows: the critic's
step that gives the values (``make_critic_update_with_values``) and the joint actor + critic
step (``make_joint_update``). Plain SGD, so parameters differ by lr x the gradient difference
(Adam's first step would amplify float noise to lr x sign(g)); atol 1e-5 for float32 reduction
order."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from icegrt_jax import rl
from icegrt_jax.config import MeshConfig, PPOConfig
from icegrt_jax.models.heads import ScoreModel
from icegrt_jax.models.llama import Llama, preset
from icegrt_jax.sharding import Partitioner
from icegrt_jax.train import ppo_updates, rollout
from icegrt_jax.train.state import init_train_state

ROWS, LENGTH, RESPONSE = 4, 12, 6
close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
copy = functools.partial(jax.tree.map, jnp.copy)  # the updates donate their states' buffers


def rollout_rows(vocab: int) -> dict:
    """Four rows of 12 tokens, the last 6 actions the response block: a left-padded prompt, a
    response that ended early, random scores and log-probs."""
    rng = np.random.default_rng(0)
    attention_mask = np.ones((ROWS, LENGTH), np.int32)
    attention_mask[1, :3] = 0
    mask = np.zeros((ROWS, LENGTH - 1), np.float32)
    mask[:, LENGTH - 1 - RESPONSE:] = 1
    mask[2, 9:] = 0
    return {"tokens": jnp.asarray(rng.integers(1, vocab, (ROWS, LENGTH)), jnp.int32),
            "attention_mask": jnp.asarray(attention_mask), "mask": jnp.asarray(mask),
            "raw_scores": jnp.asarray(rng.normal(size=ROWS), jnp.float32),
            "finished_by_eos": jnp.asarray([True, False, True, False]),
            "old_logprobs": jnp.asarray(rng.normal(-3, 1, (ROWS, LENGTH - 1)), jnp.float32),
            "ref_logprobs": jnp.asarray(rng.normal(-3, 1, (ROWS, LENGTH - 1)), jnp.float32)}


def _changed(a, b):
    return any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def setup():
    cfg = PPOConfig()
    cfg.rollout.max_new_tokens = RESPONSE
    cfg.rollout.temperature = 0.8
    model_cfg = preset("tiny", vocab_size=64)
    actor = nnx.split(Llama(model_cfg, nnx.Rngs(2)))
    critic = nnx.split(ScoreModel(model_cfg, nnx.Rngs(3)))
    kl, moments = rl.init_kl_controller(0.05, None, 10000), rl.init_running_moments()
    experience = functools.partial(rollout.experience_from_scores, reward_cfg=cfg.reward, reward_stats=None,
                                   loss_cfg=cfg.ppo)
    one_device = Partitioner.from_config(MeshConfig(data=1), jax.devices()[:1])
    return types.SimpleNamespace(cfg=cfg, actor=actor, critic=critic, kl=kl, moments=moments, experience=experience,
                                 one_device=one_device, rows=rollout_rows(64))


def separate_experience(s, old_logprobs):
    """The separate path's values and experience on ``s.rows``."""
    graphdef, params = s.critic
    values = rollout.critic_values(graphdef, params, s.rows["tokens"], s.rows["attention_mask"])
    return values, s.experience(s.rows["raw_scores"], s.rows["finished_by_eos"], old_logprobs,
                                s.rows["ref_logprobs"], values, s.rows["mask"], s.kl, s.moments)


def test_critic_update_with_values_returns_the_separate_paths_state(setup):
    """The critic's step with the values against a separate value forward +
    ``experience_from_scores`` + ``make_critic_update``."""
    s, (graphdef, params) = setup, setup.critic
    tx = optax.sgd(0.5)
    state = init_train_state(copy(params), tx, 0)
    fused = ppo_updates.make_critic_update_with_values(graphdef, tx, s.cfg, s.experience, partitioner=s.one_device,
                                               state_shardings=s.one_device.shardings(state))
    fused_state, fused_metrics, fused_values, fused_experience = fused(copy(state), s.rows, s.kl,
                                                                       s.moments)
    values, experience = separate_experience(s, s.rows["old_logprobs"])
    minibatch = {**s.rows, "old_values": values, "returns": experience[1].returns}
    separate_state, separate_metrics = ppo_updates.make_critic_update(graphdef, tx, s.cfg)(state, minibatch)
    close(fused_values, values)
    jax.tree.map(close, fused_experience, experience)
    jax.tree.map(close, fused_state.params, separate_state.params)
    assert _changed(fused_state.params, params)  # a step was taken
    for key in ("value_loss", "value_clip_frac", "critic_grad_norm"):
        close(fused_metrics[key], separate_metrics[key], err_msg=key)


@pytest.mark.parametrize("old_logprobs", ["recompute", "sampler"])
def test_joint_update_returns_the_separate_paths_states(setup, old_logprobs):
    """The joint program against the separate path: the actor's forward for the old log-probs
    (``recompute``; ``sampler``: the rows' own), a value forward, ``experience_from_scores``,
    then ``make_actor_update`` and ``make_critic_update``, each with its own SGD learning rate."""
    s = setup
    cfg = dataclasses.replace(s.cfg, rollout=dataclasses.replace(s.cfg.rollout, old_logprobs=old_logprobs))
    (actor_graphdef, actor_params), (critic_graphdef, critic_params) = s.actor, s.critic
    actor_tx, critic_tx = optax.sgd(0.5), optax.sgd(0.125)
    state = types.SimpleNamespace(actor=init_train_state(copy(actor_params), actor_tx, 0),
                                  critic=init_train_state(copy(critic_params), critic_tx, 0))
    joint = ppo_updates.make_joint_update(actor_graphdef, critic_graphdef, actor_tx, critic_tx, cfg, s.experience,
                                  partitioner=s.one_device,
                                  state_shardings=types.SimpleNamespace(**s.one_device.shardings(vars(state))))
    rows = dict(s.rows)
    if old_logprobs == "recompute":
        del rows["old_logprobs"]
    actor, critic, metrics, joint_old, joint_entropy, joint_values, joint_experience = joint(
        copy(state.actor), copy(state.critic), rows, s.kl, s.moments)

    if old_logprobs == "recompute":
        old, entropy = rollout.sequence_logprobs(actor_graphdef, actor_params, s.rows["tokens"],
                                                 s.rows["attention_mask"], cfg.rollout.temperature, RESPONSE)
        close(joint_entropy, entropy)
    else:
        old = s.rows["old_logprobs"]
    values, experience = separate_experience(s, old)
    minibatch = {**s.rows, "old_logprobs": old, "advantages": experience[1].advantages, "old_values": values,
                 "returns": experience[1].returns}
    separate_actor, actor_metrics = ppo_updates.make_actor_update(actor_graphdef, actor_tx, cfg)(state.actor, minibatch)
    separate_critic, critic_metrics = ppo_updates.make_critic_update(critic_graphdef, critic_tx, cfg)(state.critic,
                                                                                              minibatch)
    close(joint_old, old)
    close(joint_values, values)
    jax.tree.map(close, joint_experience, experience)
    jax.tree.map(close, actor.params, separate_actor.params)
    jax.tree.map(close, critic.params, separate_critic.params)
    assert _changed(actor.params, actor_params) and _changed(critic.params, critic_params)
    for key, expected in {**actor_metrics, **critic_metrics}.items():
        close(metrics[key], expected, err_msg=key)
    if old_logprobs == "recompute":  # pi / pi_old of the step's own forward: exactly 1
        assert metrics["ratio_mean"] == 1 and metrics["approx_kl"] == 0 and metrics["clip_frac"] == 0


def test_plan_counts_the_joint_updates_transients_together():
    """One epoch, one minibatch, no accumulation: the plan's update transient is the joint
    program's, both updates' gradients and activations at once."""
    from icegrt_jax.config_loader import load_config
    from icegrt_jax.plan import plan_ppo

    cfg = load_config(PPOConfig, None, [
        "model.preset=tiny", "data.prompt_files=[p.jsonl]", "data.tokenizer_path=tok", "data.max_prompt_length=16",
        "data.prompts_per_iteration=4", "rollout.max_new_tokens=8", "reward.path=no-such-reward-model"])
    assert ppo_updates.fuses_rollout_forwards(cfg)
    transients = plan_ppo(cfg, 1.0, reward_preset="tiny").transients
    assert transients["update: actor + critic"] == transients["update: actor"] + transients["update: critic"] > 0


def test_plan_counts_the_frozen_roles_in_the_compute_dtype():
    """bf16 compute over fp32 master weights: the trained roles' params count 4 bytes each, the
    frozen reference's and reward model's 2, as ``ppo.build_roles`` places them."""
    from icegrt_jax.config_loader import load_config
    from icegrt_jax.plan import plan_ppo

    cfg = load_config(PPOConfig, None, [
        "model.preset=tiny", "model.dtype=bfloat16", "model.param_dtype=float32", "data.prompt_files=[p.jsonl]",
        "data.tokenizer_path=tok", "data.max_prompt_length=16", "data.prompts_per_iteration=4",
        "rollout.max_new_tokens=8", "reward.path=no-such-reward-model"])
    roles = {r.role: r for r in plan_ppo(cfg, 1.0, reward_preset="tiny").roles}
    assert roles["reference"].params * 2 == roles["actor"].params
    assert roles["reward"].params * 2 == roles["critic"].params  # the same tiny backbone and score head
    assert "fp32 params / bf16 compute" in roles["actor"].model
    assert "bf16 params / bf16 compute" in roles["reward"].model


def test_actor_update_accumulated_over_micro_batches_equals_one_batch(setup):
    """Two micro-batches of rows with different response lengths give the one-batch step and
    metrics with the sequence-mean aggregation (whose weight, the sequence count, is not the token
    count): the loss (surrogate and entropy bonus, both aggregated so) through ``_token_weight``,
    the token-mean metrics (``dual_clip_frac`` among them) through their token counts."""
    s, (graphdef, params) = setup, setup.actor
    ppo_cfg = dataclasses.replace(s.cfg.ppo, aggregate="seq_mean_token_mean", entropy_coef=0.05, dual_clip=3.0)
    cfg = dataclasses.replace(s.cfg, ppo=ppo_cfg)
    rng = np.random.default_rng(5)
    minibatch = {**s.rows, "advantages": jnp.asarray(rng.normal(size=(ROWS, LENGTH - 1)), jnp.float32)}
    tx = optax.sgd(0.5)
    results = {}
    for steps in (1, 2):
        run_cfg = dataclasses.replace(cfg, actor_optimizer=dataclasses.replace(cfg.actor_optimizer, grad_accum_steps=steps))
        results[steps] = ppo_updates.make_actor_update(graphdef, tx, run_cfg)(init_train_state(copy(params), tx, 0), minibatch)
    (one_state, one), (two_state, two) = results[1], results[2]
    jax.tree.map(close, two_state.params, one_state.params)
    assert _changed(one_state.params, params)
    assert set(one) == set(two) and "tokens" not in one
    for key in ("policy_loss", *ppo_updates.TOKEN_MEAN_METRICS):
        close(two[key], one[key], err_msg=key)
