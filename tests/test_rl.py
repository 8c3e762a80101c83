"""icegrt_jax.rl against plain-Python/numpy loops of each formula.

x64 stays off (enabling it globally is not allowed in this project), so every reference is
a float64 loop and the float32 JAX results are compared with rtol/atol ~1e-5: the
float32 round-off of O(1) sums over a few dozen tokens. Inputs carry large garbage
outside the mask, so agreement with loops that never read those entries also shows that
nothing leaks from there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icegrt_jax import rl

B, T, V = 5, 9, 7
TOL = {"rtol": 1e-5, "atol": 1e-5}


def response_mask(rng, batch=B, length=T):
    """Left prompt of random length, then a response, then padding. Row 0 has a response
    of length 1, row 1 spans the whole row, row 2 has none (a prompt whose response was cut
    to nothing, or a filler row), the others are random."""
    mask = np.zeros((batch, length), np.float32)
    for row in range(batch):
        if row == 0:
            start, size = rng.integers(0, length), 1
        elif row == 1:
            start, size = 0, length
        elif row == 2:
            continue
        else:
            start = rng.integers(0, length)
            size = rng.integers(1, length - start + 1)
        mask[row, start : start + size] = 1
    return mask


def with_garbage(rng, x, mask):
    return np.where(mask > 0, x, rng.uniform(-1e4, 1e4, x.shape)).astype(np.float32)


def response_positions(mask_row):
    return [t for t in range(len(mask_row)) if mask_row[t] > 0]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def batch(rng):
    mask = response_mask(rng)

    def field(scale=1.0):
        return with_garbage(rng, scale * rng.normal(size=(B, T)), mask)

    return {"mask": mask, "field": field}


# ----------------------------------------------------------------------------- statistics


def loop_mean_var(x, mask):
    values = [float(x[i, t]) for i in range(x.shape[0]) for t in response_positions(mask[i])]
    mean = sum(values) / len(values)
    squares = sum((v - mean) ** 2 for v in values)
    return mean, squares / (len(values) - 1), squares / len(values)


def test_masked_mean_var_whiten_match_loops(batch):
    x, mask = batch["field"](3.0), batch["mask"]
    mean, unbiased, biased = loop_mean_var(x, mask)
    np.testing.assert_allclose(jax.jit(rl.masked_mean)(x, mask), mean, **TOL)
    np.testing.assert_allclose(rl.masked_var(x, mask), unbiased, **TOL)
    np.testing.assert_allclose(rl.masked_var(x, mask, unbiased=False), biased, **TOL)
    row_means = [np.mean([x[i, t] for t in response_positions(mask[i])]) if mask[i].any() else 0.0  # empty: 0
                 for i in range(B)]
    np.testing.assert_allclose(rl.masked_mean(x, mask, axis=1), row_means, **TOL)
    for shift_mean in (True, False):
        whitened = jax.jit(rl.masked_whiten, static_argnums=2)(x, mask, shift_mean)
        expected = (x - mean) / np.sqrt(unbiased + 1e-8) + (0.0 if shift_mean else mean)
        np.testing.assert_allclose(whitened, np.where(mask > 0, expected, 0), **TOL)


def test_masked_statistics_of_empty_and_single_element_masks():
    x = jnp.arange(4.0)
    assert rl.masked_mean(x, jnp.zeros(4)) == 0
    assert rl.masked_var(x, jnp.array([0, 0, 1, 0])) == 0
    np.testing.assert_array_equal(rl.masked_whiten(x, jnp.zeros(4)), np.zeros(4))


VMAPPED = {
    "whiten": lambda x, y, z, m: rl.masked_whiten(x, m),
    "shaped_rewards": lambda x, y, z, m: rl.shaped_rewards(x[:, 0], y, z, m, 0.1, "k3"),
    "gae": lambda x, y, z, m: rl.gae(x, y, m, 0.95, 0.9),
    "ppo_policy_loss": lambda x, y, z, m: rl.ppo_policy_loss(x, y, z, m, dual_clip=3.0),
    "value_loss": lambda x, y, z, m: rl.value_loss(x, y, z, m),
}


@pytest.mark.parametrize("name", VMAPPED)
def test_vmap_over_groups_equals_one_call_per_group(rng, name):
    mask = np.stack([response_mask(rng), response_mask(rng)])
    x, y, z = rng.normal(size=(3, *mask.shape)).astype(np.float32)
    fn = VMAPPED[name]
    batched = jax.jit(jax.vmap(fn))(x, y, z, mask)
    for k in range(2):
        jax.tree.map(
            lambda got, want: np.testing.assert_allclose(got, want, **TOL),
            jax.tree.map(lambda leaf, row=k: leaf[row], batched),
            fn(x[k], y[k], z[k], mask[k]),
        )


# ------------------------------------------------------------------------ KL and rewards


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_penalty_matches_formulas(rng, estimator):
    logprobs, ref = rng.normal(size=(2, B, T)).astype(np.float32)
    got = jax.jit(rl.kl_penalty, static_argnums=2)(logprobs, ref, estimator)
    for i in range(B):
        for t in range(T):
            lr = float(logprobs[i, t]) - float(ref[i, t])
            expected = {"k1": lr, "k2": lr**2 / 2, "k3": np.exp(-lr) - 1 + lr}[estimator]
            np.testing.assert_allclose(got[i, t], expected, **TOL)


def test_kl_penalty_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="k4"):
        rl.kl_penalty(jnp.zeros(3), jnp.zeros(3), "k4")


@pytest.mark.parametrize("score_clip", [None, 0.5])
def test_shaped_rewards_match_loop(rng, batch, score_clip):
    mask = batch["mask"]
    logprobs, ref = batch["field"](), batch["field"]()
    scores = rng.normal(size=B).astype(np.float32) * 2
    fn = jax.jit(rl.shaped_rewards, static_argnames=("estimator", "score_clip"))
    got = fn(scores, logprobs, ref, mask, 0.3, estimator="k3", score_clip=score_clip)
    expected = np.zeros((B, T))
    for i in range(B):
        positions = response_positions(mask[i])
        for t in positions:
            lr = float(logprobs[i, t]) - float(ref[i, t])
            expected[i, t] = -0.3 * (np.exp(-lr) - 1 + lr)
        score = scores[i] if score_clip is None else np.clip(scores[i], -score_clip, score_clip)
        if positions:  # a row without response tokens has nowhere to take its score
            expected[i, positions[-1]] += score
    np.testing.assert_allclose(got, expected, **TOL)


def test_last_token_mask_marks_last_one_and_nothing_for_empty_rows():
    mask = jnp.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]])
    expected = [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 1]]
    np.testing.assert_array_equal(rl.last_token_mask(mask), np.array(expected, bool))


# ------------------------------------------------------------------------------------ GAE


def loop_gae(rewards, values, mask, gamma, lam):
    """GAE backwards over each row; a step off the mask ends the episode before it (V and A
    after it are 0), so a row whose mask has a gap is two episodes."""
    advantages, returns = np.zeros(rewards.shape), np.zeros(rewards.shape)
    for i in range(rewards.shape[0]):
        next_value, next_advantage = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if not mask[i, t]:
                next_value, next_advantage = 0.0, 0.0
                continue
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            next_advantage = delta + gamma * lam * next_advantage
            next_value = float(values[i, t])
            advantages[i, t] = next_advantage
            returns[i, t] = next_advantage + values[i, t]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(0.95, 0.95), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_loop(batch, gamma, lam):
    rewards, values, mask = batch["field"](), batch["field"](), batch["mask"]
    advantages, returns = jax.jit(rl.gae)(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = loop_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, expected_advantages, **TOL)
    np.testing.assert_allclose(returns, expected_returns, **TOL)


def test_gae_ends_the_episode_at_a_gap_in_the_mask(rng):
    """Masks are one contiguous run (the module docstring); a gap, if given, splits the row into
    two episodes rather than bootstrapping across it: [1, 1, 0, 1, 1] with gamma = lam = 1."""
    rewards, values = np.array([[0.0, 1.0, 5.0, 0.0, 1.0]]), np.array([[0.2, 0.3, 7.0, 0.4, 0.1]])
    mask = np.array([[1, 1, 0, 1, 1]])
    advantages, _ = rl.gae(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(advantages, [[0.8, 0.7, 0.0, 0.6, 0.9]], **TOL)
    np.testing.assert_allclose(advantages, loop_gae(rewards, values, mask, 1.0, 1.0)[0], **TOL)


# ----------------------------------------------------------------------------- PPO losses


def loop_policy_loss(logprobs, old, advantages, mask, eps, dual_clip, aggregate):
    """Per-token loss and d loss / d logprobs, aggregated as requested."""
    per_row = []
    grads = np.zeros(logprobs.shape)
    num_tokens, num_rows = mask.sum(), int(mask.any(axis=1).sum())  # rows with a response
    dual_clipped = 0
    for i in range(logprobs.shape[0]):
        positions = response_positions(mask[i])
        row = []
        for t in positions:
            ratio, a = np.exp(float(logprobs[i, t]) - float(old[i, t])), float(advantages[i, t])
            unclipped, clipped = -a * ratio, -a * np.clip(ratio, 1 - eps, 1 + eps)
            loss, grad = (unclipped, -a * ratio) if unclipped >= clipped else (clipped, 0.0)
            if dual_clip is not None and a < 0 and -dual_clip * a < loss:
                loss, grad = -dual_clip * a, 0.0
                dual_clipped += 1
            row.append(loss)
            weight = 1 / num_tokens if aggregate == "token_mean" else 1 / (num_rows * len(positions))
            grads[i, t] = grad * weight
        if row:
            per_row.append(row)
    if aggregate == "token_mean":
        return sum(sum(r) for r in per_row) / num_tokens, grads, dual_clipped / num_tokens
    return np.mean([np.mean(r) for r in per_row]), grads, dual_clipped / num_tokens


@pytest.mark.parametrize("aggregate", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_ppo_policy_loss_and_gradient_match_loop(batch, aggregate, dual_clip):
    mask = batch["mask"]
    logprobs, old, advantages = batch["field"](0.4), batch["field"](0.4), batch["field"]()

    def loss_fn(lp):
        return rl.ppo_policy_loss(
            lp, old, advantages, mask, 0.2, dual_clip=dual_clip, aggregate=aggregate
        )

    (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(logprobs)
    expected, expected_grad, dual_clip_frac = loop_policy_loss(
        logprobs, old, advantages, mask, 0.2, dual_clip, aggregate
    )
    np.testing.assert_allclose(loss, expected, **TOL)
    np.testing.assert_allclose(grad, expected_grad, **TOL)
    assert ("dual_clip_frac" in metrics) == (dual_clip is not None)
    if dual_clip is not None:
        assert dual_clip_frac > 0  # the case is exercised
        np.testing.assert_allclose(metrics["dual_clip_frac"], dual_clip_frac, **TOL)


def test_log_ratios_beyond_the_clamp_give_a_finite_loss_and_gradient(rng, batch):
    """A log-ratio of +100 overflows exp in fp32 (e^100 ~ 3e43 > 3.4e38): the ratio comes from the
    log-ratio clamped to +-LOG_RATIO_CLAMP, as the loop's input is here."""
    mask, advantages = batch["mask"], batch["field"]()
    old = batch["field"](0.4)
    logprobs = (old + np.where(rng.random((B, T)) < 0.5, 100.0, -100.0)).astype(np.float32)
    loss_fn = lambda lp: rl.ppo_policy_loss(lp, old, advantages, mask, 0.2, dual_clip=3.0)
    (loss, _), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(logprobs)
    clamped = (old + np.clip(logprobs - old, -rl.LOG_RATIO_CLAMP, rl.LOG_RATIO_CLAMP)).astype(np.float64)
    expected, _, _ = loop_policy_loss(clamped, old, advantages, mask, 0.2, 3.0, "token_mean")
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert np.isfinite(grad).all() and np.isfinite(loss)


