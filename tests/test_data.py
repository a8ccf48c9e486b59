import json

import pytest
import torch

from llmprune.io.data import find_wikitext2, load_text, windows, wikitext2_search_path
from llmprune.core.errors import DataError


def test_consecutive_windows_follow_the_protocol():
    ids = torch.arange(100)
    w = windows(ids, 3, 10)
    assert w.tolist()[1] == list(range(10, 20)) and w.shape == (3, 10)


def test_random_windows_are_seeded():
    ids = torch.arange(1000)
    a = windows(ids, 4, 16, "random", seed=1)
    assert torch.equal(a, windows(ids, 4, 16, "random", seed=1))
    assert not torch.equal(a, windows(ids, 4, 16, "random", seed=2))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()


def test_too_short_text():
    with pytest.raises(DataError, match="fewer than nsamples x seqlen = 3 x 40 = 120"):
        windows(torch.arange(100), 3, 40)


def test_jsonl_and_txt(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert load_text(str(p), "calib").text == "hello\n\nworld"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_text(str(bad), "calib")


def test_wikitext2_env_var(tmp_path, monkeypatch):
    (tmp_path / "valid.txt").write_text("valid text")
    (tmp_path / "test.txt").write_text("test text")
    monkeypatch.setenv("LLMPRUNE_WIKITEXT2_DIR", str(tmp_path))
    assert wikitext2_search_path()[0] == tmp_path
    assert find_wikitext2() == tmp_path
    assert load_text(None, "calib").text == "valid text"
    assert load_text("wikitext2", "eval").text == "test text"
