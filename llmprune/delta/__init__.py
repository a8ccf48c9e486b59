"""Pruning the delta of a fine-tuned model against its base: DARE, DAREx and merging."""
