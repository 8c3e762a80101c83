"""icegrt_jax.data rankings: pairs, consensus, agreement, and every malformed input."""

import itertools
import random

import numpy as np
import pytest

from icegrt_jax.data import (
    ConsensusRanking,
    InvalidRankingError,
    aggregate_rankings,
    labelers_prefer,
    ranking_to_pairs,
)


def test_paper_ranking_of_five_gives_top2_by_bottom2_pairs():
    assert ranking_to_pairs([3, 0, 4, 1, 2]) == [(3, 1), (3, 2), (0, 1), (0, 2)]


def test_general_top_k_bottom_k_matches_loop():
    rng = random.Random(0)
    for n in range(2, 8):
        ranking = rng.sample(range(n), n)
        for top_k, bottom_k in itertools.product(range(1, n), repeat=2):
            if top_k + bottom_k > n:
                continue
            expected = [
                (ranking[i], ranking[j])
                for i in range(top_k)
                for j in range(n - bottom_k, n)
            ]
            assert ranking_to_pairs(ranking, top_k, bottom_k) == expected


def test_ranking_to_pairs_accepts_numpy_indices():
    assert ranking_to_pairs(np.array([1, 0, 2]), 1, 1) == [(1, 2)]


@pytest.mark.parametrize(
    "ranking,top_k,bottom_k,message",
    [
        ([0, 1, 2], 2, 2, r"has 3 responses, fewer than top_k \+ bottom_k = 4"),
        ([0, 1, 2, 3, 4], 0, 2, "must be >= 1"),
        ([0, 1, 1, 3, 4], 2, 2, "response 1 appears more than once"),
        ([0, 1, 2, 4, 5], 2, 2, "response 3 is missing and index 5 is outside 0..4"),
        ([0, -1, 2, 3, 4], 2, 2, "response 1 is missing and index -1 is outside 0..4"),
        ([0, 1, 2.5, 3, 4], 2, 2, "entry 2 is 2.5, not a response index"),
        ([0, True, 2, 3, 4], 2, 2, "entry 1 is True, not a response index"),
    ],
)
def test_ranking_to_pairs_rejects_malformed_rankings(ranking, top_k, bottom_k, message):
    with pytest.raises(InvalidRankingError, match=message):
        ranking_to_pairs(ranking, top_k, bottom_k)


def test_invalid_ranking_error_is_a_value_error():
    assert issubclass(InvalidRankingError, ValueError)


# ---------------------------------------------------------------------------- consensus


def borda_loop(rankings):
    n = len(rankings[0])
    points = [0] * n
    for ranking in rankings:
        for position, response in enumerate(ranking):
            points[response] += n - 1 - position
    return points


def kendall_tau_loop(a, b):
    n = len(a)
    concordant = discordant = 0
    for x in range(n):
        for y in range(x + 1, n):
            sign = (a.index(x) - a.index(y)) * (b.index(x) - b.index(y))
            concordant += sign > 0
            discordant += sign < 0
    return (concordant - discordant) / (n * (n - 1) / 2)


def test_identical_rankings_agree_perfectly():
    result = aggregate_rankings([[2, 0, 1, 4, 3]] * 3)
    expected = ConsensusRanking(
        order=(2, 0, 1, 4, 3), borda_points=(9, 6, 12, 0, 3), kendall_w=1.0, mean_kendall_tau=1.0
    )
    assert result == expected


def test_consensus_matches_borda_and_agreement_matches_loops():
    rng = random.Random(1)
    for _ in range(20):
        n, m = rng.randint(2, 6), rng.randint(2, 4)
        rankings = [rng.sample(range(n), n) for _ in range(m)]
        result = aggregate_rankings(rankings)
        points = borda_loop(rankings)
        assert result.borda_points == tuple(points)
        assert sorted(result.order) == list(range(n))
        assert [points[r] for r in result.order] == sorted(points, reverse=True)
        taus = [kendall_tau_loop(a, b) for a, b in itertools.combinations(rankings, 2)]
        assert result.mean_kendall_tau == pytest.approx(np.mean(taus))
        # Kendall's W and mean Spearman rho are tied: rho_mean = (m W - 1) / (m - 1).
        spearman = [
            1 - 6 * sum((a.index(i) - b.index(i)) ** 2 for i in range(n)) / (n**3 - n)
            for a, b in itertools.combinations(rankings, 2)
        ]
        expected_w = (np.mean(spearman) * (m - 1) + 1) / m
        assert result.kendall_w == pytest.approx(expected_w)


def test_borda_tie_is_broken_by_head_to_head_majority():
    # 0 and 1 both get 4 points; 2 of 3 labelers put 1 above 0.
    result = aggregate_rankings([[1, 0, 2], [1, 0, 2], [0, 2, 1]])
    assert result.borda_points == (4, 4, 1)
    assert result.order == (1, 0, 2)


def test_borda_and_head_to_head_tie_falls_back_to_lower_index():
    # 0 and 1 both get 5 points and split the head-to-head 2-2.
    result = aggregate_rankings([[0, 2, 1], [1, 0, 2], [1, 2, 0], [0, 1, 2]])
    assert result.borda_points == (5, 5, 2)
    assert result.order == (0, 1, 2)
    swapped = aggregate_rankings([[1, 2, 0], [0, 1, 2], [0, 2, 1], [1, 0, 2]])
    assert swapped.order == (0, 1, 2)


def test_full_cycle_is_all_tied_and_falls_back_to_index_order():
    result = aggregate_rankings([[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    assert result.borda_points == (3, 3, 3)
    assert result.order == (0, 1, 2)
    assert result.kendall_w == 0.0
    assert result.mean_kendall_tau == pytest.approx(-1 / 3)


def test_labelers_prefer_by_points_then_a_strict_majority():
    rankings = [[0, 1, 2, 3], [0, 2, 1, 3]]  # points (6, 3, 3, 0): 1 and 2 tied, their head-to-head 1-1
    points = aggregate_rankings(rankings).borda_points
    assert [labelers_prefer(rankings, points, i, j) for i, j in ((0, 2), (1, 3), (1, 2), (2, 1))] == \
        [True, True, False, False]
    three = [[1, 0, 2], [1, 0, 2], [0, 2, 1]]  # 0 and 1 tied on points, 2 of 3 put 1 above 0
    assert labelers_prefer(three, aggregate_rankings(three).borda_points, 1, 0)
    assert not labelers_prefer(three, aggregate_rankings(three).borda_points, 0, 1)


def test_single_labeler_is_its_own_consensus():
    result = aggregate_rankings([[1, 0, 2]])
    assert result.order == (1, 0, 2)
    assert result.kendall_w == 1.0 and result.mean_kendall_tau is None


@pytest.mark.parametrize(
    "rankings,message",
    [
        ([], "no rankings given"),
        ([[0]], "labeler 0: ranks 1 responses; aggregation needs at least 2"),
        ([[0, 1, 2, 3, 4], [0, 1, 2, 3]], "labeler 1: has 4 responses, expected 5"),
        ([[0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0]], "labeler 1: has 6 responses, expected 5"),
        ([[0, 1, 2], [0, 1, 2], [2, 2, 0]], "labeler 2: response 2 appears more than once"),
        ([[0, 1, 2], [0, 1, 3]], "labeler 1: response 2 is missing and index 3 is outside"),
        ([[0, 1, 2], ["a", 1, 2]], "labeler 1: entry 0 is 'a', not a response index"),
    ],
)
def test_aggregate_rankings_rejects_malformed_input(rankings, message):
    with pytest.raises(InvalidRankingError, match=message):
        aggregate_rankings(rankings)
