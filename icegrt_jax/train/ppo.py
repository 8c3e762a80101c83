"""ICE-GRT: PPO with actor, critic, frozen reference and frozen reward model (paper section 3.3).

One iteration (``make_train_step``'s function): sample responses to a batch of prompts with the
actor; score them (old log-probs, reference log-probs, values, reward-model scores); shape
per-token rewards with the KL penalty and compute GAE advantages (whitened by default, the
paper's advantage normalisation); then ``ppo.epochs`` passes of shuffled minibatches update the
actor (clipped surrogate, eq. 3, optional entropy bonus) and the critic (clipped value loss),
each with its own optimizer and learning rate; finally the KL controller steps. The trainer
owns no formula: they live in ``icegrt_jax.rl`` and ``icegrt_jax.losses``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from icegrt_jax import rl
from icegrt_jax.checkpoint import TrainCheckpointer, load_model_dir, save_model
from icegrt_jax.config import PPOConfig, config_to_yaml
from icegrt_jax.data.batching import BatchIterator, DataPosition
from icegrt_jax.data.sources import DataError, iter_records, required_text
from icegrt_jax.data.templates import get_template
from icegrt_jax.data.tokenize import TokenizedExample, load_tokenizer, pad_token_id, tokenize_prompt
from icegrt_jax.hf import abstract_model
from icegrt_jax.models.heads import score_params_from_llama
from icegrt_jax.sampling import SamplingParams, generate
from icegrt_jax.train import rollout
from icegrt_jax.train.loop import train_loop
from icegrt_jax.train.model_init import init_model
from icegrt_jax.train.state import (TrainState, accumulate_gradients, apply_gradients, init_train_state,
                                    make_optimizer, split_micro_batches)
from icegrt_jax.train.reward import REWARD_STATS_FILE


@flax.struct.dataclass
class PPOState:
    """Everything a resumed run needs besides the frozen models; ``step`` counts iterations."""

    step: jax.Array
    actor: TrainState
    critic: TrainState
    kl: rl.KLController
    reward_moments: rl.RunningMoments


# --- prompts -------------------------------------------------------------------------------------

def load_prompts(cfg: PPOConfig, tokenizer) -> tuple[list[TokenizedExample], int]:
    """Template-rendered prompt ids (source = the prompt text); too-long prompts are dropped and
    counted."""
    template = get_template(cfg.data.template)
    if not cfg.data.prompt_files:
        raise DataError("data.prompt_files: no prompt files given")
    examples, dropped = [], 0
    for spec in cfg.data.prompt_files:
        for where, record in iter_records(spec):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected an object, got {type(record).__name__}")
            text = required_text(record, "prompt", where)
            ids = tokenize_prompt(tokenizer, template, text)
            if len(ids) > cfg.data.max_prompt_length:
                dropped += 1
                continue
            examples.append(TokenizedExample(ids, np.zeros(len(ids), bool), text))
    if not examples:
        raise DataError(f"data.max_prompt_length={cfg.data.max_prompt_length}: every prompt is longer")
    return examples, dropped


def collate_prompts(examples, buckets, pad_id, num_counted=None):
    """A prompt batch stays a list: the sampler buckets and pads it itself."""
    return list(examples)


# --- jitted pieces -----------------------------------------------------------------------------

def _token_weight(mask, aggregate: str):
    """The weight that makes micro-batch accumulation exact for the loss's aggregation."""
    if aggregate == "token_mean":
        return jnp.sum(mask)
    return jnp.sum(jnp.any(mask > 0, axis=1))


def make_actor_update(graphdef, tx, cfg: PPOConfig):
    """Jitted ``(actor_state, minibatch) -> (actor_state, metrics)``: clipped surrogate (eq. 3)
    minus ``entropy_coef`` x entropy, accumulated exactly over micro-batches."""
    p = cfg.ppo

    def sum_loss(params, mb):
        logprobs, entropy = rollout.sequence_logprobs(graphdef, params, mb["tokens"], mb["attention_mask"],
                                                      cfg.rollout.temperature)
        loss, metrics = rl.ppo_policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                           p.clip_eps, p.dual_clip, p.aggregate)
        metrics = {"policy_loss": loss, "clip_frac": metrics["clip_frac"], "approx_kl": metrics["approx_kl"],
                   "ratio_mean": metrics["ratio_mean"], "entropy": rl.masked_mean(entropy, mb["mask"])}
        loss = loss - p.entropy_coef * metrics["entropy"]
        weight = _token_weight(mb["mask"], p.aggregate)
        return loss * weight, (weight, jax.tree.map(lambda m: m * weight, metrics))

    def update(state, minibatch):
        micro = split_micro_batches(minibatch, cfg.actor_optimizer.grad_accum_steps)
        grads, loss, _, metrics = accumulate_gradients(sum_loss, state.params, micro)
        state, update_metrics = apply_gradients(state, grads, loss, tx)
        return state, {**metrics, "actor_grad_norm": update_metrics["grad_norm"], "finite": update_metrics["finite"]}

    return jax.jit(update, donate_argnums=0)


