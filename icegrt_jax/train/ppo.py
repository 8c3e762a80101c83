"""ICE-GRT: PPO with actor, critic, frozen reference and frozen reward model (paper section 3.3).

One iteration (``make_train_step``'s function): sample responses to a batch of prompts with the
actor (``rollout.micro_batch_size`` prompts at a time, default all); score them, each scoring
forward over as many rows at a time (``scoring_forward``): old log-probs (recomputed or the
sampler's per ``rollout.old_logprobs``), reference log-probs, values, reward-model scores (the LM
head runs on the response block only); shape per-token rewards with the KL penalty and compute
GAE advantages (whitened by default, the paper's advantage normalisation), and step the KL
controller with the rollout's KL (the new coefficient applies from the next iteration); then ``ppo.epochs`` passes of shuffled minibatches
update the actor (clipped surrogate, eq. 3, optional entropy bonus) and the critic (clipped
value loss), each with its own optimizer and learning rate. With one epoch, one minibatch and no
critic accumulation (``fuses_value_forward``) the critic's single step runs first, in one program
with the experience: its forward gives the values (one critic forward less an iteration; that
program's time counts in ``time_update_s``, not ``time_score_s``). With no actor accumulation
either (``fuses_rollout_forwards``) the actor's single step joins that program
(``make_joint_update``) and, with recomputed old log-probs, its forward gives them: the scoring
phase keeps the reference and reward forwards only. The trainer owns no formula:
they live in ``icegrt_jax.rl`` and ``icegrt_jax.losses``.

Sharding (``icegrt_jax.sharding``, as in SFT). The run's state (actor and critic train states,
KL controller, reward moments) is created on ``cfg.mesh`` by ``Partitioner.init_state``; the
frozen reference and reward model are placed with ``Partitioner.put``. Every device program has
explicit shardings: rollout rows (and minibatch rows) split over the data-parallel shards,
parameters by their logical axes, scalars replicated; the sampler runs inside
``partitioner.activate()`` on the placed actor. Since the shardings never change, each program
compiles once. The rollout rows, and each optimizer's micro-batches of a minibatch, must divide
by the data-parallel size (``check_rollout_batch``, before anything compiles).

Multi-process (``jax.distributed``): every process runs this same host loop on the global mesh.
Each holds the whole prompt list and draws the same batch; the sampler gathers its outputs to
every process (``sampling.to_host``), so decoding and re-tokenising see the whole rollout
everywhere (a ``reward.function`` runs on process 0, which broadcasts its scores:
``rollout.primary_scores``), and ``Partitioner.shard_batch`` hands each process's devices their
rows. Only process 0 logs; every process writes its shards of the checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from icegrt_jax import rl
from icegrt_jax.checkpoint import load_model_dir, save_model
from icegrt_jax.config import ConfigError, PPOConfig
from icegrt_jax.data.batching import BatchIterator
from icegrt_jax.data.sources import DataError, SourceReport, iter_records, required_text
from icegrt_jax.data.templates import get_template
from icegrt_jax.data.tokenize import (
    TokenizedExample,
    decode_response,
    load_tokenizer,
    pad_token_id,
    tokenize_prompt,
)
from icegrt_jax.hf import abstract_model, carried_generation_config
from icegrt_jax.models.heads import score_params_from_llama
from icegrt_jax.models.llama import LlamaConfig
from icegrt_jax.sampling import SamplingParams, generate
from icegrt_jax.sharding import (
    Partitioner,
    all_or_none,
    initialize_distributed,
    is_primary_process,
)
from icegrt_jax.train import ppo_eval, rollout
from icegrt_jax.train.loop import (
    check_output_dir,
    data_position_meta,
    open_run,
    shows_progress,
    train_loop,
)
from icegrt_jax.train.model_init import (
    existing_directory,
    init_model,
    place_frozen,
    run_tokenizer,
    with_numerics,
)
from icegrt_jax.train.ppo_updates import (
    fuses_rollout_forwards,
    fuses_value_forward,
    make_actor_update,
    make_critic_update,
    make_critic_update_with_values,
    make_joint_update,
    minibatch_indices,
    take_rows,
)
from icegrt_jax.train.reward import REWARD_STATS_FILE, read_reward_stats
from icegrt_jax.train.state import (
    TrainState,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
)


@flax.struct.dataclass
class PPOState:
    """Everything a resumed run needs besides the frozen models; ``step`` counts iterations."""

    step: jax.Array
    actor: TrainState
    critic: TrainState
    kl: rl.KLController
    reward_moments: rl.RunningMoments


# --- prompts -------------------------------------------------------------------------------------

def load_prompts(cfg: PPOConfig, tokenizer, key: str = "prompt_files"
                 ) -> tuple[list[TokenizedExample], int, SourceReport]:
    """Template-rendered prompt ids (source = the prompt text) of the files ``data.<key>``;
    too-long prompts are dropped and counted; the ``SourceReport`` counts blank lines and
    repeated records."""
    template, specs = get_template(cfg.data.template), getattr(cfg.data, key)
    if not specs:
        raise DataError(f"data.{key}: no prompt files given")
    examples, dropped, source = [], 0, SourceReport()
    for spec in specs:
        for where, record in iter_records(spec, source):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected an object, got {type(record).__name__}")
            text = required_text(record, "prompt", where)
            ids = tokenize_prompt(tokenizer, template, text)
            if len(ids) > cfg.data.max_prompt_length:
                dropped += 1
                continue
            examples.append(TokenizedExample(ids, np.zeros(len(ids), bool), text))
    if not examples and not dropped:
        raise DataError(f"data.{key} {', '.join(specs)}: no prompts (the files are empty)")
    if not examples:
        raise DataError(f"data.max_prompt_length={cfg.data.max_prompt_length}: every prompt of data.{key} is longer")
    return examples, dropped, source


def check_prompt_room(prompts, context: int, max_new_tokens: int) -> None:
    """At the start, not at the iteration that draws it: a prompt that leaves no room for a
    response in the model's ``context`` is an error; prompts that leave less than
    ``max_new_tokens`` are counted in a note (their responses end at the context)."""
    if too_long := [len(p) for p in prompts if len(p) >= context]:
        raise DataError(f"{len(too_long)} prompt(s) leave no room for a response in the model's context of {context} "
                        f"tokens (the longest has {max(too_long)}); set data.max_prompt_length below {context}")
    if (short := sum(len(p) + max_new_tokens > context for p in prompts)) and is_primary_process():
        print(f"[ppo] note: {short} prompt(s) leave less than rollout.max_new_tokens={max_new_tokens} tokens of "
              f"the model's context of {context}: their responses end there, counted as truncated")


def stop_ids(cfg: PPOConfig, tokenizer) -> tuple[int, ...]:
    """The token ids that end a response: ``rollout.stop_token_ids``, by default the tokenizer's EOS."""
    stop = cfg.rollout.stop_token_ids
    return (tokenizer.eos_token_id,) if stop is None else tuple(stop)


