"""The RL core of ICE-GRT as pure functions of arrays.

Conventions (shared with the trainers): arrays are batch-major ``[B, T]``; ``mask`` is 1 on
response tokens (EOS included) and 0 on prompt and padding, and each row's response is
one contiguous run of 1s. Values outside the mask never influence a result: they are
selected away with ``jnp.where`` (not multiplied by 0), so even inf/NaN there cannot leak
into outputs or gradients. Functions that return per-token arrays return 0 off the mask.

Nothing here holds state: the KL controller and the running reward moments are pytrees
with ``init_*`` / ``update_*`` functions, usable inside ``jit``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct

from icegrt_jax.losses import entropy_from_logits

Array = jax.Array

LOG_RATIO_CLAMP = 20.0
"""``|log pi/pi_old|`` is clamped to this before ``exp`` in the PPO loss (ratios beyond
``e^20`` only arise from numerical blow-ups, which must not produce inf)."""

KL_ESTIMATORS = ("k1", "k2", "k3")
POLICY_LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


def _on(mask: Array) -> Array:
    return jnp.asarray(mask) != 0


def _zero_off_mask(x: Array, mask: Array) -> Array:
    return jnp.where(_on(mask), x, jnp.zeros((), jnp.result_type(x)))


# ----------------------------------------------------------------------------- statistics


def masked_mean(x: Array, mask: Array, axis: int | None = None) -> Array:
    """``sum(m * x) / sum(m)`` over ``axis`` (all axes when None) for a 0/1 mask ``m`` (any
    nonzero counts as 1: tokens are selected, not weighted); 0 where the mask is empty."""
    chex.assert_equal_shape((x, mask))
    total = jnp.sum(_zero_off_mask(x, mask), axis=axis)
    count = jnp.sum(_on(mask), axis=axis)
    return total / jnp.maximum(count, 1).astype(total.dtype)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance over the masked elements: ``sum(m * (x - mean)^2) / (n - 1)``.

    Bessel-corrected by default, as the sigma of advantage normalisation (paper section
    3.3.4); ``unbiased=False`` divides by ``n``. The denominator is floored at 1, so a single
    masked element (or none) has variance 0 rather than NaN.
    """
    centered = _zero_off_mask(x - masked_mean(x, mask), mask)
    count = jnp.sum(_on(mask))
    denominator = count - 1 if unbiased else count
    return jnp.sum(centered**2) / jnp.maximum(denominator, 1).astype(centered.dtype)


def masked_whiten(
    x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8
) -> Array:
    """Advantage normalisation (paper section 3.3.4): ``(x - mu) / sqrt(var + eps)`` on the mask.

    ``mu`` and the (unbiased) ``var`` are taken over all masked elements of the batch. With
    ``shift_mean=False`` the mean is added back, ``(x - mu) / sqrt(var + eps) + mu``
    (rescale only). Zero outside the mask.
    """
    mean = masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_off_mask(whitened, mask)


# ------------------------------------------------------------------------ KL and rewards


