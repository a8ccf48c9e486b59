"""llmprune.json: one writer (io.meta.write_meta) and one reader (io.meta.read_meta) that
refuses a damaged file with one clear line."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from llmprune.core.errors import CorruptCheckpointError
from llmprune.io.meta import COMPACT_FORMAT, FORMATS, META_FILE, read_meta, write_meta

PKG = Path(__file__).resolve().parents[1] / "llmprune"


def test_round_trip_and_absent(tmp_path):
    assert read_meta(tmp_path) is None  # a plain transformers checkpoint has none
    meta = {"format": "llmprune-dense", "format_version": 1, "layers": {"a": {"sparsity": 0.5}}}
    write_meta(tmp_path, meta)
    assert json.loads((tmp_path / META_FILE).read_text()) == meta
    assert read_meta(tmp_path) == meta
    assert [p.name for p in tmp_path.iterdir()] == [META_FILE]  # no temporary file left


@pytest.mark.parametrize("text,what", [
    ("{not json", "cannot read"),
    ("[1, 2]", "not a JSON object"),
    ('{"format": "something-else"}', "format 'something-else'"),
    ('{"tensors": {}}', "format None"),
    ('{"format": "llmprune-compact", "format_version": "2"}', "format_version '2'"),
    ('{"format": "llmprune-compact", "format_version": true}', "format_version True"),
    ('{"format": "llmprune-compact", "format_version": 0}', "format_version 0"),
])
def test_damaged_meta_is_refused(tmp_path, text, what):
    (tmp_path / META_FILE).write_text(text)
    with pytest.raises(CorruptCheckpointError, match="damaged|cannot read") as err:
        read_meta(tmp_path)
    assert what in str(err.value) and str(tmp_path / META_FILE) in str(err.value)
    assert "\n" not in str(err.value)


def test_writer_refuses_what_the_reader_would_refuse(tmp_path):
    with pytest.raises(CorruptCheckpointError):
        write_meta(tmp_path, {"format": "nope"})
    assert not (tmp_path / META_FILE).exists()
    with pytest.raises(CorruptCheckpointError, match="dtype"):  # a compact one without dtype
        write_meta(tmp_path, {"format": COMPACT_FORMAT, "shards": {}, "tensors": {}})
    # the least each format needs: a compact export also says how its tensors are stored
    least = {COMPACT_FORMAT: {"dtype": "float32", "shards": {}, "tensors": {}}}
    for fmt in FORMATS:
        write_meta(tmp_path, {"format": fmt, **least.get(fmt, {})})
        assert read_meta(tmp_path)["format"] == fmt


def test_cli_on_a_damaged_meta_is_one_line(tmp_path, capsys):
    from llmprune.cli import main

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / META_FILE).write_text("[]")
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a JSON object" in err
    assert "Traceback" not in err


def _meta_writers(source: str) -> list[int]:
    """Lines that name the file by its literal or write to a path built from META_FILE."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value == META_FILE:
            out.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("write_text", "write_bytes", "open")
              and "META_FILE" in ast.unparse(node.func.value)):
            out.append(node.lineno)
    return out


def test_meta_writer_check_finds_a_second_writer():
    assert _meta_writers('(out / "llmprune.json").write_text(text)') == [1]
    assert _meta_writers("(out / META_FILE).write_text(text)\nwrite_meta(out, meta)") == [1]


def test_only_io_meta_writes_llmprune_json():
    """Every other module goes through write_meta / read_meta and the META_FILE constant: none
    spells the file's name or writes a path made from it."""
    found = [f"{path.relative_to(PKG)}:{line}" for path in PKG.rglob("*.py")
             if path.relative_to(PKG).as_posix() != "io/meta.py"
             for line in _meta_writers(path.read_text())]
    assert found == []


def _compact(version: int, **tensor) -> dict:
    info = {"encoding": "bitmask", "shape": [4, 8, 16], "dtype": "float32", "shard": "s",
            **tensor}
    return {"format": COMPACT_FORMAT, "format_version": version, "dtype": "float32",
            "shards": {"s": {}}, "tensors": {"w": info}}


def test_stacked_experts_need_format_version_3(tmp_path):
    """A 3-D tensor stored encoded (fused experts, stacked) says which way its experts lie
    (``transposed``), and only from format version 3 on; N:M must divide an expert's inputs."""
    write_meta(tmp_path, _compact(3, transposed=False))
    write_meta(tmp_path, _compact(3, transposed=True, encoding="nm", n=2, m=4))
    for bad, what in ((_compact(2, transposed=False), "transposed False"),
                      (_compact(3), "shape [4, 8, 16]"),
                      (_compact(3, transposed="yes"), "transposed 'yes'"),
                      (_compact(3, transposed=True, shape=[4, 8]), "shape [4, 8]"),
                      (_compact(3, transposed=True, shape=[4, 6, 16], encoding="nm", n=2, m=4),
                       "N:M 2:4")):
        with pytest.raises(CorruptCheckpointError, match="damaged") as err:
            write_meta(tmp_path, bad)
        assert what in str(err.value)


def test_a_newer_compact_format_is_refused_before_its_fields(tmp_path):
    """A compact export newer than this llmprune reads: one line saying to upgrade, whatever its
    fields hold (a newer format may describe tensors differently)."""
    from llmprune.core.errors import UserError
    from llmprune.io.meta import FORMAT_VERSION

    meta = _compact(FORMAT_VERSION + 1, encoding="future", shape="any")
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"version {FORMAT_VERSION + 1}.*upgrade llmprune") as err:
        read_meta(tmp_path)
    assert not isinstance(err.value, CorruptCheckpointError) and "\n" not in str(err.value)
