"""tidpo's ML library (never imports Dagster)."""
