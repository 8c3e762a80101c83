"""Pure loss functions: token log-probs, entropy, SFT and reward-model losses.

Every function takes arrays and returns arrays (or ``(loss, metrics)``), has no side
effects, and works under ``jit``, ``vmap`` and ``grad``. Log-probabilities and entropies
are computed in float32 whatever the dtype of the logits, since bf16 log-softmax loses
the small differences PPO ratios depend on.

Alignment convention: ``logits[..., t, :]`` scores ``targets[..., t]``; callers shift the
tokens (``targets = tokens[:, 1:]``) before calling.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from icegrt_jax.row_pieces import merge_pieces, strided_pieces

Array = jax.Array


def _logprobs_and_logsumexp(logits: Array, targets: Array) -> tuple[Array, Array]:
    """``(z[y] - logsumexp(z), logsumexp(z))`` over the last axis, in float32."""
    logits = logits.astype(jnp.float32)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - log_normalizer, log_normalizer


def token_logprobs(logits: Array, targets: Array) -> Array:
    """Log-probability of each target token: ``log p(y_t) = z_t[y_t] - logsumexp(z_t)``.

    Args:
      logits: ``[..., V]`` unnormalised scores.
      targets: ``[...]`` integer token ids.

    Returns:
      ``[...]`` float32 log-probabilities. Only the gathered logit and the logsumexp are
      formed, never the full ``[..., V]`` log-softmax.
    """
    chex.assert_rank(logits, targets.ndim + 1)
    chex.assert_equal_shape_prefix((logits, targets), targets.ndim)
    return _logprobs_and_logsumexp(logits, targets)[0]


def chunked_token_logprobs(
    hidden: Array, lm_head: Array, targets: Array, chunk_size: int
) -> Array:
    """``token_logprobs(hidden @ lm_head, targets)`` without the full ``[..., V]`` logits.

    The leading axes of ``hidden`` are flattened into ``N`` tokens (zero-padded to a
    multiple of ``chunk_size``). Forward: ``lax.map`` over token chunks, each forming only
    ``[chunk_size, V]`` logits and keeping ``lse_n = logsumexp(z_n)`` (``N`` floats) for
    the backward. Backward (``custom_vjp``): with ``dz = g * (onehot(y) - exp(z - lse))``,
    ``d hidden = dz @ W^T`` and ``d W = hidden^T @ dz`` are computed one *vocabulary*
    block at a time (``N * block ~ chunk_size * V`` logits recomputed per step), so each
    block of ``d W`` is written once in place and no ``[H, V]`` partial sum or ``[N, V]``
    array is ever formed. Temporary memory is ``O(chunk_size * V + N * H)`` both ways.
    Differentiable once (reverse mode) in ``hidden`` and ``lm_head``.

    Args:
      hidden: ``[..., H]`` final hidden states (after the last norm).
      lm_head: ``[H, V]`` output projection kernel (``logits = hidden @ lm_head``).
      targets: ``[...]`` integer token ids.
      chunk_size: tokens per forward chunk (static).

    Returns:
      ``[...]`` float32 log-probabilities, equal to ``token_logprobs`` of the full logits.
    """
    chex.assert_rank(lm_head, 2)
    chex.assert_rank(hidden, targets.ndim + 1)
    chex.assert_equal_shape_prefix((hidden, targets), targets.ndim)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    num_tokens = flat_targets.shape[0]
    padding = -num_tokens % chunk_size
    if padding:
        flat_hidden = jnp.pad(flat_hidden, ((0, padding), (0, 0)))
        flat_targets = jnp.pad(flat_targets, (0, padding))
    logprobs = _flat_chunked_logprobs(flat_hidden, lm_head, flat_targets, chunk_size)
    return logprobs[:num_tokens].reshape(targets.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flat_chunked_logprobs(hidden, lm_head, targets, chunk_size):
    return _chunked_forward(hidden, lm_head, targets, chunk_size)[0]


def _chunked_forward(hidden, lm_head, targets, chunk_size):
    """``[N]`` log-probs and logsumexps, ``chunk_size`` tokens (rows of hidden) at a time.

    Chunk k holds rows k, k + N/C, k + 2N/C, ... (C = chunk_size; ``row_pieces``): rows laid out
    in blocks over data-parallel devices keep their devices, each computing its own rows' logits
    (contiguous chunks put the row sharding on the loop axis, and every device computed every row)."""

    def chunk_stats(chunk):
        chunk_hidden, chunk_targets = chunk
        logits = jnp.dot(chunk_hidden, lm_head, preferred_element_type=jnp.float32)
        return _logprobs_and_logsumexp(logits, chunk_targets)

    pieces = hidden.shape[0] // chunk_size
    logprobs, log_normalizer = jax.lax.map(
        chunk_stats, (strided_pieces(hidden, pieces), strided_pieces(targets, pieces)))
    return merge_pieces(logprobs), merge_pieces(log_normalizer)


def _chunked_forward_with_residuals(hidden, lm_head, targets, chunk_size):
    logprobs, log_normalizer = _chunked_forward(hidden, lm_head, targets, chunk_size)
    return logprobs, (hidden, lm_head, targets, log_normalizer)


def _chunked_backward(chunk_size, residuals, cotangent):
    """Vocabulary-blocked VJP; the last block is shifted left to stay in bounds and its
    columns already covered by the previous block are excluded from ``d hidden``."""
    hidden, lm_head, targets, log_normalizer = residuals
    num_tokens, vocab = hidden.shape[0], lm_head.shape[1]
    block = min(vocab, -(-chunk_size * vocab // max(num_tokens, 1)))
    cotangent = cotangent.astype(jnp.float32)

    def vocab_block_step(index, grads):
        d_hidden, d_lm_head = grads
        nominal_start = index * block
        start = jnp.minimum(nominal_start, vocab - block)
        lm_head_block = jax.lax.dynamic_slice_in_dim(lm_head, start, block, axis=1)
        logits = jnp.dot(hidden, lm_head_block, preferred_element_type=jnp.float32)
        columns = start + jnp.arange(block)
        probs = jnp.exp(logits - log_normalizer[:, None])
        d_logits = cotangent[:, None] * ((targets[:, None] == columns) - probs)
        first_visit = jnp.where(columns >= nominal_start, d_logits, 0.0)
        d_hidden = d_hidden + jnp.dot(
            first_visit, lm_head_block.T, preferred_element_type=jnp.float32
        )
        d_block = jnp.dot(hidden.T, d_logits, preferred_element_type=jnp.float32)
        d_lm_head = jax.lax.dynamic_update_slice_in_dim(
            d_lm_head, d_block.astype(lm_head.dtype), start, axis=1
        )
        return d_hidden, d_lm_head

    d_hidden, d_lm_head = jax.lax.fori_loop(
        0,
        -(-vocab // block),
        vocab_block_step,
        (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(lm_head)),
    )
    return d_hidden.astype(hidden.dtype), d_lm_head, None


_flat_chunked_logprobs.defvjp(_chunked_forward_with_residuals, _chunked_backward)


def entropy_from_logits(logits: Array) -> Array:
    """Entropy of the softmax over the last axis: ``H = logsumexp(z) - sum_v softmax(z)_v z_v``,
    where a token of probability 0 (a -inf logit: masked by top-k or a vocabulary mask) adds 0.

    Returns ``logits.shape[:-1]`` float32 entropies (nats).
    """
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weighted = jnp.where(probs > 0, probs * jnp.where(probs > 0, logits, 0.0), 0.0)  # no 0 * -inf, nor its gradient
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(weighted, axis=-1)


def sft_loss(
    logits: Array, targets: Array, loss_mask: Array
) -> tuple[Array, dict[str, Array]]:
    """Supervised fine-tuning loss: token-mean negative log-likelihood on the mask.

    ``loss = sum_t m_t * -log p(y_t) / sum_t m_t`` over the tokens where ``m_t != 0`` (selected:
    a mask is 0/1, other values count as 1; 0 when the mask is empty), the loss of
    ICE-Instruct, computed on the response tokens only. The metrics carry ``nll_sum`` and
    ``num_tokens`` so gradient accumulation over micro-batches can form the exact token
    mean ``sum(nll_sum) / sum(num_tokens)`` instead of a mean of means.

    Args:
      logits: ``[B, T, V]``. targets: ``[B, T]`` ids. loss_mask: ``[B, T]``, 1 where scored.
    """
    chex.assert_equal_shape((targets, loss_mask))
    # logits off the mask are replaced before any maths: not even a NaN there reaches the gradient
    logits = jnp.where((loss_mask != 0)[..., None], logits, 0.0)
    nll_sum, num_tokens = masked_nll_sum(token_logprobs(logits, targets), loss_mask)
    loss = nll_sum / jnp.maximum(num_tokens, 1.0)
    return loss, {"nll_sum": nll_sum, "num_tokens": num_tokens}


def masked_nll_sum(logprobs: Array, loss_mask: Array) -> tuple[Array, Array]:
    """``(sum_t -logprobs_t, count)`` over the tokens where ``loss_mask != 0`` (selected, not multiplied:
    nothing off the mask enters the sum): the numerator and the token count of the token-mean
    NLL, summed exactly over micro-batches."""
    chex.assert_equal_shape((logprobs, loss_mask))
    on_mask = loss_mask != 0
    return -jnp.sum(jnp.where(on_mask, logprobs, 0.0)), jnp.sum(on_mask, dtype=jnp.float32)


def margin_ranking_loss(chosen: Array, rejected: Array, margin: float = 1.0) -> Array:
    """ICE-Reward pairwise ranking loss (paper section 3.2).

    ``L(a_i, a_j) = max(0, margin - R(s, a_i) + R(s, a_j))`` averaged over pairs, with
    ``a_i`` the higher-ranked (chosen) and ``a_j`` the lower-ranked (rejected) response.
    """
    chex.assert_equal_shape((chosen, rejected))
    return jnp.mean(jax.nn.relu(margin - chosen + rejected))


def bradley_terry_loss(chosen: Array, rejected: Array, margin: float = 0.0) -> Array:
    """Bradley-Terry reward loss ``-log sigmoid(R_i - R_j - margin)`` averaged over pairs.

    The InstructGPT / Llama-2 reward objective (Ouyang et al. 2022; Touvron et al. 2023,
    who add the margin), computed with the stable ``log_sigmoid``.
    """
    chex.assert_equal_shape((chosen, rejected))
    return -jnp.mean(jax.nn.log_sigmoid(chosen - rejected - margin))


def pairwise_accuracy(chosen: Array, rejected: Array) -> Array:
    """Fraction of pairs ranked correctly, ``mean(R_i > R_j)``; ties count as wrong."""
    chex.assert_equal_shape((chosen, rejected))
    return jnp.mean(chosen > rejected, dtype=jnp.float32)