def make_critic_update(graphdef, tx, cfg: PPOConfig):
    """Jitted ``(critic_state, minibatch) -> (critic_state, metrics)``: the clipped value loss."""

    def sum_loss(params, mb):
        values = rollout.critic_values(graphdef, params, mb["tokens"], mb["attention_mask"])
        loss, metrics = rl.value_loss(values, mb["old_values"], mb["returns"], mb["mask"], cfg.ppo.value_clip)
        weight = jnp.sum(mb["mask"])
        metrics = {"value_loss": loss, "value_clip_frac": metrics["value_clip_frac"]}
        return loss * weight, (weight, jax.tree.map(lambda m: m * weight, metrics))

    def update(state, minibatch):
        micro = split_micro_batches(minibatch, cfg.critic_optimizer.grad_accum_steps)
        grads, loss, _, metrics = accumulate_gradients(sum_loss, state.params, micro)
        state, update_metrics = apply_gradients(state, grads, loss, tx)
        return state, {**metrics, "critic_grad_norm": update_metrics["grad_norm"], "finite": update_metrics["finite"]}

    return jax.jit(update, donate_argnums=0)


def minibatch_indices(key, rows: int, minibatches: int) -> list[np.ndarray]:
    """A random permutation of the rollout rows cut into equal minibatches."""
    order = np.asarray(jax.random.permutation(key, rows))
    return np.split(order, minibatches)


# --- the run -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Roles:
    """Graph definitions and frozen parameters of the four PPO roles."""

    actor_graphdef: object
    critic_graphdef: object
    reference_params: object
    reward_graphdef: object | None
    reward_params: object | None
    reward_stats: dict | None


