"""Runs: load a checkpoint, prune it, write the output atomically, evaluate. The CLI, the
Python API and recipes call these."""