def check_readers_context(cfg: PPOConfig, prompts, llama, critic_cfg, roles: Roles, tokenizer, reward_tokenizer):
    """At the start: a ``ConfigError`` when a model that reads the rollout's tokens as they are has
    a context shorter than the longest rollout row (the longest prompt + ``rollout.max_new_tokens``,
    within the policy's context): past its context its positions are ones it never saw, and its
    values or scores would be silently wrong. The readers: the critic (from the reward model with
    ``critic_init: reward``), and the reward model when the policy's tokens pass through to it
    (retokenised rows have lengths not known before they are sampled)."""
    longest_prompt, new = max(len(p) for p in prompts), cfg.rollout.max_new_tokens
    longest = min(longest_prompt + new, llama.max_position_embeddings)
    readers = [("ppo.critic_init", "the critic", critic_cfg)]
    if roles.reward_config is not None and rollout.passes_tokens_through(tokenizer, reward_tokenizer,
                                                                           stop_ids(cfg, tokenizer)):
        readers.append(("reward.path", "the reward model", roles.reward_config))
    for key, name, model in readers:
        if model.max_position_embeddings < longest:
            raise ConfigError(
                f"{key}: {name} reads rollout rows of up to {longest} tokens (the longest prompt, {longest_prompt}, "
                f"+ rollout.max_new_tokens={new}, within the policy's context of {llama.max_position_embeddings}) "
                f"but its context is {model.max_position_embeddings}; lower data.max_prompt_length or "
                "rollout.max_new_tokens")