def _kl_from_log_ratio(log_ratio: Array, estimator: str) -> Array:
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_penalty(logprobs: Array, ref_logprobs: Array, estimator: str = "k1") -> Array:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    With ``lr = logprobs - ref_logprobs`` (J. Schulman, "Approximating KL divergence",
    2020): ``k1 = lr`` (unbiased, high variance, can be negative), ``k2 = lr^2 / 2`` (biased,
    low variance, >= 0), ``k3 = exp(-lr) - 1 + lr`` (unbiased, low variance, >= 0).
    """
    chex.assert_equal_shape((logprobs, ref_logprobs))
    return _kl_from_log_ratio(logprobs - ref_logprobs, estimator)


def last_token_mask(mask: Array) -> Array:
    """Boolean ``[B, T]``: True at the last 1 of each row of ``mask`` (none for empty rows).

    That is the EOS token when the response ended, the last generated token when it was
    truncated at the maximum response length.
    """
    chex.assert_rank(mask, 2)
    on = _on(mask)
    length = on.shape[-1]
    last_index = length - 1 - jnp.argmax(on[:, ::-1], axis=-1)
    is_last = jnp.arange(length) == last_index[:, None]
    return is_last & jnp.any(on, axis=-1, keepdims=True)


def shaped_rewards(
    scores: Array,
    logprobs: Array,
    ref_logprobs: Array,
    mask: Array,
    kl_coef: float | Array,
    estimator: str = "k1",
    score_clip: float | None = None,
) -> Array:
    """Per-token PPO rewards: KL penalty on every response token, score on the last one.

    ``r_t = -kl_coef * KL_t + [t = last response token] * clip(score, -c, c)``
    (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022), with ``KL_t`` from ``kl_penalty``
    and ``c = score_clip`` (no clipping when None). Zero outside the mask.

    Args:
      scores: ``[B]`` reward-model scores R(s, a). logprobs, ref_logprobs, mask: ``[B, T]``.
    """
    chex.assert_rank(scores, 1)
    chex.assert_equal_shape((logprobs, ref_logprobs, mask))
    chex.assert_equal_shape_prefix((scores, mask), 1)
    if score_clip is not None:
        scores = jnp.clip(scores, -score_clip, score_clip)
    kl = kl_penalty(logprobs, ref_logprobs, estimator)
    rewards = -kl_coef * kl + jnp.where(last_token_mask(mask), scores[:, None], 0.0)
    return _zero_off_mask(rewards, mask)


# ------------------------------------------------------------------------------------ GAE


def gae(
    rewards: Array, values: Array, mask: Array, gamma: float, lam: float
) -> tuple[Array, Array]:
    """Generalised advantage estimation (Schulman et al. 2015; paper eq. 1-2).

    Backwards over time with ``jax.lax.scan``:
    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * A_{t+1}``, where ``V_{t+1}`` and ``A_{t+1}`` are 0 after
    the last response token (the episode ends there) and every step off the mask yields 0,
    so variable response lengths are handled by the mask alone (a step off the mask ends the
    episode before it: a mask with a gap would be two episodes, not one bootstrapped across it). ``returns = A + V`` are the
    critic's targets. Both outputs are ``[B, T]`` and zero outside the mask.
    """
    chex.assert_rank(rewards, 2)
    chex.assert_equal_shape((rewards, values, mask))
    dtype = jnp.result_type(rewards, values)
    rewards = _zero_off_mask(rewards, mask).astype(dtype)
    values = _zero_off_mask(values, mask).astype(dtype)

    def backward_step(carry, step):
        next_advantage, next_value = carry
        reward, value, on = step
        delta = reward + gamma * next_value - value
        advantage = jnp.where(on, delta + gamma * lam * next_advantage, 0.0)
        return (advantage, value), advantage

    init = (jnp.zeros(rewards.shape[0], dtype), jnp.zeros(rewards.shape[0], dtype))
    steps = (rewards.T, values.T, _on(mask).T)
    _, advantages = jax.lax.scan(backward_step, init, steps, reverse=True)
    advantages = advantages.T
    return advantages, _zero_off_mask(advantages + values, mask)


# --------------------------------------------------------------------------------- losses


def aggregate_tokens(per_token: Array, mask: Array, aggregate: str) -> Array:
    """``per_token`` [B, T] reduced over the mask as a loss: ``"token_mean"`` (all response
    tokens of the batch) or ``"seq_mean_token_mean"`` (each sequence's token mean, averaged over
    the sequences with a response token)."""
    if aggregate == "token_mean":
        return masked_mean(per_token, mask)
    if aggregate == "seq_mean_token_mean":
        per_sequence = masked_mean(per_token, mask, axis=-1)
        return masked_mean(per_sequence, jnp.any(_on(mask), axis=-1))
    raise ValueError(
        f"unknown aggregate {aggregate!r}; expected one of {POLICY_LOSS_AGGREGATIONS}"
    )


def ppo_policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    aggregate: str = "token_mean",
    logits: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """PPO clipped surrogate (Schulman et al. 2017; paper eq. 3), negated for minimisation.

    ``rho = exp(clamp(logprobs - old_logprobs, +-LOG_RATIO_CLAMP))`` and per token
    ``l_t = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))``. With ``dual_clip = c > 1``
    (Ye et al. 2020), tokens with ``A < 0`` use ``min(l_t, -c A)``, bounding the loss of
    very large ratios. Aggregation: ``"token_mean"`` averages all response tokens of the
    batch; ``"seq_mean_token_mean"`` averages each sequence's token mean over sequences
    with at least one response token.

    Metrics (token means over the mask): ``clip_frac`` (share of tokens where the clipped
    term is active, i.e. the gradient is cut), ``approx_kl`` (k3 estimate of
    KL(pi_old || pi)), ``ratio_mean``, ``ratio_min``, ``ratio_max``; ``dual_clip_frac`` with
    ``dual_clip``; ``entropy`` when ``logits`` ``[B, T, V]`` are given.
    """
    chex.assert_rank(logprobs, 2)
    chex.assert_equal_shape((logprobs, old_logprobs, advantages, mask))
    on = _on(mask)
    log_ratio = jnp.clip(
        _zero_off_mask(logprobs - old_logprobs, mask), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP
    )
    ratio = jnp.exp(log_ratio)
    advantages = _zero_off_mask(advantages, mask)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(unclipped, clipped)
    metrics = {
        "clip_frac": masked_mean((clipped > unclipped).astype(ratio.dtype), mask),
        "approx_kl": masked_mean(_kl_from_log_ratio(-log_ratio, "k3"), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_min": jnp.min(jnp.where(on, ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(on, ratio, -jnp.inf)),
    }
    if dual_clip is not None:
        dual_clipped = jnp.where(
            advantages < 0, jnp.minimum(per_token, -dual_clip * advantages), per_token
        )
        metrics["dual_clip_frac"] = masked_mean(
            (dual_clipped < per_token).astype(ratio.dtype), mask
        )
        per_token = dual_clipped
    if logits is not None:
        chex.assert_equal_shape_prefix((logits, mask), 2)
        metrics["entropy"] = masked_mean(entropy_from_logits(logits), mask)
    return aggregate_tokens(per_token, mask, aggregate), metrics


def value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    clip_range: float | None = 0.2,
) -> tuple[Array, dict[str, Array]]:
    """Clipped value loss (the PPO2 baselines / InstructGPT critic objective).

    ``V_clip = V_old + clip(V - V_old, -c, c)`` and
    ``loss = 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))``; ``clip_range=None`` gives
    the unclipped ``0.5 * masked_mean((V - R)^2)``.

    Metrics: ``value_clip_frac`` (share of tokens where ``|V - V_old| > c`` and the clipped
    error is the larger, i.e. the gradient is cut; a rounding tie inside the range is not) and
    ``explained_variance = 1 - Var[R - V] / Var[R]`` over the mask (0 when ``Var[R] = 0``).
    """
    chex.assert_rank(values, 2)
    chex.assert_equal_shape((values, old_values, returns, mask))
    values, old_values, returns = (
        _zero_off_mask(x, mask) for x in (values, old_values, returns)
    )
    squared_error = (values - returns) ** 2
    if clip_range is None:
        per_token = squared_error
        clip_frac = jnp.zeros((), squared_error.dtype)
    else:
        clipped_values = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
        clipped_error = (clipped_values - returns) ** 2
        per_token = jnp.maximum(squared_error, clipped_error)
        cut = (jnp.abs(values - old_values) > clip_range) & (clipped_error > squared_error)  # not a rounding tie
        clip_frac = masked_mean(cut.astype(values.dtype), mask)
    metrics = {"value_clip_frac": clip_frac, "explained_variance": explained_variance(values, returns, mask)}
    return 0.5 * masked_mean(per_token, mask), metrics


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    """``1 - Var[R - V] / Var[R]`` over the mask; 0 when ``Var[R] = 0`` (nothing to explain)."""
    returns_var = masked_var(returns, mask)
    has_variance = returns_var > 0
    safe_returns_var = jnp.where(has_variance, returns_var, 1.0)
    return jnp.where(has_variance, 1.0 - masked_var(returns - values, mask) / safe_returns_var, 0.0)


# ------------------------------------------------------------------------- KL controllers


@struct.dataclass
class KLController:
    """KL coefficient ``beta`` plus its (static) schedule. Fixed when ``target`` is None."""

    kl_coef: Array
    target: float | None = struct.field(pytree_node=False, default=None)
    horizon: float = struct.field(pytree_node=False, default=10_000.0)


def init_kl_controller(
    kl_coef: float, target: float | None = None, horizon: float = 10_000.0
) -> KLController:
    """A fixed controller (``target=None``) or an adaptive one (Ziegler et al. 2019, 2.2)."""
    if target is not None and (target <= 0 or horizon <= 0):
        raise ValueError(f"target and horizon must be positive, got {target}, {horizon}")
    return KLController(jnp.asarray(kl_coef, jnp.float32), target, horizon)


def update_kl_controller(
    controller: KLController, current_kl: float | Array, n_steps: int | Array
) -> KLController:
    """One controller step after ``n_steps`` samples (episodes) with measured KL ``current_kl``.

    Fixed: unchanged. Adaptive (Ziegler et al. 2019, section 2.2):
    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``.
    """
    if controller.target is None:
        return controller
    error = jnp.clip(current_kl / controller.target - 1.0, -0.2, 0.2)
    multiplier = 1.0 + error * n_steps / controller.horizon
    return controller.replace(kl_coef=controller.kl_coef * multiplier)


# ---------------------------------------------------------------- running reward moments


@struct.dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations ``M2`` of every value seen so far."""

    count: Array
    mean: Array
    m2: Array

    @property
    def var(self) -> Array:
        """Unbiased variance ``M2 / (n - 1)`` (0 for fewer than two values)."""
        return self.m2 / jnp.maximum(self.count - 1, 1).astype(self.m2.dtype)

    @property
    def std(self) -> Array:
        return jnp.sqrt(self.var)


