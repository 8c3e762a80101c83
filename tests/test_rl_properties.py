"""Hypothesis properties of icegrt_jax.rl.

Shapes are fixed ([4, 8]) so each jitted function compiles once; hypothesis draws the
values and each row's (prompt length, response length). Comparisons are float32 with
tolerances ~1e-5 (x64 stays off project-wide).
"""

import jax
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from icegrt_jax import rl

B, T = 4, 8
PROPERTY_SETTINGS = settings(max_examples=30)  # derandomized, no deadline: conftest's profile

values_strategy = arrays(np.float32, (B, T), elements=st.floats(-5, 5, width=32))


@st.composite
def masks(draw):
    """One contiguous response per row after a left prompt: lengths 0..T - prompt (0: a row
    without response tokens), at least one row with a response."""
    mask = np.zeros((B, T), np.float32)
    for row in range(B):
        start = draw(st.integers(0, T - 1))
        length = draw(st.integers(0 if row else 1, T - start))
        mask[row, start : start + length] = 1
    return mask


def discounted_returns(rewards, mask, gamma):
    """G_t = sum_{k >= t, k in response} gamma^(k - t) r_k (0 off the mask)."""
    returns = np.zeros(rewards.shape)
    for i in range(rewards.shape[0]):
        running = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[i, t]:
                running = rewards[i, t] + gamma * running
                returns[i, t] = running
    return returns


gae = jax.jit(rl.gae)
whiten = jax.jit(rl.masked_whiten)


@PROPERTY_SETTINGS
@given(x=values_strategy, mask=masks())
def test_whitened_values_have_zero_mean_and_unit_std_on_mask(x, mask):
    variance = float(rl.masked_var(x, mask))
    assume(mask.sum() >= 2 and variance > 1e-2)
    whitened = whiten(x, mask)
    np.testing.assert_allclose(rl.masked_mean(whitened, mask), 0.0, atol=1e-5)
    np.testing.assert_allclose(
        rl.masked_var(whitened, mask), variance / (variance + 1e-8), rtol=1e-4
    )
    assert np.all(np.asarray(whitened)[mask == 0] == 0)


@PROPERTY_SETTINGS
@given(rewards=values_strategy, values=values_strategy, mask=masks(), gamma=st.floats(0, 1))
def test_gae_with_lambda_one_is_discounted_return_minus_value(rewards, values, mask, gamma):
    advantages, returns = gae(rewards, values, mask, gamma, 1.0)
    expected = discounted_returns(rewards, mask, gamma)
    # rewards up to 5 summed over 8 steps (|G| <= 40): fp32 rounding ~ 40 x 2^-24 x 8 terms ~ 2e-5
    np.testing.assert_allclose(advantages, np.where(mask > 0, expected - values, 0), atol=5e-5)
    np.testing.assert_allclose(returns, expected, atol=5e-5)


@PROPERTY_SETTINGS
@given(rewards=values_strategy, values=values_strategy, mask=masks())
def test_gae_with_gamma_and_lambda_zero_is_one_step_td_error(rewards, values, mask):
    advantages, _ = gae(rewards, values, mask, 0.0, 0.0)
    np.testing.assert_allclose(advantages, np.where(mask > 0, rewards - values, 0), atol=1e-6)


def all_results(inputs, mask):
    """Every masked function of rl, and the gradients the trainers take, in one pytree."""
    logprobs, old_logprobs, ref_logprobs, advantages, rewards, values, old_values, returns = (
        inputs
    )
    scores = rewards[:, 0]
    policy = lambda lp: rl.ppo_policy_loss(
        lp, old_logprobs, advantages, mask, dual_clip=2.0, aggregate="seq_mean_token_mean"
    )
    critic = lambda v: rl.value_loss(v, old_values, returns, mask)
    return {
        "mean": rl.masked_mean(values, mask),
        "row_mean": rl.masked_mean(values, mask, axis=1),
        "var": rl.masked_var(values, mask),
        "whiten": rl.masked_whiten(values, mask, shift_mean=False),
        "rewards": rl.shaped_rewards(scores, logprobs, ref_logprobs, mask, 0.1, "k3", 1.0),
        "gae": rl.gae(rewards, values, mask, 0.95, 0.9),
        "policy": jax.value_and_grad(policy, has_aux=True)(logprobs),
        "value": jax.value_and_grad(critic, has_aux=True)(values),
    }


all_results_jit = jax.jit(all_results)


@PROPERTY_SETTINGS
@given(
    inputs=st.tuples(*[values_strategy] * 8),
    mask=masks(),
    seed=st.integers(0, 2**16),
)
def test_values_outside_the_mask_never_change_any_result(inputs, mask, seed):
    rng = np.random.default_rng(seed)
    specials = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30], np.float32)

    def garbage(x):
        noise = rng.choice(specials, size=x.shape)
        return np.where(mask > 0, x, noise).astype(np.float32)

    # Scores are taken from rewards[:, 0]; keep them finite (they are per row, not masked).
    clean = [x.copy() for x in inputs]
    dirty = [garbage(x) for x in inputs]
    dirty[4][:, 0] = clean[4][:, 0]
    jax.tree.map(
        np.testing.assert_array_equal, all_results_jit(clean, mask), all_results_jit(dirty, mask)
    )


policy_grad = jax.jit(
    jax.grad(lambda lp, old, adv, mask: rl.ppo_policy_loss(lp, old, adv, mask, 0.2)[0])
)


@PROPERTY_SETTINGS
@given(
    log_ratio=arrays(np.float32, (B, T), elements=st.floats(-1, 1, width=32)),
    advantages=values_strategy,
    mask=masks(),
)
def test_clipped_policy_loss_cuts_gradient_only_where_the_clip_forbids(
    log_ratio, advantages, mask
):
    old = np.zeros((B, T), np.float32)
    grad = np.asarray(policy_grad(log_ratio, old, advantages, mask))
    ratio = np.exp(log_ratio.astype(np.float64))
    on = mask > 0
    above, below = ratio > 1.2 + 1e-6, ratio < 0.8 - 1e-6
    inside = (ratio > 0.8 + 1e-6) & (ratio < 1.2 - 1e-6)
    positive, negative = advantages > 0, advantages < 0
    forbidden = on & ((positive & above) | (negative & below))
    towards = on & ((positive & below) | (negative & above))
    np.testing.assert_array_equal(grad[forbidden], 0.0)
    np.testing.assert_array_equal(grad[~on], 0.0)
    # Inside the range, and outside it in the direction back towards it, the gradient is
    # the unclipped one: d/d logprob of -A * ratio / n = -A * ratio / n.
    unclipped = on & (inside | towards)
    expected = -advantages * ratio / on.sum()
    np.testing.assert_allclose(grad[unclipped], expected[unclipped], rtol=1e-5, atol=1e-7)
