"""Human rankings -> reward-model training pairs, and consensus of several labelers.

A ranking is a best-first sequence of response indices: ``[3, 0, 4, 1, 2]`` says response 3
is best and response 2 worst. A valid ranking of ``n`` responses is a permutation of
``0..n-1``; anything else raises ``InvalidRankingError`` (a ``ValueError``) with a one-line
message naming the ranking and the offending entry. Ties cannot be expressed in an input
ranking (a repeated index is an error); ties in the consensus are broken as documented in
``aggregate_rankings``.

Paper (section 3.2, 4.1): 5 responses per prompt, each ranked by 3 labelers; the top 2 and
bottom 2 responses give 2 x 2 = 4 (better, worse) pairs.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Sequence


class InvalidRankingError(ValueError):
    """A ranking is not a permutation of ``0..n-1`` or does not fit the request."""


@dataclasses.dataclass(frozen=True)
class ConsensusRanking:
    """Result of ``aggregate_rankings``.

    Attributes:
      order: consensus ranking, best first (a permutation of ``0..n-1``).
      borda_points: ``borda_points[i]`` = total Borda points of response ``i``.
      kendall_w: Kendall's coefficient of concordance W in [0, 1] (1 = all identical).
      mean_kendall_tau: mean Kendall tau-a over labeler pairs in [-1, 1]; None for one labeler.
    """

    order: tuple[int, ...]
    borda_points: tuple[int, ...]
    kendall_w: float
    mean_kendall_tau: float | None


def _response_index(entry: object, name: str, position: int) -> int:
    if not isinstance(entry, bool):
        try:
            return operator.index(entry)
        except TypeError:
            pass
    raise InvalidRankingError(f"{name}: entry {position} is {entry!r}, not a response index")


def _validated(ranking: Sequence[object], num_responses: int, name: str) -> tuple[int, ...]:
    """``ranking`` as a tuple of ints, checked to be a permutation of ``0..num_responses-1``."""
    if len(ranking) != num_responses:
        raise InvalidRankingError(
            f"{name}: has {len(ranking)} responses, expected {num_responses}"
        )
    indices = tuple(_response_index(e, name, i) for i, e in enumerate(ranking))
    seen: set[int] = set()
    for index in indices:
        if index in seen:
            raise InvalidRankingError(f"{name}: response {index} appears more than once")
        seen.add(index)
    missing = sorted(set(range(num_responses)) - seen)
    if missing:
        outside = sorted(seen - set(range(num_responses)))
        raise InvalidRankingError(
            f"{name}: response {missing[0]} is missing and index {outside[0]} is outside "
            f"0..{num_responses - 1}"
        )
    return indices


def ranking_to_pairs(
    ranked_responses: Sequence[int], top_k: int = 2, bottom_k: int = 2
) -> list[tuple[int, int]]:
    """(chosen, rejected) pairs: each of the ``top_k`` best x each of the ``bottom_k`` worst.

    Best first in, ``top_k * bottom_k`` pairs out, chosen-major:
    ``ranking_to_pairs([3, 0, 4, 1, 2]) == [(3, 1), (3, 2), (0, 1), (0, 2)]``.
    The middle responses are unused (paper section 3.2). Raises ``InvalidRankingError``
    unless ``ranked_responses`` is a permutation of ``0..n-1`` with
    ``top_k + bottom_k <= n`` and ``top_k, bottom_k >= 1``.
    """
    ranking = _validated(ranked_responses, len(ranked_responses), "ranking")
    if top_k < 1 or bottom_k < 1:
        raise InvalidRankingError(f"top_k and bottom_k must be >= 1, got {top_k}, {bottom_k}")
    if top_k + bottom_k > len(ranking):
        raise InvalidRankingError(
            f"ranking: has {len(ranking)} responses, fewer than top_k + bottom_k = "
            f"{top_k + bottom_k}"
        )
    return list(itertools.product(ranking[:top_k], ranking[len(ranking) - bottom_k :]))


def _kendall_tau(a: Sequence[int], b: Sequence[int]) -> float:
    """Kendall tau-a of two strict rankings: (concordant - discordant) / (n choose 2)."""
    position_a = {r: i for i, r in enumerate(a)}
    position_b = {r: i for i, r in enumerate(b)}
    pairs = list(itertools.combinations(range(len(a)), 2))
    agreement = sum(
        1 if (position_a[x] < position_a[y]) == (position_b[x] < position_b[y]) else -1
        for x, y in pairs
    )
    return agreement / len(pairs)


def _kendall_w(rankings: Sequence[Sequence[int]]) -> float:
    """Kendall's W = 12 S / (m^2 (n^3 - n)), S = sum_i (R_i - mean R)^2, R_i = rank sum of i."""
    m, n = len(rankings), len(rankings[0])
    rank_sums = [0] * n
    for ranking in rankings:
        for position, response in enumerate(ranking):
            rank_sums[response] += position + 1
    mean_rank_sum = m * (n + 1) / 2
    spread = sum((r - mean_rank_sum) ** 2 for r in rank_sums)
    return 12 * spread / (m**2 * (n**3 - n))