def collate_prompts(examples, buckets, pad_id, num_counted=None):
    """A prompt batch stays a list: the sampler buckets and pads it itself."""
    return list(examples)


def check_rollout_batch(partitioner: Partitioner, cfg: PPOConfig):
    """Raise a ``ShardingError`` unless the rollout rows, and each optimizer's micro-batches of a
    minibatch, split evenly over the data-parallel shards."""
    rows = cfg.data.prompts_per_iteration
    partitioner.check_batch_size(rows, what="data.prompts_per_iteration")
    if cfg.rollout.micro_batch_size is not None:
        partitioner.check_batch_size(cfg.rollout.micro_batch_size, what="rollout.micro_batch_size")
    for name, opt in (("actor", cfg.actor_optimizer), ("critic", cfg.critic_optimizer)):
        partitioner.check_batch_size(rows // cfg.ppo.minibatches, opt.grad_accum_steps,
                                     f"the {name}'s minibatch (data.prompts_per_iteration / ppo.minibatches)")


# --- the run -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Roles:
    """Graph definitions and frozen parameters (placed on the mesh) of the four PPO roles, and the
    reward model's config (None with a ``reward.function``)."""

    actor_graphdef: object
    critic_graphdef: object
    reference_params: object
    reward_graphdef: object | None
    reward_params: object | None
    reward_stats: dict | None
    reward_config: LlamaConfig | None


def rows_at_a_time(cfg: PPOConfig) -> int:
    """The rollout rows generated and scored at a time: ``rollout.micro_batch_size``, by default
    the iteration's prompts (the sampler's batch, its KV cache's rows; ``icegrt plan``'s too)."""
    return cfg.rollout.micro_batch_size or cfg.data.prompts_per_iteration


def scoring_forward(fn, graphdef, cfg: PPOConfig, rows: int | None = None):
    """A rollout forward ``fn(graphdef, params, tokens, attention_mask, *static)`` over ``rows``
    rows (default: the iteration's) ``rows_at_a_time`` at a time (``rollout.in_row_chunks``)."""
    chunks = (rows or cfg.data.prompts_per_iteration) // rows_at_a_time(cfg)
    return rollout.in_row_chunks(functools.partial(fn, graphdef), chunks)


def scoring_program(fn, graphdef, param_shardings, cfg: PPOConfig, partitioner: Partitioner, rows: int | None = None,
                    **static):
    """``scoring_forward`` jitted with its rows split over the data-parallel shards (``static``:
    ``partitioner.jit``'s options)."""
    rows_sh = partitioner.batch_sharding
    return partitioner.jit(scoring_forward(fn, graphdef, cfg, rows), in_shardings=(param_shardings, rows_sh, rows_sh),
                           out_shardings=rows_sh, **static)


def make_scorer(cfg: PPOConfig, roles: Roles, tokenizer, reward_tokenizer, score_function, partitioner: Partitioner,
                rows: int | None = None):
    """``score(prompts, result, tokens, attention_mask)``: the raw scores [rows] (split over the
    data-parallel shards) of a ``GenerationResult``'s ``rows`` rows (default: the iteration's),
    ``tokens`` and ``attention_mask`` its rows as sharded arrays. A ``reward.function`` gets the
    decoded responses (on process 0: ``rollout.primary_scores``); the reward model reads the
    policy's tokens as they are or, where it cannot (``rollout.passes_tokens_through``), the
    responses retokenised."""
    template = get_template(cfg.data.template)
    eos_ids = stop_ids(cfg, tokenizer)
    pass_through = rollout.passes_tokens_through(tokenizer, reward_tokenizer, eos_ids)
    reward_fn = (scoring_program(rollout.reward_model_scores, roles.reward_graphdef,
                                 partitioner.shardings(roles.reward_params), cfg, partitioner, rows)
                 if roles.reward_graphdef is not None else None)

    def score(prompts, result, tokens, attention_mask):
        if score_function is not None or not pass_through:
            responses = [decode_response(tokenizer, template, result.response_tokens(r), result.finished_by_eos[r])
                         for r in range(len(prompts))]  # without the stop token (EOS or another) it ended with
        if score_function is not None:
            return partitioner.shard_batch(rollout.primary_scores(lambda: score_function(prompts, responses),
                                                                  len(prompts), cfg.reward.function))
        if not pass_through:
            tokens, attention_mask = partitioner.shard_batch(rollout.retokenize_for_reward(
                reward_tokenizer, template, prompts, responses, result.finished_by_eos,
                pad_token_id(reward_tokenizer)))
        return reward_fn(roles.reward_params, tokens, attention_mask)

    return score


