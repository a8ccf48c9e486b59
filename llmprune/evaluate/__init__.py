"""Evaluation: perplexity on a text file and the lm-eval harness."""

from .ppl import eval_windows, evaluate_loaded, perplexity, record_eval

__all__ = ["eval_windows", "evaluate_loaded", "perplexity", "record_eval"]
