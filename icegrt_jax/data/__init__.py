"""Data side of ICE-GRT: rankings -> reward-model pairs and labeler aggregation."""

from icegrt_jax.data.rankings import (
    ConsensusRanking,
    InvalidRankingError,
    aggregate_rankings,
    labelers_prefer,
    ranking_to_pairs,
)

__all__ = [
    "ConsensusRanking",
    "InvalidRankingError",
    "aggregate_rankings",
    "labelers_prefer",
    "ranking_to_pairs",
]