def _head_to_head_wins(response: int, rivals: Sequence[int], positions) -> int:
    """Rivals that a strict majority of labelers rank below ``response``.

    ``positions[k][r]`` is the position labeler ``k`` gave response ``r`` (0 = best).
    """
    wins = 0
    for rival in rivals:
        ahead = sum(p[response] < p[rival] for p in positions)
        wins += ahead > len(positions) - ahead
    return wins


def labelers_prefer(rankings: Sequence[Sequence[int]], points: Sequence[int], better: int, worse: int) -> bool:
    """Whether the labelers prefer response ``better`` to ``worse``: more Borda ``points``, or as
    many and a strict majority of ``rankings`` placing it above. The consensus orders every two
    responses; two with as many points carry no preference for its order when no strict majority
    backs it: a tie (e.g. two labelers who disagree) or a cycle (with any number of labelers: a
    majority prefers 1 to 2, 2 to 3 and 3 to 1, and the consensus, by wins then index, puts 1 above 3)."""
    if points[better] != points[worse]:
        return points[better] > points[worse]
    positions = [{r: p for p, r in enumerate(ranking)} for ranking in rankings]
    return _head_to_head_wins(better, [worse], positions) == 1


def aggregate_rankings(per_labeler_rankings: Sequence[Sequence[int]]) -> ConsensusRanking:
    """Consensus of several labelers' best-first rankings of the same ``n >= 2`` responses.

    Method: Borda count. Position ``p`` (0 = best) earns ``n - 1 - p`` points; responses are
    ordered by total points. Ties in points are broken, deterministically, by head-to-head
    majority wins against the other responses with the same points (more wins first), and
    then by the lower response index.

    Agreement: Kendall's W (coefficient of concordance, 1 = identical rankings, ~0 = none)
    and the mean Kendall tau over all labeler pairs (None for a single labeler).

    Raises ``InvalidRankingError`` for no labelers, fewer than 2 responses, or a ranking
    that is not a permutation of ``0..n-1`` (``n`` taken from labeler 0).
    """
    if not per_labeler_rankings:
        raise InvalidRankingError("no rankings given")
    num_responses = len(per_labeler_rankings[0])
    if num_responses < 2:
        raise InvalidRankingError(
            f"labeler 0: ranks {num_responses} responses; aggregation needs at least 2"
        )
    rankings = [
        _validated(ranking, num_responses, f"labeler {k}")
        for k, ranking in enumerate(per_labeler_rankings)
    ]
    positions = [{r: p for p, r in enumerate(ranking)} for ranking in rankings]
    points = [sum(num_responses - 1 - p[r] for p in positions) for r in range(num_responses)]

    def sort_key(response: int) -> tuple[int, int, int]:
        tied = [r for r in range(num_responses) if r != response and points[r] == points[response]]
        return (-points[response], -_head_to_head_wins(response, tied, positions), response)

    labeler_pairs = list(itertools.combinations(rankings, 2))
    mean_tau = (
        sum(_kendall_tau(a, b) for a, b in labeler_pairs) / len(labeler_pairs)
        if labeler_pairs
        else None
    )
    return ConsensusRanking(
        order=tuple(sorted(range(num_responses), key=sort_key)),
        borda_points=tuple(points),
        kendall_w=_kendall_w(rankings),
        mean_kendall_tau=mean_tau,
    )
