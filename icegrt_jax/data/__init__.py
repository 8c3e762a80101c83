"""Data side of ICE-GRT: rankings -> reward-model pairs and labeler aggregation."""

from icegrt_jax.data.rankings import (
    ConsensusRanking,
    InvalidRankingError,
    aggregate_rankings,
    ranking_to_pairs,
)

__all__ = [
    "ConsensusRanking",
    "InvalidRankingError",
    "aggregate_rankings",
    "ranking_to_pairs",
]
