"""PPO experience: forward passes over sampled rollouts, reward-model scoring, shaped rewards, GAE.

Alignment. A rollout row holds ``tokens [L]`` (left-padded prompt, then the response). The
action at index ``t`` of every ``[R, L-1]`` array is token ``tokens[t+1]``, chosen in state
``tokens[:t+1]``: ``logprobs[t] = log pi(tokens[t+1] | tokens[:t+1])``, ``values[t] = V(tokens[:t+1])``
and ``mask[t] = response_mask[t+1]`` (1 on response tokens, EOS included). Every formula comes
from ``icegrt_jax.rl`` and ``icegrt_jax.losses``; this module only composes them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from icegrt_jax import rl
from icegrt_jax.config import ConfigError, PPOLossConfig, RewardModelConfig
from icegrt_jax.data.templates import Template
from icegrt_jax.data.tokenize import tokenize_prompt, tokenize_response
from icegrt_jax.losses import entropy_from_logits, token_logprobs
from icegrt_jax.models.heads import score_at_last_token
from icegrt_jax.row_pieces import merge_pieces, strided_pieces


def sequence_logprobs(graphdef, params, tokens, attention_mask, temperature: float,
                      response_actions: int | None = None):
    """(log pi(a_t | s_t), entropy of pi(. | s_t)), both [R, L-1], with pi = softmax(logits / T)
    (the distribution the sampler draws from when top_k = 0 and top_p = 1).

    ``response_actions`` (static) = the rollout's maximum response length: a rollout row ends
    with its response block, so only the last ``response_actions`` actions can be response
    tokens. Only they go through the LM head (saving its work, and the [R, L, V] logits, on the
    prompt); the earlier entries are 0. None: every action."""
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden_states(tokens, attention_mask)
    first = 0 if response_actions is None else max(tokens.shape[1] - 1 - response_actions, 0)
    logits = model.logits(hidden[:, first:-1]) / temperature
    skipped = ((0, 0), (first, 0))
    return (jnp.pad(token_logprobs(logits, tokens[:, first + 1:]), skipped),
            jnp.pad(entropy_from_logits(logits), skipped))


def sequence_logprobs_without_entropy(graphdef, params, tokens, attention_mask, temperature: float,
                                      response_actions: int | None = None):
    """``sequence_logprobs``' log-probs alone (the reference's: XLA then skips the entropy's pass
    over the [R, actions, V] logits)."""
    return sequence_logprobs(graphdef, params, tokens, attention_mask, temperature, response_actions)[0]


def critic_values(graphdef, params, tokens, attention_mask):
    """V(s_t) [R, L-1] from a ScoreModel critic."""
    return nnx.merge(graphdef, params)(tokens, attention_mask)[:, :-1]


def in_row_chunks(forward: Callable, chunks: int) -> Callable:
    """A scoring forward ``forward(params, tokens, attention_mask, *static)`` run over the rows
    ([R, L] each) in ``chunks`` sequential pieces of R / chunks rows (``lax.map``: one piece's
    activations live at a time). Rows do not interact, so the result is ``forward``'s on all rows
    (up to the rounding of batch-size-dependent kernels). Piece i takes rows i, i + chunks, ...
    (``row_pieces``): with the rows over data-parallel devices, every device scores its own."""
    if chunks == 1:
        return forward

    def chunked(params, tokens, attention_mask, *static):
        pieces = (strided_pieces(tokens, chunks), strided_pieces(attention_mask, chunks))
        return jax.tree.map(merge_pieces, jax.lax.map(lambda piece: forward(params, *piece, *static), pieces))

    return chunked


@flax.struct.dataclass
class Advantages:
    rewards: jax.Array
    advantages: jax.Array  # whitened when configured
    raw_advantages: jax.Array
    returns: jax.Array


def compute_advantages(scores, logprobs, ref_logprobs, values, mask, kl_coef, cfg: PPOLossConfig) -> Advantages:
    """r = shaped_rewards(score, KL); (A, G) = gae(r, V); A_hat = masked_whiten(A) if configured."""
    rewards = rl.shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, cfg.kl_estimator)
    advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    whitened = rl.masked_whiten(advantages, mask) if cfg.whiten_advantages else advantages
    return Advantages(rewards, whitened, advantages, returns)


# --- scores ------------------------------------------------------------------------------------

def reward_model_scores(graphdef, params, tokens, attention_mask):
    """R(s, a) [R] at each row's last real token (the EOS, or the last token when truncated)."""
    values = nnx.merge(graphdef, params)(tokens, attention_mask)
    return score_at_last_token(values, attention_mask)


