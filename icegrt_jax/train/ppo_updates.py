"""The PPO update programs: the actor's clipped-surrogate step, the critic's clipped value-loss
step, and the fused programs that compute the experience inside the update (one forward of each
model fewer an iteration; ``fuses_value_forward``, ``fuses_rollout_forwards``).

Each builder returns a jitted function that donates the train state; micro-batch accumulation is
exact for the loss's aggregation (``_token_weight``, ``policy_token_means``). The losses
themselves are ``icegrt_jax.rl``'s. Used by ``icegrt_jax.train.ppo``'s iteration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from icegrt_jax import rl
from icegrt_jax.config import PPOConfig
from icegrt_jax.sharding import Partitioner
from icegrt_jax.train import rollout
from icegrt_jax.train.state import (
    accumulate_gradients,
    apply_gradients,
    means_from_sums,
    split_micro_batches,
)


def _token_weight(mask, aggregate: str):
    """The weight that makes micro-batch accumulation exact for the loss's aggregation."""
    if aggregate == "token_mean":
        return jnp.sum(mask)
    return jnp.sum(jnp.any(mask > 0, axis=1))


def _jit_update(update, partitioner: Partitioner | None, state_shardings):
    """``update(state, minibatch)`` jitted with the state donated; sharded with a ``partitioner``."""
    if partitioner is None:
        return jax.jit(update, donate_argnums=0)
    return partitioner.jit_train_step(update, state_shardings)


def make_actor_update(graphdef, tx, cfg: PPOConfig, *, partitioner: Partitioner | None = None,
                      state_shardings=None):
    """Jitted ``(actor_state, minibatch) -> (actor_state, metrics)``: clipped surrogate (eq. 3)
    minus ``entropy_coef`` x entropy, accumulated exactly over micro-batches. With a
    ``partitioner`` it runs sharded (the state laid out by ``state_shardings``)."""

    def sum_loss(params, mb):
        return _policy_loss_sums(*_actor_logprobs(graphdef, params, mb, cfg), mb, cfg.ppo)

    def update(state, minibatch):
        micro = split_micro_batches(minibatch, cfg.actor_optimizer.grad_accum_steps)
        accumulated = policy_token_means(accumulate_gradients(sum_loss, state.params, micro))
        return _optimizer_step(state, accumulated, tx, "actor")

    return _jit_update(update, partitioner, state_shardings)


def _actor_logprobs(graphdef, params, rows, cfg: PPOConfig):
    """(log pi(a_t | s_t), entropy) [R, L-1] of the rollout ``rows`` (LM head on the response block)."""
    return rollout.sequence_logprobs(graphdef, params, rows["tokens"], rows["attention_mask"],
                                     cfg.rollout.temperature, cfg.rollout.max_new_tokens)


TOKEN_MEAN_METRICS = ("clip_frac", "approx_kl", "ratio_mean", "dual_clip_frac", "entropy")  # the third from last with ppo.dual_clip


def _policy_loss_sums(logprobs, entropy, mb, p):
    """((clipped surrogate - entropy_coef x entropy) x W, (W, metric sums)), both terms aggregated
    as ``ppo.aggregate`` and W = ``_token_weight``. ``policy_loss`` (the surrogate) is summed x W, the
    ``TOKEN_MEAN_METRICS`` x the token count n, and n itself is carried as ``tokens``, so that
    after accumulation ``policy_token_means`` gives their exact means over the whole minibatch."""
    mask = mb["mask"]
    loss, metrics = rl.ppo_policy_loss(logprobs, mb["old_logprobs"], mb["advantages"], mask,
                                       p.clip_eps, p.dual_clip, p.aggregate)
    metrics = {**{k: metrics[k] for k in TOKEN_MEAN_METRICS[:-1] if k in metrics}, "entropy": rl.masked_mean(entropy, mask)}
    weight, tokens = _token_weight(mask, p.aggregate), jnp.sum(mask).astype(jnp.float32)
    sums = {"policy_loss": loss * weight, "tokens": tokens, **{k: m * tokens for k, m in metrics.items()}}
    if p.entropy_coef:  # only then does the entropy enter the gradient (no backward pass for 0 x H)
        loss = loss - p.entropy_coef * rl.aggregate_tokens(entropy, mask, p.aggregate)
    return loss * weight, (weight, sums)


