"""Evaluation: perplexity, downstream tasks, baselines and reports."""
