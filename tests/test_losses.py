"""icegrt_jax.losses against numpy loops of each formula.

x64 stays off project-wide, so references are float64 numpy and the float32 JAX results
are compared with rtol/atol ~1e-5 (float32 round-off of a log-sum-exp over a few dozen
logits); matmul-based chunked results use ~1e-4 since the summation order differs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icegrt_jax import losses

B, T, H, V = 3, 7, 16, 50
TOL = {"rtol": 1e-5, "atol": 1e-5}
MATMUL_TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def log_softmax_loop(logits):
    out = np.zeros(logits.shape)
    for index in np.ndindex(logits.shape[:-1]):
        row = logits[index].astype(np.float64)
        out[index] = row - (row.max() + np.log(np.sum(np.exp(row - row.max()))))
    return out


def test_token_logprobs_and_gradient_match_loop(rng):
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(B, T))
    cotangent = rng.normal(size=(B, T)).astype(np.float32)
    logprobs, vjp = jax.vjp(lambda z: jax.jit(losses.token_logprobs)(z, targets), logits)
    log_probs = log_softmax_loop(logits)
    expected = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(logprobs, expected, **TOL)
    onehot = np.eye(V)[targets]
    expected_grad = cotangent[..., None] * (onehot - np.exp(log_probs))
    np.testing.assert_allclose(vjp(cotangent)[0], expected_grad, **TOL)


def test_token_logprobs_upcasts_bf16(rng):
    logits = jnp.asarray(rng.normal(size=(T, V)), jnp.bfloat16)
    targets = rng.integers(0, V, size=T)
    logprobs = losses.token_logprobs(logits, targets)
    assert logprobs.dtype == jnp.float32
    expected = losses.token_logprobs(logits.astype(jnp.float32), targets)
    np.testing.assert_array_equal(logprobs, expected)


@pytest.mark.parametrize("chunk_size", [1, 4, 21, 64])
def test_chunked_logprobs_and_gradients_match_full_logits(rng, chunk_size):
    """21 tokens: chunk 4 needs padding; the vocabulary blocks of the backward overlap."""
    hidden = rng.normal(size=(B, T, H)).astype(np.float32)
    lm_head = rng.normal(size=(H, V)).astype(np.float32) / 4
    targets = rng.integers(0, V, size=(B, T))
    cotangent = rng.normal(size=(B, T)).astype(np.float32)

    def weighted(fn):
        return lambda h, w: jnp.sum(cotangent * fn(h, w))

    chunked = jax.jit(
        lambda h, w: losses.chunked_token_logprobs(h, w, targets, chunk_size)
    )
    full = lambda h, w: losses.token_logprobs(h @ w, targets)
    np.testing.assert_allclose(chunked(hidden, lm_head), full(hidden, lm_head), **MATMUL_TOL)
    grads = jax.jit(jax.grad(weighted(chunked), argnums=(0, 1)))(hidden, lm_head)
    expected = jax.grad(weighted(full), argnums=(0, 1))(hidden, lm_head)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, **MATMUL_TOL)


def test_chunked_logprobs_vmap_and_bf16(rng):
    hidden = jnp.asarray(rng.normal(size=(2, B, T, H)), jnp.bfloat16)
    lm_head = jnp.asarray(rng.normal(size=(H, V)) / 4, jnp.bfloat16)
    targets = rng.integers(0, V, size=(2, B, T))
    fn = lambda h, t: losses.chunked_token_logprobs(h, lm_head, t, 5)
    batched = jax.vmap(fn)(hidden, targets)
    assert batched.dtype == jnp.float32
    for k in range(2):
        full_logits = jnp.dot(hidden[k], lm_head, preferred_element_type=jnp.float32)
        np.testing.assert_allclose(
            batched[k], losses.token_logprobs(full_logits, targets[k]), **MATMUL_TOL
        )
    total = lambda h, w: losses.chunked_token_logprobs(h, w, targets[0], 5).sum()
    grad_h, grad_w = jax.grad(total, (0, 1))(hidden[0], lm_head)
    assert grad_h.dtype == jnp.bfloat16 and grad_w.dtype == jnp.bfloat16
    # against the fp32 gradient of the unchunked formula on the same (bf16-valued) inputs: bf16 keeps
    # 8 bits of mantissa (relative rounding 2^-9), and each gradient is rounded once more to bf16, so
    # 1% of the largest entry bounds the difference; a wrong block or a dropped term is far larger
    full = lambda h, w: losses.token_logprobs(jnp.dot(h, w), targets[0]).sum()
    for got, want in zip((grad_h, grad_w), jax.grad(full, (0, 1))(hidden[0].astype(jnp.float32),
                                                                      lm_head.astype(jnp.float32)), strict=True):
        want = np.asarray(want)
        assert np.max(np.abs(np.asarray(got, np.float32) - want)) < 1e-2 * np.max(np.abs(want))


def test_chunked_logprobs_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_token_logprobs(jnp.zeros((2, H)), jnp.zeros((H, V)), jnp.zeros(2, int), 0)


def test_entropy_matches_loop(rng):
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    log_probs = log_softmax_loop(logits)
    expected = -np.sum(np.exp(log_probs) * log_probs, axis=-1)
    np.testing.assert_allclose(jax.jit(losses.entropy_from_logits)(logits), expected, **TOL)


def test_entropy_of_logits_masked_to_minus_inf_is_that_of_the_kept_tokens(rng):
    logits = rng.normal(size=(B, V)).astype(np.float32)
    masked = logits.copy()
    masked[:, V // 2:] = -np.inf  # e.g. top-k: those tokens have probability 0
    expected = losses.entropy_from_logits(logits[:, :V // 2])
    np.testing.assert_allclose(losses.entropy_from_logits(masked), expected, **TOL)
    gradient = jax.grad(lambda z: losses.entropy_from_logits(z).sum())(jnp.asarray(masked))
    assert np.isfinite(gradient).all() and (gradient[:, V // 2:] == 0).all()


def test_sft_loss_gradient_and_exact_accumulation(rng):
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    mask = np.zeros((B, T), np.float32)
    mask[0, 6:] = 1  # length 1
    mask[1, :] = 1  # full length
    mask[2, 2:5] = 1
    garbage_logits = np.where(mask[..., None] > 0, logits, np.nan).astype(np.float32)  # off the mask: NaN,
    garbage_logits[0, 0, :3] = [np.inf, -np.inf, 1e30]  # infinities, huge values: none may reach loss or gradient
    (loss, metrics), grad = jax.jit(
        jax.value_and_grad(losses.sft_loss, has_aux=True)
    )(garbage_logits, targets, mask)
    log_probs = log_softmax_loop(logits)
    nll = [
        -log_probs[i, t, targets[i, t]] for i in range(B) for t in range(T) if mask[i, t]
    ]
    np.testing.assert_allclose(loss, np.mean(nll), **TOL)
    np.testing.assert_allclose(metrics["nll_sum"], np.sum(nll), **TOL)
    assert metrics["num_tokens"] == len(nll)
    expected_grad = (np.exp(log_probs) - np.eye(V)[targets]) * mask[..., None] / len(nll)
    np.testing.assert_allclose(grad, expected_grad, **TOL)
    halves = (slice(0, 1), slice(1, 3))
    micro = [losses.sft_loss(logits[s], targets[s], mask[s])[1] for s in halves]
    accumulated = sum(m["nll_sum"] for m in micro) / sum(m["num_tokens"] for m in micro)
    np.testing.assert_allclose(accumulated, loss, **TOL)


def test_reward_losses_and_gradients_match_loops(rng):
    chosen, rejected = rng.normal(size=(2, 11)).astype(np.float32) * 2
    margin_grad = jax.jit(jax.value_and_grad(losses.margin_ranking_loss, (0, 1)))
    bt_grad = jax.jit(jax.value_and_grad(losses.bradley_terry_loss, (0, 1)))
    for margin in (0.0, 1.0):
        hinge = [max(0.0, margin - c + r) for c, r in zip(chosen, rejected)]
        active = np.array([h > 0 for h in hinge], np.float32) / len(hinge)
        loss, (d_chosen, d_rejected) = margin_grad(chosen, rejected, margin)
        np.testing.assert_allclose(loss, np.mean(hinge), **TOL)
        np.testing.assert_allclose(d_chosen, -active, **TOL)
        np.testing.assert_allclose(d_rejected, active, **TOL)

        diff = chosen.astype(np.float64) - rejected - margin
        sigmoid = 1 / (1 + np.exp(-diff))
        loss, (d_chosen, d_rejected) = bt_grad(chosen, rejected, margin)
        np.testing.assert_allclose(loss, np.mean(-np.log(sigmoid)), **TOL)
        np.testing.assert_allclose(d_chosen, -(1 - sigmoid) / len(diff), **TOL)
        np.testing.assert_allclose(d_rejected, (1 - sigmoid) / len(diff), **TOL)


def test_reward_losses_vmap_over_prompts(rng):
    chosen, rejected = rng.normal(size=(2, 3, 4)).astype(np.float32)
    per_prompt = jax.vmap(losses.margin_ranking_loss)(chosen, rejected)
    for k in range(3):
        np.testing.assert_allclose(
            per_prompt[k], losses.margin_ranking_loss(chosen[k], rejected[k]), **TOL
        )


def test_pairwise_accuracy_counts_ties_as_wrong():
    chosen = jnp.array([1.0, 2.0, 3.0, 0.0])
    rejected = jnp.array([0.0, 2.0, 4.0, -1.0])
    assert jax.jit(losses.pairwise_accuracy)(chosen, rejected) == 0.5