def policy_token_means(accumulated):
    """``accumulate_gradients``' result with the token-mean metrics of ``_policy_loss_sums``
    made exact: (sum_i m_i n_i / W) / (sum_i n_i / W) = sum_i m_i n_i / sum_i n_i; ``tokens`` dropped."""
    grads, loss, weight, metrics = accumulated
    metrics = dict(metrics)
    tokens = metrics.pop("tokens")
    safe = jnp.where(tokens > 0, tokens, 1.0)
    return grads, loss, weight, {k: m / safe if k in TOKEN_MEAN_METRICS else m for k, m in metrics.items()}


def make_critic_update(graphdef, tx, cfg: PPOConfig, *, partitioner: Partitioner | None = None,
                       state_shardings=None):
    """Jitted ``(critic_state, minibatch) -> (critic_state, metrics)``: the clipped value loss
    (sharded like ``make_actor_update``)."""

    def sum_loss(params, mb):
        values = rollout.critic_values(graphdef, params, mb["tokens"], mb["attention_mask"])
        return _value_loss_sums(values, mb, cfg.ppo.value_clip)

    def update(state, minibatch):
        micro = split_micro_batches(minibatch, cfg.critic_optimizer.grad_accum_steps)
        return _optimizer_step(state, accumulate_gradients(sum_loss, state.params, micro), tx, "critic")

    return _jit_update(update, partitioner, state_shardings)


def _value_loss_sums(values, mb, clip):
    """(clipped value loss x W, (W, metrics x W)), W = the minibatch's response tokens."""
    loss, metrics = rl.value_loss(values, mb["old_values"], mb["returns"], mb["mask"], clip)
    weight = jnp.sum(mb["mask"])
    metrics = {"value_loss": loss, "value_clip_frac": metrics["value_clip_frac"]}
    return loss * weight, (weight, jax.tree.map(lambda m: m * weight, metrics))


def _optimizer_step(state, accumulated, tx, role: str):
    """Apply ``accumulate_gradients``' (grads, loss, weight, metrics) to ``role``'s (actor or
    critic) state; metrics gain ``{role}_grad_norm`` and ``finite``."""
    grads, loss, _, metrics = accumulated
    state, update_metrics = apply_gradients(state, grads, loss, tx)
    return state, {**metrics, f"{role}_grad_norm": update_metrics["grad_norm"], "finite": update_metrics["finite"]}


def fuses_value_forward(cfg: PPOConfig) -> bool:
    """Whether the critic takes exactly one step on the whole rollout an iteration (one epoch, one
    minibatch, no accumulation), so that ``make_critic_update_with_values`` applies."""
    return cfg.ppo.epochs == 1 and cfg.ppo.minibatches == 1 and cfg.critic_optimizer.grad_accum_steps == 1


def make_critic_update_with_values(graphdef, tx, cfg: PPOConfig, experience_fn, *, partitioner: Partitioner,
                                   state_shardings):
    """The critic's value forward, the experience and the critic's one step, in one program (when
    ``fuses_value_forward``). The update's forward runs at the parameters the scoring phase's value
    forward would, so its values (gradient stopped) are V(s_t) for GAE and the clipped loss's old
    values: the separate forward is skipped. ``experience_fn``: ``rollout.experience_from_scores``
    with its keywords bound. Jitted ``(critic_state, rows, kl, moments) -> (critic_state, metrics,
    values, experience_fn's outputs)``; rows: tokens, attention_mask, mask, raw_scores,
    finished_by_eos, old_logprobs, ref_logprobs."""

    def sum_loss(params, rows, kl, moments):
        values = rollout.critic_values(graphdef, params, rows["tokens"], rows["attention_mask"])
        old_values, experience = _experience_in_update(experience_fn, rows, rows["old_logprobs"], values, kl, moments)
        mb = {"old_values": old_values, "returns": experience[1].returns, "mask": rows["mask"]}
        loss_sum, (weight, metric_sums) = _value_loss_sums(values, mb, cfg.ppo.value_clip)
        return loss_sum, (weight, metric_sums, old_values, experience)

    def update(state, rows, kl, moments):
        (loss_sum, (weight, metric_sums, values, experience)), grads = jax.value_and_grad(sum_loss, has_aux=True)(
            state.params, rows, kl, moments)
        state, metrics = _optimizer_step(state, means_from_sums(grads, loss_sum, weight, metric_sums), tx, "critic")
        return state, metrics, values, experience

    rows_sh, replicated = partitioner.batch_sharding, partitioner.replicated
    return partitioner.jit(update, in_shardings=(state_shardings, rows_sh, replicated, replicated),
                           out_shardings=(state_shardings, replicated, rows_sh,
                                          (rows_sh, rows_sh, rows_sh, replicated, replicated)),
                           donate_argnums=0)


