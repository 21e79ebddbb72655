"""Evaluation: held-out metrics, the gate's inputs, lm-eval benchmarks, plots and the method comparison."""
