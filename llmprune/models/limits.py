"""What a model's config allows its inputs to be: the longest sequence it has positions for."""

from __future__ import annotations

from ..core.errors import UserError

# the config keys families use for their number of positions, in the order they are looked up
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(config) -> int | None:
    """The number of positions of a model with ``config`` (a transformers config), or None when
    its config names none."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if type(value) is int and value > 0:
            return value
    return None


def check_seqlen(config, seqlen: int, flag: str) -> None:
    """UserError when windows of ``seqlen`` tokens (given as ``flag``) are longer than the
    model's positions: OPT's position table would be indexed out of range, rotary models would
    run silently beyond the lengths they were trained on."""
    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        raise UserError(f"{flag} {seqlen} is longer than the {limit} positions of this "
                        f"{getattr(config, 'model_type', '')} model; use {flag} {limit} or less")