def test_constant_returns_leave_nothing_to_explain(batch):
    mask = batch["mask"]
    _, metrics = rl.value_loss(batch["field"](), batch["field"](), np.full((B, T), 3.0, np.float32), mask)
    assert metrics["explained_variance"] == 0.0  # Var[R] = 0: defined as 0, not 0/0


def test_ppo_policy_metrics_match_loop(rng, batch):
    mask = batch["mask"]
    logprobs, old, advantages = batch["field"](0.4), batch["field"](0.4), batch["field"]()
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    _, metrics = jax.jit(rl.ppo_policy_loss)(
        logprobs, old, advantages, mask, 0.2, logits=jnp.asarray(logits)
    )
    on = mask > 0
    ratio = np.exp((logprobs.astype(np.float64) - old)[on])
    a = advantages[on]
    clipped = -a * np.clip(ratio, 0.8, 1.2) > -a * ratio
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    entropy = -(probs * np.log(probs)).sum(-1)[on]
    expected = {
        "clip_frac": clipped.mean(),
        "approx_kl": np.mean(ratio - 1 - np.log(ratio)),
        "ratio_mean": ratio.mean(),
        "ratio_min": ratio.min(),
        "ratio_max": ratio.max(),
        "entropy": entropy.mean(),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, **TOL, err_msg=name)