def make_train_step(cfg: PPOConfig, roles: Roles, tokenizer, reward_tokenizer, score_function, actor_tx, critic_tx,
                    *, partitioner: Partitioner, state_shardings):
    """The PPO iteration ``(PPOState, prompt_batch) -> (PPOState, metrics)`` (host orchestration
    of jitted pieces; the data flow is the module docstring's), sharded by ``partitioner`` with the
    ``PPOState`` laid out by ``state_shardings``."""
    p, temperature = cfg.ppo, cfg.rollout.temperature
    rows_sh, replicated = partitioner.batch_sharding, partitioner.replicated

    forward = functools.partial(scoring_program, cfg=cfg, partitioner=partitioner)
    logprob_fn = forward(rollout.sequence_logprobs, roles.actor_graphdef, state_shardings.actor.params,
                         static_argnums=(3, 4))
    reference_fn = forward(rollout.sequence_logprobs_without_entropy, roles.actor_graphdef,
                           state_shardings.actor.params, static_argnums=(3, 4))
    fused = fuses_value_forward(cfg)
    value_fn = (forward(rollout.critic_values, roles.critic_graphdef, state_shardings.critic.params)
                if not fused else None)
    experience = functools.partial(rollout.experience_from_scores, reward_cfg=cfg.reward,
                                   reward_stats=roles.reward_stats, loss_cfg=p)
    experience_fn = partitioner.jit(
        experience,
        in_shardings=(rows_sh,) * 6 + (replicated, replicated),
        out_shardings=(rows_sh, rows_sh, rows_sh, replicated, replicated))
    minibatch_fn = partitioner.jit(take_rows, in_shardings=(rows_sh, replicated), out_shardings=rows_sh)
    updates = update_programs(cfg, roles, actor_tx, critic_tx, experience, partitioner, state_shardings)
    eos_ids = stop_ids(cfg, tokenizer)
    score = make_scorer(cfg, roles, tokenizer, reward_tokenizer, score_function, partitioner)

    warned = set()

    def warn_once(message):
        if message is not None and not warned and is_primary_process():
            print(message, file=sys.stderr)
            warned.add(message)

    def iteration(state: PPOState, prompt_batch):
        began = time.perf_counter()
        step = int(state.step)
        sampling = SamplingParams(temperature=temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.rollout.max_new_tokens, eos_token_ids=eos_ids,
                                  seed=(cfg.training.seed * 1_000_003 + step) % 2**32,
                                  pad_id=pad_token_id(tokenizer))
        with partitioner.activate():
            result = generate((roles.actor_graphdef, state.actor.params), [e.input_ids for e in prompt_batch],
                              sampling, batch_size=rows_at_a_time(cfg), progress=shows_progress(cfg.logging))
        generated = time.perf_counter()

        rollout_rows = partitioner.shard_batch({"tokens": result.tokens, "attention_mask": result.attention_mask,
                                                "mask": result.mask[:, 1:], "finished_by_eos": result.finished_by_eos})
        tokens, attention_mask, mask = (rollout_rows[k] for k in ("tokens", "attention_mask", "mask"))
        response_actions = cfg.rollout.max_new_tokens
        joint = updates.joint is not None and step >= p.critic_warmup_iterations
        if cfg.rollout.old_logprobs == "sampler":  # action t emits token t + 1
            old_logprobs, entropy = partitioner.shard_batch(result.logprobs[:, 1:]), None
        elif joint:  # the joint update's actor forward gives them
            old_logprobs = entropy = None
        else:
            old_logprobs, entropy = logprob_fn(state.actor.params, tokens, attention_mask, temperature,
                                               response_actions)
        ref_logprobs = reference_fn(roles.reference_params, tokens, attention_mask, temperature, response_actions)
        raw_scores = score([e.source for e in prompt_batch], result, tokens, attention_mask)
        actor, critic = state.actor, state.critic
        if fused:  # the update's forwards give the values (and the old log-probs): they move into it
            jax.block_until_ready((old_logprobs, ref_logprobs, raw_scores))
            scored = time.perf_counter()
            rows = {**rollout_rows, "raw_scores": raw_scores, "ref_logprobs": ref_logprobs,
                    **({} if old_logprobs is None else {"old_logprobs": old_logprobs})}
        if joint:
            actor, critic, metrics, old_logprobs, update_entropy, values, (scores, adv, sequence_kl, kl, moments) = (
                updates.joint(actor, critic, rows, state.kl, state.reward_moments))
            entropy = update_entropy if cfg.rollout.old_logprobs == "recompute" else None  # as the forward's
        elif fused:
            critic, critic_metrics, values, (scores, adv, sequence_kl, kl, moments) = updates.critic_with_values(
                critic, rows, state.kl, state.reward_moments)
        else:
            values = value_fn(critic.params, tokens, attention_mask)
            scores, adv, sequence_kl, kl, moments = jax.block_until_ready(experience_fn(
                raw_scores, rollout_rows["finished_by_eos"], old_logprobs, ref_logprobs, values, mask, state.kl,
                state.reward_moments))
            scored = time.perf_counter()

        if joint:
            update_metrics = [metrics]
        else:
            experience = {"tokens": tokens, "attention_mask": attention_mask, "mask": mask,
                          "old_logprobs": old_logprobs, "advantages": adv.advantages, "old_values": values,
                          "returns": adv.returns}
            actor, critic, update_metrics = minibatch_updates(
                cfg, updates, minibatch_fn, actor, critic, experience, step, len(prompt_batch),
                critic_metrics if fused else None)
        jax.block_until_ready((actor, critic))
        updated = time.perf_counter()

        new_state = PPOState(step=state.step + 1, actor=actor, critic=critic, kl=kl, reward_moments=moments)
        metrics = _iteration_metrics(result, raw_scores, scores, sequence_kl, state.kl, adv, values, mask, entropy,
                                     update_metrics)
        metrics.update(time_generate_s=generated - began, time_score_s=scored - generated,
                       time_update_s=updated - scored, generated_tokens=float(result.lengths.sum()),
                       tokens=float(result.attention_mask.sum()))  # rates over a logging interval: loop.RATES
        warn_once(rollout.large_score_warning(metrics["score_abs_max"], cfg.reward, roles.reward_stats))
        return new_state, metrics

    return iteration


