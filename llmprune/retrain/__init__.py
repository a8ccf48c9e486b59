"""Retraining after pruning: PERP (parameter-efficient retraining that keeps the masks)."""