def test_ppo_policy_loss_rejects_unknown_aggregate(batch):
    x = jnp.zeros((B, T))
    with pytest.raises(ValueError, match="seq_sum"):
        rl.ppo_policy_loss(x, x, x, batch["mask"], aggregate="seq_sum")


@pytest.mark.parametrize("clip_range", [0.2, None])
def test_value_loss_gradient_and_metrics_match_loop(batch, clip_range):
    mask = batch["mask"]
    values, old_values, returns = batch["field"](), batch["field"](), batch["field"]()

    def loss_fn(v):
        return rl.value_loss(v, old_values, returns, mask, clip_range)

    (loss, metrics), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(values)
    on = mask > 0
    n = on.sum()
    total, clipped_count = 0.0, 0
    expected_grad = np.zeros((B, T))
    for i, t in zip(*np.nonzero(on)):
        v, v_old, r = float(values[i, t]), float(old_values[i, t]), float(returns[i, t])
        error = (v - r) ** 2
        if clip_range is None:
            clipped_error = -np.inf
        else:
            clipped_error = (v_old + np.clip(v - v_old, -clip_range, clip_range) - r) ** 2
        total += 0.5 * max(error, clipped_error)
        clipped_count += clipped_error > error
        if error >= clipped_error:
            expected_grad[i, t] = (v - r) / n
    explained = 1 - np.var((returns - values)[on], ddof=1) / np.var(returns[on], ddof=1)
    np.testing.assert_allclose(loss, total / n, **TOL)
    np.testing.assert_allclose(grad, expected_grad, **TOL)
    np.testing.assert_allclose(metrics["value_clip_frac"], clipped_count / n, **TOL)
    np.testing.assert_allclose(metrics["explained_variance"], explained, **TOL)