def make_train_step(cfg: PPOConfig, roles: Roles, tokenizer, reward_tokenizer, score_function, actor_tx, critic_tx):
    """The PPO iteration ``(PPOState, prompt_batch) -> (PPOState, metrics)`` (host orchestration
    of jitted pieces; the data flow is the module docstring's)."""
    p, temperature = cfg.ppo, cfg.rollout.temperature
    logprob_fn = jax.jit(functools.partial(rollout.sequence_logprobs, roles.actor_graphdef),
                         static_argnums=3)
    value_fn = jax.jit(functools.partial(rollout.critic_values, roles.critic_graphdef))
    advantage_fn = jax.jit(functools.partial(rollout.compute_advantages, cfg=p))
    actor_update = make_actor_update(roles.actor_graphdef, actor_tx, cfg)
    critic_update = make_critic_update(roles.critic_graphdef, critic_tx, cfg)
    reward_fn = (jax.jit(functools.partial(rollout.reward_model_scores, roles.reward_graphdef))
                 if roles.reward_graphdef is not None else None)
    template = get_template(cfg.data.template)
    pass_through = reward_tokenizer is not None and rollout.same_tokenizer(tokenizer, reward_tokenizer)
    eos_ids = (tokenizer.eos_token_id,)

    def score(prompts, result, tokens, attention_mask):
        if score_function is not None or not pass_through:
            responses = [tokenizer.decode(result.response_tokens(r), skip_special_tokens=True)
                         for r in range(len(prompts))]
        if score_function is not None:
            return jnp.asarray(np.asarray(score_function(prompts, responses), np.float32))
        if not pass_through:
            tokens, attention_mask = rollout.retokenize_for_reward(
                reward_tokenizer, template, prompts, responses, result.finished_by_eos,
                pad_token_id(reward_tokenizer))
        return reward_fn(roles.reward_params, jnp.asarray(tokens), jnp.asarray(attention_mask))

    def iteration(state: PPOState, prompt_batch):
        began = time.perf_counter()
        step = int(state.step)
        sampling = SamplingParams(temperature=temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.rollout.max_new_tokens, eos_token_ids=eos_ids,
                                  seed=(cfg.training.seed * 1_000_003 + step) % 2**32,
                                  pad_id=pad_token_id(tokenizer))
        result = generate((roles.actor_graphdef, state.actor.params), [e.input_ids for e in prompt_batch], sampling)
        generated = time.perf_counter()

        tokens, attention_mask = jnp.asarray(result.tokens), jnp.asarray(result.attention_mask)
        mask = jnp.asarray(result.mask[:, 1:])
        old_logprobs, entropy = logprob_fn(state.actor.params, tokens, attention_mask, temperature)
        ref_logprobs, _ = logprob_fn(roles.reference_params, tokens, attention_mask, temperature)
        values = value_fn(state.critic.params, tokens, attention_mask)
        raw_scores = score([e.source for e in prompt_batch], result, tokens, attention_mask)
        scores, moments = rollout.shape_scores(raw_scores, jnp.asarray(result.finished_by_eos), state.reward_moments,
                                               cfg.reward.normalize, roles.reward_stats, cfg.reward.clip,
                                               cfg.reward.missing_eos_penalty)
        adv = advantage_fn(scores, old_logprobs, ref_logprobs, values, mask, state.kl.kl_coef)
        scored = time.perf_counter()

        experience = {"tokens": tokens, "attention_mask": attention_mask, "mask": mask,
                      "old_logprobs": old_logprobs, "advantages": adv.advantages, "old_values": values,
                      "returns": adv.returns}
        actor, critic = state.actor, state.critic
        update_metrics, key = [], jax.random.fold_in(jax.random.key(cfg.training.seed), step)
        for epoch in range(p.epochs):
            for rows in minibatch_indices(jax.random.fold_in(key, epoch), len(prompt_batch), p.minibatches):
                minibatch = jax.tree.map(lambda x: x[rows], experience)
                metrics = {}
                if step >= p.critic_warmup_iterations:
                    actor, metrics = actor_update(actor, minibatch)
                critic, critic_metrics = critic_update(critic, minibatch)
                update_metrics.append({**metrics, **critic_metrics,
                                       "finite": critic_metrics["finite"] * metrics.get("finite", 1.0)})
        sequence_kl = jnp.sum(rl.kl_penalty(old_logprobs, ref_logprobs, "k1") * mask, axis=1)
        kl = rl.update_kl_controller(state.kl, jnp.mean(sequence_kl), len(prompt_batch))
        updated = time.perf_counter()

        new_state = PPOState(step=state.step + 1, actor=actor, critic=critic, kl=kl, reward_moments=moments)
        metrics = _iteration_metrics(result, raw_scores, scores, sequence_kl, state.kl, adv, values, mask, entropy,
                                     update_metrics)
        generated_tokens = float(result.lengths.sum())
        metrics.update(time_generate_s=generated - began, time_score_s=scored - generated,
                       time_update_s=updated - scored, generate_tokens_per_s=generated_tokens / (generated - began),
                       tokens_per_s=float(result.attention_mask.sum()) / (updated - began))
        return new_state, metrics

    return iteration


def _iteration_metrics(result, raw_scores, scores, sequence_kl, kl_controller, adv, values, mask, entropy,
                       update_metrics) -> dict:
    averaged = {k: jnp.mean(jnp.stack([m[k] for m in update_metrics if k in m]))
                for k in {k for m in update_metrics for k in m} if k != "finite"}
    residual_var = rl.masked_var(adv.returns - values, mask)
    return {
        **averaged,
        "loss": averaged.get("policy_loss", averaged["value_loss"]),
        "finite": jnp.min(jnp.stack([m["finite"] for m in update_metrics])),
        "score_raw_mean": jnp.mean(raw_scores), "score_raw_std": jnp.std(raw_scores),
        "score_mean": jnp.mean(scores), "score_std": jnp.std(scores),
        "kl": jnp.mean(sequence_kl), "kl_coef": kl_controller.kl_coef,
        "rollout_entropy": rl.masked_mean(entropy, mask),
        "response_length": float(result.lengths.mean()), "truncation_rate": float(1 - result.finished_by_eos.mean()),
        "advantage_mean": rl.masked_mean(adv.raw_advantages, mask),
        "advantage_std": jnp.sqrt(rl.masked_var(adv.raw_advantages, mask)),
        "return_mean": rl.masked_mean(adv.returns, mask), "return_std": jnp.sqrt(rl.masked_var(adv.returns, mask)),
        "explained_variance": 1.0 - residual_var / jnp.maximum(rl.masked_var(adv.returns, mask), 1e-8),
    }