class UpdatePrograms(NamedTuple):
    """The update programs an iteration runs (None where not built): with
    ``fuses_rollout_forwards`` the joint program (and, for critic warm-up iterations, the
    critic's step with the values); else with ``fuses_value_forward`` the critic's step with the
    values and the actor's per minibatch; else the actor's and the critic's per minibatch."""

    joint: Callable | None
    actor: Callable | None
    critic_with_values: Callable | None
    critic: Callable | None


def update_programs(cfg: PPOConfig, roles: Roles, actor_tx, critic_tx, experience, partitioner: Partitioner,
                    state_shardings) -> UpdatePrograms:
    """Build the ``UpdatePrograms`` ``cfg`` uses (``experience``: the experience function the
    fused programs run inside)."""
    joint = actor = critic_with_values = critic = None
    if fuses_rollout_forwards(cfg):
        joint = make_joint_update(roles.actor_graphdef, roles.critic_graphdef, actor_tx, critic_tx, cfg, experience,
                                  partitioner=partitioner, state_shardings=state_shardings)
    else:
        actor = make_actor_update(roles.actor_graphdef, actor_tx, cfg, partitioner=partitioner,
                                  state_shardings=state_shardings.actor)
    fused = fuses_value_forward(cfg)
    if fused and (joint is None or cfg.ppo.critic_warmup_iterations):
        critic_with_values = make_critic_update_with_values(roles.critic_graphdef, critic_tx, cfg, experience,
                                                            partitioner=partitioner,
                                                            state_shardings=state_shardings.critic)
    elif not fused:
        critic = make_critic_update(roles.critic_graphdef, critic_tx, cfg, partitioner=partitioner,
                                    state_shardings=state_shardings.critic)
    return UpdatePrograms(joint, actor, critic_with_values, critic)


