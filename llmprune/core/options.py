"""Options: dataclass fields that carry their command-line help.

A solver's or a method's config dataclass declares each user-settable field with :func:`option`;
the CLI makes one flag per option (``batch_size`` -> ``--batch-size``, the field's default, help,
parse function and choices), recipes and the Python API set the same fields by name. Fields
declared without :func:`option` have no flag of their own.
"""

from __future__ import annotations

from dataclasses import field, fields


def option(default, help: str, parse=None, choices=None):
    """A dataclass field with its CLI help, the function that parses its flag's text (argparse
    ``type``; default: the type of ``default``, ``str`` for a ``None`` default) and, optionally,
    the values it accepts. A ``bool`` option with default ``False`` is a switch."""
    metadata = {"help": help, "parse": parse or (str if default is None else default.__class__)}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return field(default=default, metadata=metadata)


def options_of(cls) -> list:
    """The option fields of dataclass ``cls`` (declared with :func:`option`), in field order."""
    return [f for f in fields(cls) if "help" in f.metadata]


__all__ = ["option", "options_of"]
