"""tidpo's ML library (never imports Dagster)."""

import os

# OpenMP reads its wait policy once, when torch loads it: set here, before any tidpo module imports torch.
# Spinning threads took the cores a second process needed (bench/bench_contention.py); see tidpo_core.threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