def minibatch_updates(cfg: PPOConfig, updates: UpdatePrograms, minibatch_fn, actor, critic, experience, step: int,
                      rows: int, critic_metrics: dict | None):
    """``ppo.epochs`` passes over shuffled minibatches of the ``experience`` rows: the actor's
    update (after the critic warm-up) and, unless the critic already stepped (its
    ``critic_metrics`` given), the critic's. Returns (actor, critic, metrics of each minibatch)."""
    p, update_metrics = cfg.ppo, []
    key = jax.random.fold_in(jax.random.key(cfg.training.seed), step)
    for epoch in range(p.epochs):
        for indices in minibatch_indices(jax.random.fold_in(key, epoch), rows, p.minibatches):
            minibatch = minibatch_fn(experience, indices)
            metrics = {}
            if step >= p.critic_warmup_iterations:
                actor, metrics = updates.actor(actor, minibatch)
            if updates.critic is not None:
                critic, critic_metrics = updates.critic(critic, minibatch)
            update_metrics.append({**metrics, **critic_metrics,
                                   "finite": critic_metrics["finite"] * metrics.get("finite", 1.0)})
    return actor, critic, update_metrics


def _iteration_metrics(result, raw_scores, scores, sequence_kl, kl_controller, adv, values, mask, entropy,
                       update_metrics) -> dict:
    averaged = {k: jnp.mean(jnp.stack([m[k] for m in update_metrics if k in m]))
                for k in sorted({k for m in update_metrics for k in m}) if k != "finite"}  # same order everywhere
    return {
        **averaged,
        "finite": jnp.min(jnp.stack([m["finite"] for m in update_metrics])),
        "score_raw_mean": jnp.mean(raw_scores), "score_raw_std": jnp.std(raw_scores),
        "score_mean": jnp.mean(scores), "score_std": jnp.std(scores), "score_abs_max": jnp.max(jnp.abs(scores)),
        "kl": jnp.mean(sequence_kl), "kl_coef": kl_controller.kl_coef,
        "rlhf_reward": jnp.mean(scores - kl_controller.kl_coef * sequence_kl),
        **({} if entropy is None else {"rollout_entropy": rl.masked_mean(entropy, mask)}),
        "response_length": float(result.lengths.mean()), "response_length_min": float(result.lengths.min()),
        "response_length_max": float(result.lengths.max()),
        "truncation_rate": float(1 - result.finished_by_eos.mean()),
        "value_mean": rl.masked_mean(values, mask),
        "advantage_mean": rl.masked_mean(adv.raw_advantages, mask),
        "advantage_std": jnp.sqrt(rl.masked_var(adv.raw_advantages, mask)),
        "return_mean": rl.masked_mean(adv.returns, mask), "return_std": jnp.sqrt(rl.masked_var(adv.returns, mask)),
        "explained_variance": rl.explained_variance(values, adv.returns, mask),
    }


def with_learning_rates(iteration, cfg: PPOConfig, total_updates: int):
    """``iteration`` whose metrics add ``actor_lr`` and ``critic_lr``: each role's rate at its
    first update of the iteration (the schedules run over optimizer updates, ``total_updates``)."""
    actor_rate = learning_rate_schedule(cfg.actor_optimizer, total_updates)
    critic_rate = learning_rate_schedule(cfg.critic_optimizer, total_updates)

    def step(state: PPOState, prompt_batch):
        rates = {"actor_lr": actor_rate(state.actor.step), "critic_lr": critic_rate(state.critic.step)}
        new_state, metrics = iteration(state, prompt_batch)
        return new_state, {**metrics, **rates}

    return step