def load_score_function(spec: str) -> Callable:
    """``"module:function"`` -> the function, or a ConfigError naming ``reward.function``."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"reward.function: {spec!r} is not of the form 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError, TypeError) as e:  # TypeError: a relative name such as ".x"
        raise ConfigError(f"reward.function: cannot import module {module_name!r} ({e}); its directory must be "
                          "on PYTHONPATH (e.g. PYTHONPATH=. icegrt ppo ...)") from None
    if (function := getattr(module, name, None)) is None:
        raise ConfigError(f"reward.function: module {module_name!r} has no {name!r}")
    if not callable(function):
        raise ConfigError(f"reward.function: {spec!r} is not callable")
    return function


def primary_scores(score: Callable[[], object], count: int, spec: str) -> np.ndarray:
    """``score()``'s checked scores [count], alike on every process: in a multi-process run only
    process 0 calls the scorer (it need not be deterministic) and broadcasts what it returned.
    When that fails (the scorer raises, or returns the wrong shape), every process raises, after
    agreeing so (process 0 its own error, the others a ``ConfigError`` pointing to it): no
    process is left waiting in the broadcast."""
    if jax.process_count() == 1:
        return checked_scores(score(), count, spec)
    scores, error = np.zeros(count, np.float32), None
    if jax.process_index() == 0:
        try:
            scores = checked_scores(score(), count, spec, finite=False)
        except BaseException as e:  # noqa: BLE001 - re-raised below, once every process knows (sys.exit too)
            error = e
    if int(multihost_utils.broadcast_one_to_all(np.int32(error is not None))):
        if error is not None:
            raise error
        raise ConfigError(f"reward.function {spec}: the scorer failed on process 0 (its error says why)")
    return checked_scores(np.asarray(multihost_utils.broadcast_one_to_all(scores)), count, spec)  # alike everywhere


def checked_scores(scores, count: int, spec: str, finite: bool = True) -> np.ndarray:
    """A scorer's output as float32 [count] (all finite unless ``finite`` is off); anything else
    is a ``ConfigError`` naming ``reward.function``."""
    try:
        array = np.asarray(scores)
    except (TypeError, ValueError):
        array = np.asarray(None)  # ragged: not numbers either
    if array.dtype.kind not in "biuf":  # strings are not converted: a scorer returning "0.5" is a bug
        raise ConfigError(f"reward.function {spec}: returned {type(scores).__name__} values that are not numbers")
    array = array.astype(np.float32)
    if array.shape != (count,):
        raise ConfigError(f"reward.function {spec}: returned shape {array.shape} for {count} responses "
                          "(expected one score each)")
    if finite and not np.isfinite(array).all():
        raise ConfigError(f"reward.function {spec}: returned a non-finite score")
    return array


def same_tokenizer(a, b) -> bool:
    """Both vocabularies and special tokens agree."""
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def passes_tokens_through(tokenizer, reward_tokenizer, stop_ids) -> bool:
    """Whether the policy's tokens go to the reward model as they are: it reads them as its
    training data when it has the same tokenizer and every response that ends, ends with EOS
    (a response ended by another stop token is decoded without it and retokenised + EOS)."""
    return (reward_tokenizer is not None and same_tokenizer(tokenizer, reward_tokenizer)
            and set(stop_ids) == {tokenizer.eos_token_id})


def retokenize_for_reward(tokenizer, template: Template, prompts: list[str], responses: list[str],
                          finished_by_eos: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (tokens, attention_mask) of template prompt + response (+ EOS when the
    response ended with one) in the reward model's tokenizer, tokenised as its training data was
    (a response's text that spells a special token stays text: no EOS inside a response)."""
    rows = []
    for prompt, response, ended in zip(prompts, responses, finished_by_eos):
        ids = list(tokenize_prompt(tokenizer, template, prompt)) + tokenize_response(tokenizer, template, response)
        rows.append(ids + ([tokenizer.eos_token_id] if ended else []))
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    return tokens, mask


