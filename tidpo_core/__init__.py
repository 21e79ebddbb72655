"""tidpo's ML library (never imports Dagster)."""

import os

# OpenMP reads its wait policy once, when torch loads it: set here, before any tidpo module imports torch.
# Long spins took the cores a second process needed, sleeping at once slowed a process alone
# (bench/bench_contention.py): a short spin, then sleep; see tidpo_core.threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
