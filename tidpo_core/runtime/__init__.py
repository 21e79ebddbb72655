"""The machinery around the method: data-dir layout, launch, sharded precompute, threads, tracking, fingerprints, errors."""