def init_running_moments() -> RunningMoments:
    """Empty statistics (count 0)."""
    return RunningMoments(
        jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    )


def merge_running_moments(a: RunningMoments, b: RunningMoments) -> RunningMoments:
    """Chan et al. (1979) parallel merge: with ``d = mean_b - mean_a`` and ``n = n_a + n_b``,
    ``mean = mean_a + d n_b / n`` and ``M2 = M2_a + M2_b + d^2 n_a n_b / n``."""
    count = a.count + b.count
    safe_count = jnp.maximum(count, 1).astype(a.mean.dtype)
    weight_b = b.count.astype(a.mean.dtype) / safe_count
    delta = b.mean - a.mean
    mean = a.mean + delta * weight_b
    m2 = a.m2 + b.m2 + delta**2 * a.count.astype(a.mean.dtype) * weight_b
    return RunningMoments(count, mean, m2)


def update_running_moments(moments: RunningMoments, values: Array) -> RunningMoments:
    """Fold every element of ``values`` (e.g. a batch of scores) into ``moments``.

    The batch's own mean and ``M2`` are computed in two passes, then merged with
    ``merge_running_moments`` (Welford's update generalised to batches).
    """
    values = jnp.ravel(values).astype(moments.mean.dtype)
    batch_mean = jnp.mean(values)
    batch = RunningMoments(
        jnp.asarray(values.size, jnp.int32), batch_mean, jnp.sum((values - batch_mean) ** 2)
    )
    return merge_running_moments(moments, batch)


def normalize_with_moments(
    values: Array, moments: RunningMoments, clip: float | None = None, eps: float = 1e-8
) -> Array:
    """Reward normalisation: ``(x - mean) / (std + eps)``, then clipped to ``+-clip`` if given."""
    normalized = (values - moments.mean) / (moments.std + eps)
    return normalized if clip is None else jnp.clip(normalized, -clip, clip)
