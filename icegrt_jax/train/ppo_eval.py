"""Held-out evaluation of the PPO policy (``data.eval_prompt_files``).

``make_eval_fn``'s function, which ``train_loop`` calls every ``training.eval_every`` iterations
and at the last: the current actor answers the held-out prompts greedily (the rollouts' length
limit and stop tokens, ``rows`` prompts per sampler batch), and the answers are scored as the
rollouts are (the ``score`` of ``ppo.make_scorer``: the reward model, or ``reward.function`` on
process 0), ``rows`` rows at a time, the last piece filled with repeats of its first row (not
counted). Returns the raw scores' mean and std, the mean response length and the share of
responses cut at the length limit (or the context).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from icegrt_jax.data.sources import SourceReport
from icegrt_jax.sampling import GenerationResult, SamplingParams, generate, to_host
from icegrt_jax.sharding import Partitioner


def eval_report_line(prompts: int, dropped: int, source: SourceReport) -> str:
    """The data report's line for the held-out prompts."""
    return source.appended_to(f"eval: {prompts} prompts ({dropped} longer than data.max_prompt_length dropped)")


def result_rows(result: GenerationResult, rows: np.ndarray) -> GenerationResult:
    """``result`` restricted to ``rows`` (indices, repeats allowed)."""
    return GenerationResult(*(getattr(result, f.name)[rows] for f in dataclasses.fields(result)))


def filled_pieces(count: int, rows: int) -> list[np.ndarray]:
    """Row indices [0, count) in pieces of ``rows``, the last one filled with its first index."""
    pieces = [np.arange(start, min(start + rows, count)) for start in range(0, count, rows)]
    pieces[-1] = np.concatenate([pieces[-1], np.full(rows - len(pieces[-1]), pieces[-1][0])])
    return pieces


def eval_metrics(scores: np.ndarray, result: GenerationResult) -> dict[str, float]:
    """The evaluation's metrics from the raw scores [R] and the generations' R rows."""
    return {"score_raw_mean": float(scores.mean()), "score_raw_std": float(scores.std()),
            "response_length": float(result.lengths.mean()),
            "truncation_rate": float(1 - result.finished_by_eos.mean())}


def make_eval_fn(prompts: list, actor_graphdef, score: Callable, *, rows: int, max_new_tokens: int,
                 stop_ids: tuple[int, ...], pad_id: int, partitioner: Partitioner, progress: bool = False) -> Callable:
    """``evaluate(state) -> metrics`` of the ``PPOState``'s actor on ``prompts`` (tokenised
    examples; their ``source`` is the prompt text); ``progress``: the sampler's bar."""
    texts = [e.source for e in prompts]
    sampling = SamplingParams(greedy=True, max_new_tokens=max_new_tokens, eos_token_ids=stop_ids, pad_id=pad_id)

    def evaluate(state) -> dict[str, float]:
        with partitioner.activate():
            result = generate((actor_graphdef, state.actor.params), [e.input_ids for e in prompts], sampling,
                              batch_size=rows, progress=progress)
        scores = []
        for piece in filled_pieces(len(prompts), rows):
            piece_result = result_rows(result, piece)
            tokens, attention_mask = partitioner.shard_batch((piece_result.tokens, piece_result.attention_mask))
            scores.append(to_host(score([texts[i] for i in piece], piece_result, tokens, attention_mask)))
        return eval_metrics(np.concatenate(scores)[:len(prompts)], result)  # the fillers come last

    return evaluate
