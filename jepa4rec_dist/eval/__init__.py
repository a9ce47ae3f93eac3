"""Evaluation: full-ranking metrics over users and one harness for every model and baseline."""

from jepa4rec_dist.eval.metrics import full_ranking_metrics, metrics_from_ranks, ranks_from_scores

__all__ = ["full_ranking_metrics", "metrics_from_ranks", "ranks_from_scores"]