def build_roles(cfg: PPOConfig, tokenizer, partitioner: Partitioner):
    """Actor and critic initial params (on the mesh: ``init_ppo_state`` copies them into the
    state), and the roles, with the frozen reference (ICE-Instruct) and reward model on the mesh
    in their compute dtype where it is narrower (``frozen_config``; otherwise they share the
    loaded arrays). The reward model runs with the run's numerics (``model.*``)."""
    reward_cfg = reward_graphdef = reward_params = reward_stats = reward_tokenizer = loaded_reward = None
    if cfg.reward.path is not None:
        reward_tokenizer = load_tokenizer(cfg.reward.path)
        if cfg.ppo.critic_init == "reward" and not rollout.same_tokenizer(tokenizer, reward_tokenizer):
            raise ConfigError(f"ppo.critic_init: 'reward' needs the reward model to read the policy's tokens, but "
                              f"{cfg.reward.path}'s tokenizer differs from the policy's (use critic_init: actor)")
        reward_cfg, loaded_reward = load_model_dir(cfg.reward.path, progress=shows_progress(cfg.logging), kind="score",
                                                   partitioner=partitioner, param_dtype=cfg.model.param_dtype)
        reward_cfg = with_numerics(reward_cfg, cfg.model)
        reward_graphdef, _ = abstract_model(reward_cfg, "score")
        stats_path = os.path.join(cfg.reward.path, REWARD_STATS_FILE)
        if cfg.reward.normalize == "stats":
            if not os.path.exists(stats_path):
                raise DataError(f"{stats_path}: not found (reward.normalize=stats needs it)")
            reward_stats = read_reward_stats(stats_path)
        reward_params = place_frozen(partitioner, loaded_reward, reward_cfg)
        if cfg.ppo.critic_init != "reward":
            loaded_reward = None
    llama, actor_params = init_model(cfg.model, cfg.training.seed, partitioner, min_vocab=len(tokenizer),
                                     progress=shows_progress(cfg.logging))
    if cfg.ppo.critic_init == "reward":
        critic_cfg, critic_params = reward_cfg, loaded_reward
    else:
        critic_cfg, critic_params = llama, score_params_from_llama(actor_params, cfg.training.seed + 1, llama)
    roles = Roles(actor_graphdef=abstract_model(llama)[0], critic_graphdef=abstract_model(critic_cfg, "score")[0],
                  reference_params=place_frozen(partitioner, actor_params, llama), reward_graphdef=reward_graphdef,
                  reward_params=reward_params, reward_stats=reward_stats, reward_config=reward_cfg)
    return llama, critic_cfg, actor_params, critic_params, roles, reward_tokenizer


def init_ppo_state(cfg: PPOConfig, actor_tx, critic_tx, actor_params, critic_params) -> PPOState:
    """Iteration 0: fresh optimizer states, the configured KL coefficient, no reward moments."""
    return PPOState(step=jnp.zeros((), jnp.int32),
                    actor=init_train_state(actor_params, actor_tx, cfg.training.seed),
                    critic=init_train_state(critic_params, critic_tx, cfg.training.seed),
                    kl=rl.init_kl_controller(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon),
                    reward_moments=rl.init_running_moments())