def test_value_clip_frac_does_not_count_rounding_inside_the_clip_range():
    """Inside the range V_old + (V - V_old) can round away from V in fp32, which makes the clipped
    error larger by ~1e-9 without any clipping: not a clipped token."""
    values, old_values = np.float32([[0.05070864409208298]]), np.float32([[-0.03197793290019035]])
    clipped = old_values + (values - old_values)
    returns = values + np.float32(1e-6)  # V_clip < V < R: the clipped error is the (barely) larger one
    assert (clipped - returns) ** 2 > (values - returns) ** 2  # the rounding case
    _, metrics = rl.value_loss(jnp.asarray(values), jnp.asarray(old_values), jnp.asarray(returns),
                               jnp.ones((1, 1)), clip_range=0.2)
    assert float(metrics["value_clip_frac"]) == 0.0
    _, metrics = rl.value_loss(jnp.asarray(values), jnp.asarray(old_values - 0.5), jnp.asarray(returns),
                               jnp.ones((1, 1)), clip_range=0.2)
    assert float(metrics["value_clip_frac"]) == 1.0  # a real clip still counts


# ------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_matches_ziegler_loop():
    kls = [1.0, 9.0, 6.5, 5.0, 100.0, 0.0]
    update = jax.jit(rl.update_kl_controller)
    controller = rl.init_kl_controller(0.2, target=6.0, horizon=10_000)
    beta = 0.2
    for kl in kls:
        controller = update(controller, kl, 512)
        beta *= 1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * 512 / 10_000
        np.testing.assert_allclose(controller.kl_coef, beta, rtol=1e-6)


def test_fixed_kl_controller_never_changes():
    controller = rl.init_kl_controller(0.05)
    for kl in (0.0, 50.0):
        controller = jax.jit(rl.update_kl_controller)(controller, kl, 512)
    np.testing.assert_allclose(controller.kl_coef, 0.05)


def test_kl_controller_rejects_non_positive_target():
    with pytest.raises(ValueError, match="positive"):
        rl.init_kl_controller(0.1, target=0.0)


# ---------------------------------------------------------------- running reward moments


def test_running_moments_match_concatenated_statistics(rng):
    batches = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (1, 7, 16, 3)]
    update = jax.jit(rl.update_running_moments)
    moments = rl.init_running_moments()
    for k, values in enumerate(batches):
        moments = update(moments, values)
        seen = np.concatenate(batches[: k + 1]).astype(np.float64)
        assert int(moments.count) == seen.size
        np.testing.assert_allclose(moments.mean, seen.mean(), **TOL)
        expected_var = seen.var(ddof=1) if seen.size > 1 else 0.0
        np.testing.assert_allclose(moments.var, expected_var, **TOL)
    x = rng.normal(size=5).astype(np.float32) * 10
    normalized = rl.normalize_with_moments(x, moments, clip=1.5)
    expected = np.clip((x - seen.mean()) / (seen.std(ddof=1) + 1e-8), -1.5, 1.5)
    np.testing.assert_allclose(normalized, expected, **TOL)


def test_running_moments_merge_is_order_independent(rng):
    a, b = rng.normal(size=6).astype(np.float32), rng.normal(size=11).astype(np.float32)
    empty = rl.init_running_moments()
    left = rl.merge_running_moments(
        rl.update_running_moments(empty, a), rl.update_running_moments(empty, b)
    )
    right = rl.update_running_moments(rl.update_running_moments(empty, b), a)
    for field in ("count", "mean", "m2"):
        np.testing.assert_allclose(getattr(left, field), getattr(right, field), **TOL)
