"""Evaluation of the models a run trains: bits per byte on held-out text, greedy samples, lm-eval tasks."""