def run_ppo(cfg: PPOConfig) -> dict:
    """Train (or resume) ICE-GRT; writes config.yaml, metrics.jsonl, checkpoints/, final/ (the
    actor, an HF-exportable project checkpoint) and final-critic/. Runs sharded over ``cfg.mesh``,
    in one process or several (see the module docstring). With ``data.eval_prompt_files`` the
    actor is evaluated on them (``ppo_eval``) every ``training.eval_every`` iterations and at the last."""
    initialize_distributed()
    check_output_dir(cfg.training.output_dir)  # before any model loads
    partitioner = Partitioner.from_config(cfg.mesh)
    check_rollout_batch(partitioner, cfg)
    with all_or_none("loading the data"):  # a file one process cannot read stops every process
        tokenizer = run_tokenizer(cfg)
        if cfg.reward.path is not None:
            existing_directory("reward.path", cfg.reward.path)
        prompts, dropped, source = load_prompts(cfg, tokenizer)
        evaluation = load_prompts(cfg, tokenizer, "eval_prompt_files") if cfg.data.eval_prompt_files else None
        score_function = rollout.load_score_function(cfg.reward.function) if cfg.reward.function else None
    llama, critic_cfg, actor_params, critic_params, roles, reward_tokenizer = build_roles(cfg, tokenizer, partitioner)
    if outside := [i for i in cfg.rollout.stop_token_ids or () if not 0 <= i < llama.vocab_size]:
        raise ConfigError(f"rollout.stop_token_ids: {outside} outside the model's vocabulary [0, {llama.vocab_size})")
    eval_prompts = evaluation[0] if evaluation else []
    check_prompt_room(prompts + eval_prompts, llama.max_position_embeddings, cfg.rollout.max_new_tokens)
    check_readers_context(cfg, prompts + eval_prompts, llama, critic_cfg, roles, tokenizer, reward_tokenizer)
    batches = BatchIterator(prompts, batch_size=cfg.data.prompts_per_iteration, buckets=(10**9,), pad_id=0,
                            seed=cfg.data.shuffle_seed, group_by_length=False, collate_fn=collate_prompts)
    total = cfg.training.steps or cfg.training.epochs * batches.batches_per_epoch
    updates_per_iteration = cfg.ppo.epochs * cfg.ppo.minibatches
    actor_tx = make_optimizer(cfg.actor_optimizer, total * updates_per_iteration)
    critic_tx = make_optimizer(cfg.critic_optimizer, total * updates_per_iteration)
    # init_state copies the initial params into the state (the updates donate its arrays; the
    # reference may share the initial actor's, the critic the actor's backbone); the state's
    # shardings are every later call's, so nothing recompiles.
    state = partitioner.init_state(functools.partial(init_ppo_state, cfg, actor_tx, critic_tx),
                                   actor_params, critic_params)
    del actor_params, critic_params  # what the roles do not share is freed
    state_shardings = partitioner.shardings(state)

    state, checkpointer = open_run(cfg, "ppo", state, state_shardings, batches, [source.appended_to(
        f"{len(prompts)} prompts ({dropped} longer than data.max_prompt_length dropped; each epoch's last "
        f"iteration repeats {-len(prompts) % cfg.data.prompts_per_iteration} to fill its batch); {total} iterations")]
        + ([ppo_eval.eval_report_line(len(eval_prompts), *evaluation[1:])] if evaluation else []))
    out = cfg.training.output_dir
    iteration = make_train_step(cfg, roles, tokenizer, reward_tokenizer, score_function, actor_tx, critic_tx,
                                partitioner=partitioner, state_shardings=state_shardings)
    eval_fn = (ppo_eval.make_eval_fn(
        eval_prompts, roles.actor_graphdef,
        make_scorer(cfg, roles, tokenizer, reward_tokenizer, score_function, partitioner, rows_at_a_time(cfg)),
        rows=rows_at_a_time(cfg), max_new_tokens=cfg.rollout.max_new_tokens, stop_ids=stop_ids(cfg, tokenizer),
        pad_id=pad_token_id(tokenizer), partitioner=partitioner, progress=shows_progress(cfg.logging))
        if eval_prompts else None)
    result = train_loop(state=state, step_fn=with_learning_rates(iteration, cfg, total * updates_per_iteration),
                        batches=batches, total_steps=total, checkpointer=checkpointer,
                        meta_fn=data_position_meta(batches), training=cfg.training, logging=cfg.logging,
                        output_dir=out, eval_fn=eval_fn, desc="ppo",
                        progress_keys=("score_raw_mean", "kl", "response_length"))
    checkpointer.close()
    result.raise_if_stopped(checkpointer)
    save_model(llama, result.state.actor.params, os.path.join(out, "final"), tokenizer=tokenizer,
               extra_json=carried_generation_config(cfg.model.hf_path, llama))
    save_model(critic_cfg, result.state.critic.params, os.path.join(out, "final-critic"), tokenizer=tokenizer, kind="score")
    return result.last_metrics
