"""Evaluation: word error rate and, later, the benchmark harnesses and report writers."""