def build_roles(cfg: PPOConfig, tokenizer):
    """Actor/reference params (ICE-Instruct), critic params and the frozen reward model."""
    llama, actor_params = init_model(cfg.model, cfg.training.seed, min_vocab=len(tokenizer))
    reward_graphdef = reward_params = reward_stats = reward_tokenizer = None
    if cfg.reward.path is not None:
        reward_cfg, reward_params = load_model_dir(cfg.reward.path)
        reward_graphdef, _ = abstract_model(reward_cfg, "score")
        reward_tokenizer = load_tokenizer(cfg.reward.path)
        stats_path = os.path.join(cfg.reward.path, REWARD_STATS_FILE)
        if os.path.exists(stats_path):
            with open(stats_path) as f:
                reward_stats = json.load(f)
        elif cfg.reward.normalize == "stats":
            raise DataError(f"{stats_path}: not found (reward.normalize=stats needs it)")
    if cfg.ppo.critic_init == "reward":
        critic_cfg, critic_params = reward_cfg, reward_params
    else:
        critic_cfg, critic_params = llama, score_params_from_llama(actor_params, cfg.training.seed + 1, llama)
    roles = Roles(actor_graphdef=abstract_model(llama)[0], critic_graphdef=abstract_model(critic_cfg, "score")[0],
                  reference_params=actor_params, reward_graphdef=reward_graphdef, reward_params=reward_params,
                  reward_stats=reward_stats)
    return llama, critic_cfg, actor_params, critic_params, roles, reward_tokenizer


def run_ppo(cfg: PPOConfig) -> dict:
    """Train (or resume) ICE-GRT; writes config.yaml, metrics.jsonl, checkpoints/, final/ (the
    actor, an HF-exportable project checkpoint) and final-critic/."""
    tokenizer = load_tokenizer(cfg.data.tokenizer_path or cfg.model.hf_path)
    prompts, dropped = load_prompts(cfg, tokenizer)
    score_function = rollout.load_score_function(cfg.reward.function) if cfg.reward.function else None
    llama, critic_cfg, actor_params, critic_params, roles, reward_tokenizer = build_roles(cfg, tokenizer)
    batches = BatchIterator(prompts, batch_size=cfg.data.prompts_per_iteration, buckets=(10**9,), pad_id=0,
                            seed=cfg.data.shuffle_seed, group_by_length=False, collate_fn=collate_prompts)
    total = cfg.training.steps or cfg.training.epochs * batches.batches_per_epoch
    updates_per_iteration = cfg.ppo.epochs * cfg.ppo.minibatches
    actor_tx = make_optimizer(cfg.actor_optimizer, total * updates_per_iteration)
    critic_tx = make_optimizer(cfg.critic_optimizer, total * updates_per_iteration)
    # Own copies: the updates donate their state, and the reference / reward model share arrays.
    owned = functools.partial(jax.tree.map, jnp.copy)
    state = PPOState(step=jnp.zeros((), jnp.int32),
                     actor=init_train_state(owned(actor_params), actor_tx, cfg.training.seed),
                     critic=init_train_state(owned(critic_params), critic_tx, cfg.training.seed),
                     kl=rl.init_kl_controller(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon),
                     reward_moments=rl.init_running_moments())

    out = cfg.training.output_dir
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(config_to_yaml(cfg))
    print(f"[ppo] {len(prompts)} prompts ({dropped} longer than data.max_prompt_length dropped); {total} iterations")
    checkpointer = TrainCheckpointer(os.path.join(out, "checkpoints"), keep=cfg.training.keep_checkpoints)
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        batches.position = DataPosition(**meta["data_position"])
        print(f"[ppo] resumed from iteration {int(state.step)} ({checkpointer.directory})")
    iteration = make_train_step(cfg, roles, tokenizer, reward_tokenizer, score_function, actor_tx, critic_tx)
    result = train_loop(state=state, step_fn=iteration, batches=batches, total_steps=total, checkpointer=checkpointer,
                        meta_fn=lambda: {"data_position": dataclasses.asdict(batches.position)},
                        training=cfg.training, logging=cfg.logging, output_dir=out, desc="ppo")
    checkpointer.close()
    if not result.stopped_early:
        save_model(llama, result.state.actor.params, os.path.join(out, "final"), tokenizer=tokenizer)
        save_model(critic_cfg, result.state.critic.params, os.path.join(out, "final-critic"), kind="score")
    return result.last_metrics