def shape_scores(raw, finished_by_eos, moments: rl.RunningMoments, normalize: str, stats: dict | None,
                 clip: float | None, missing_eos_penalty: float | None):
    """score = clip(normalise(raw) - penalty * [no EOS], +-clip); returns (scores, moments).

    ``normalize``: "stats" uses the reward model's saved mean/std; "running" first merges this
    batch into the running moments (Welford/Chan), then standardises with them.
    """
    moments = rl.update_running_moments(moments, raw)
    if normalize == "stats":
        scores = (raw - stats["score_mean"]) / (stats["score_std"] + 1e-8)
    elif normalize == "running":
        scores = rl.normalize_with_moments(raw, moments)
    else:
        scores = raw
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (1.0 - finished_by_eos.astype(scores.dtype))
    if clip is not None:
        scores = jnp.clip(scores, -clip, clip)
    return scores, moments


LARGE_SCORE = 10.0  # |shaped score| beyond which reward.normalize=stats without reward.clip is suspect


def large_score_warning(score_abs_max, reward_cfg: RewardModelConfig, stats: dict | None) -> str | None:
    """A one-line warning when ``reward.normalize: stats`` with no ``reward.clip`` gave a rollout
    scores beyond +-``LARGE_SCORE``: the reward model's saved std (from its held-out set, which can
    be small) is then small next to the spread of the policy's scores, and such scores swamp the
    KL penalty. None otherwise (and for NaN or infinite scores, which stop the run as non-finite).
    ``score_abs_max``: max |score| of the rollout (a scalar)."""
    if reward_cfg.normalize != "stats" or reward_cfg.clip is not None:
        return None
    largest = float(score_abs_max)
    if not largest > LARGE_SCORE or largest == float("inf"):  # non-finite scores stop the run anyway
        return None
    return (f"warning: reward.normalize=stats gave scores up to {largest:.3g} in absolute value (reward_stats.json: "
            f"score_std {stats['score_std']:.3g}); set reward.clip (e.g. 5) to bound them")


def experience_from_scores(raw_scores, finished_by_eos, logprobs, ref_logprobs, values, mask,
                           kl: rl.KLController, moments: rl.RunningMoments, *, reward_cfg: RewardModelConfig,
                           reward_stats: dict | None, loss_cfg: PPOLossConfig):
    """Everything a rollout's scores and forwards give, in one program: (shaped scores [R],
    ``Advantages`` with the current KL coefficient, each row's k1 KL sum_t log(pi/pi_ref) [R], the
    KL controller stepped with its mean, the reward moments with this batch merged in)."""
    scores, moments = shape_scores(raw_scores, finished_by_eos, moments, reward_cfg.normalize, reward_stats,
                                   reward_cfg.clip, reward_cfg.missing_eos_penalty)
    advantages = compute_advantages(scores, logprobs, ref_logprobs, values, mask, kl.kl_coef, loss_cfg)
    sequence_kl = jnp.sum(rl.kl_penalty(logprobs, ref_logprobs, "k1"), axis=1, where=mask != 0)
    kl = rl.update_kl_controller(kl, jnp.mean(sequence_kl), mask.shape[0])
    return scores, advantages, sequence_kl, kl, moments
