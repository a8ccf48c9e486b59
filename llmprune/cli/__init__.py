"""The ``llmprune`` command line: one module per command family."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