def _experience_in_update(experience_fn, rows, old_logprobs, values, kl, moments):
    """(old values = ``values`` with the gradient stopped, ``experience_fn``'s outputs on the
    rollout ``rows``) inside an update program: constants for its losses."""
    old_values = jax.lax.stop_gradient(values)
    return old_values, experience_fn(rows["raw_scores"], rows["finished_by_eos"], old_logprobs, rows["ref_logprobs"],
                                     old_values, rows["mask"], kl, moments)


def fuses_rollout_forwards(cfg: PPOConfig) -> bool:
    """Whether the actor, too, takes exactly one step on the whole rollout an iteration
    (``fuses_value_forward`` and no actor accumulation), so that ``make_joint_update`` applies
    (from the first iteration past the critic warm-up)."""
    return fuses_value_forward(cfg) and cfg.actor_optimizer.grad_accum_steps == 1


def make_joint_update(actor_graphdef, critic_graphdef, actor_tx, critic_tx, cfg: PPOConfig, experience_fn, *,
                      partitioner: Partitioner, state_shardings):
    """The actor's and the critic's forwards, the experience and one step of each, in one program
    (when ``fuses_rollout_forwards``). As in ``make_critic_update_with_values`` the forwards run at
    the parameters the scoring phase's would: the critic's gives the values and, with
    ``rollout.old_logprobs: recompute``, the actor's gives the old log-probs (gradient stopped, so
    the step's ratio is exactly 1): two forwards an iteration fewer. The price: both models'
    activations are live at once. The losses are separate, so each model's gradient is its own
    loss's. Jitted ``(actor_state, critic_state, rows, kl, moments) -> (actor_state, critic_state,
    metrics, old_logprobs, entropy, values, experience_fn's outputs)``; rows as there, without
    ``old_logprobs`` when they are recomputed. ``state_shardings``: the ``PPOState``'s."""
    p, recompute = cfg.ppo, cfg.rollout.old_logprobs == "recompute"

    def sum_losses(params, rows, kl, moments):
        actor_params, critic_params = params
        logprobs, entropy = _actor_logprobs(actor_graphdef, actor_params, rows, cfg)
        values = rollout.critic_values(critic_graphdef, critic_params, rows["tokens"], rows["attention_mask"])
        old_logprobs = jax.lax.stop_gradient(logprobs) if recompute else rows["old_logprobs"]
        old_values, experience = _experience_in_update(experience_fn, rows, old_logprobs, values, kl, moments)
        mb = {"old_logprobs": old_logprobs, "advantages": experience[1].advantages, "old_values": old_values,
              "returns": experience[1].returns, "mask": rows["mask"]}
        actor_sums = _policy_loss_sums(logprobs, entropy, mb, p)
        critic_sums = _value_loss_sums(values, mb, p.value_clip)
        outputs = (old_logprobs, jax.lax.stop_gradient(entropy), old_values, experience)
        return actor_sums[0] + critic_sums[0], (actor_sums, critic_sums, outputs)

    def update(actor, critic, rows, kl, moments):
        (_, (actor_sums, critic_sums, outputs)), (actor_grads, critic_grads) = jax.value_and_grad(
            sum_losses, has_aux=True)((actor.params, critic.params), rows, kl, moments)
        actor_accumulated = policy_token_means(means_from_sums(actor_grads, actor_sums[0], *actor_sums[1]))
        actor, actor_metrics = _optimizer_step(actor, actor_accumulated, actor_tx, "actor")
        critic, critic_metrics = _optimizer_step(critic, means_from_sums(critic_grads, critic_sums[0], *critic_sums[1]),
                                                 critic_tx, "critic")
        metrics = {**actor_metrics, **critic_metrics, "finite": actor_metrics["finite"] * critic_metrics["finite"]}
        return actor, critic, metrics, *outputs

    rows_sh, replicated = partitioner.batch_sharding, partitioner.replicated
    states = (state_shardings.actor, state_shardings.critic)
    return partitioner.jit(update, in_shardings=(*states, rows_sh, replicated, replicated),
                           out_shardings=(*states, replicated, rows_sh, rows_sh, rows_sh,
                                          (rows_sh, rows_sh, rows_sh, replicated, replicated)),
                           donate_argnums=(0, 1))


def minibatch_indices(key, rows: int, minibatches: int) -> list[np.ndarray]:
    """A random permutation of the rollout rows cut into equal minibatches."""
    order = np.asarray(jax.random.permutation(key, rows))
    return np.split(order, minibatches)


def take_rows(experience: dict, rows) -> dict:
    """The minibatch ``rows`` of every experience array."""
    return jax.tree.map(lambda x: x[rows], experience)
