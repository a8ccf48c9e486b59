"""The ``llmprune`` command line.

    llmprune sparsegpt --model smollm2-135m --sparsity 0.5 --output out/sg50
    llmprune wanda --model opt-6.7b --pattern 2:4 --device cuda --output out/opt-wanda-24
    llmprune magnitude --model ./my-checkpoint --sparsity 0.5 --output out/mag50
    llmprune eval --model out/sg50 --ppl wikitext2
    llmprune export out/sg50 --format compact --dtype bf16 --output out/sg50-compact
    llmprune inspect out/sg50-compact
    llmprune bench-decode out/sg50-compact

Mistakes in the input end in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ..core.errors import UserError, redact
from ..solvers import SOLVERS
from . import delta, files, prune, retrain, structured
from .common import Parser, add_command

# the commands after the solvers', in the order of `llmprune --help`
COMMANDS = ("structured", "bonsai", "loraprune", "eval", "bench-decode", "export", "inspect",
            "push", "run", "sweep", "dare", "merge", "perp")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmprune",
                    description="Post-training pruning of large language models.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="{" + ",".join([*SOLVERS, *COMMANDS]) + "}")
    for cls in SOLVERS.values():
        prune.add_solver(sub, cls)
    for family in (structured, files, prune, retrain, delta):
        for command in family.COMMANDS:
            add_command(sub, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed in one line
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    # SIGTERM (kill, a job scheduler, torchrun stopping its workers) unwinds like Ctrl-C: the
    # output's lock is released and temporary directories go; a streaming run keeps its work
    # directory for --resume
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except UserError as exc:
        # one line, whatever a wrapped library message holds
        print(f"llmprune: error: {redact(' '.join(str(exc).split()))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("llmprune: interrupted; no output was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("llmprune: error: out of memory; lower --nsamples/--batch-size or use a bigger "
              "machine", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
