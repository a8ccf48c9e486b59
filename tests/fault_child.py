"""Run the ``llmprune`` command line in this process with a fault injected through the engine's
callbacks (product code reads no test variables). Used by the crash tests as a child process:

    python tests/fault_child.py kill-after-layer K[:mid] -- ARGS...
        SIGKILL right after streaming decoder layer K is recorded, or (":mid") halfway through
        writing its shard
    python tests/fault_child.py pause-after-shard SECONDS -- ARGS...
        print "wrote shard N" and sleep SECONDS after each shard an export writes
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time


def _kill_after_layer(spec: str):
    k, _, where = spec.partition(":")

    def on_layer(i: int, stage: str) -> None:
        if i == int(k) and stage == (where or "after"):
            os.kill(os.getpid(), signal.SIGKILL)
    return on_layer


def _pause_after_shard(seconds: str):
    def on_shard_written(n: int) -> None:
        print(f"wrote shard {n}", flush=True)
        time.sleep(float(seconds))
    return on_shard_written


def main(argv: list[str]) -> int:
    fault, value, sep, *args = argv
    assert sep == "--", "usage: fault_child.py FAULT VALUE -- ARGS..."
    from llmprune import cli
    from llmprune.io import checkpoints
    from llmprune.runs import streaming

    if fault == "kill-after-layer":
        streaming.prune_streaming = functools.partial(streaming.prune_streaming,
                                                      on_layer=_kill_after_layer(value))
    elif fault == "pause-after-shard":
        checkpoints.export_checkpoint = functools.partial(
            checkpoints.export_checkpoint, on_shard_written=_pause_after_shard(value))
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
