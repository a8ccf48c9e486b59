"""Fuzzing the files llmprune reads (issue 23): damaged safetensors headers and edited
``llmprune.json`` files end in a clean user error or load exactly what was saved, never in a
traceback or a silently different model."""

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmprune.core.errors import UserError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
        for k in a)


# a damage to a safetensors file: (offset into the header, new byte), a new header length, or
# the file cut at a fraction of its length
DAMAGE = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.just(0)),
    st.tuples(st.just("cut"), st.integers(0, 999), st.just(0)),
)


def _damage(data: bytes, damage) -> bytes:
    kind, a, b = damage
    n = int.from_bytes(data[:8], "little")
    if kind == "byte":
        at = 8 + a % n
        return data[:at] + bytes([b]) + data[at + 1:]
    if kind == "length":
        return a.to_bytes(8, "little") + data[8:]
    return data[: len(data) * a // 1000]


@pytest.fixture(scope="module")
def dense_reference(checkpoint_dir):
    from llmprune import load_pretrained

    return _state(load_pretrained(checkpoint_dir))


@FUZZ
@given(damage=DAMAGE)
def test_damaged_safetensors_header_is_a_clean_error_or_the_same_model(
        damage, checkpoint_dir, dense_reference, tmp_path_factory):
    from llmprune import load_pretrained
    from llmprune.io.safetensors import SafetensorsFiles

    d = tmp_path_factory.mktemp("fuzz") / "ckpt"
    shutil.copytree(checkpoint_dir, d)
    path = d / "model.safetensors"
    original = path.read_bytes()
    path.write_bytes(_damage(original, damage))
    try:
        files = SafetensorsFiles([path])
        for name, (_, info, _) in files.entries.items():  # the streaming reader
            t = files.read(name)
            assert list(t.shape) == info["shape"]
        model = load_pretrained(d)  # the transformers path
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert _same(_state(model), dense_reference)


@pytest.fixture(scope="module")
def compact_reference(tmp_path_factory, checkpoint_dir):
    from llmprune import load_pretrained
    from llmprune.cli import main

    out = tmp_path_factory.mktemp("fuzz-compact") / "c"
    assert main(["-q", "magnitude", "--model", str(checkpoint_dir), "--sparsity", "0.5",
                 "--export", "compact", "--output", str(out)]) == 0
    return out, _state(load_pretrained(out))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True)
    | st.sampled_from(["float32", "bfloat16", "float99", "plain", "bitmask", "nm", "uint8",
                       "llmprune-compact", "xxh3_128", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=2),
    max_leaves=4)


def _paths(obj, prefix=()):
    """Every key path of a JSON value (the tensors of a compact export's meta: a sample)."""
    yield prefix
    if isinstance(obj, dict):
        items = list(obj.items())
        if prefix == ("tensors",):
            items = items[:3] + items[-2:]
        for k, v in items:
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(data=st.data())
def test_edited_llmprune_json_is_a_clean_error_or_the_same_model(data, compact_reference,
                                                                 tmp_path_factory):
    from llmprune import load_pretrained

    src, reference = compact_reference
    meta = json.loads((src / "llmprune.json").read_text())
    path = data.draw(st.sampled_from([p for p in _paths(meta) if p]))
    edit = data.draw(st.sampled_from(["set", "delete"]))
    target = meta
    for key in path[:-1]:
        target = target[key]
    if edit == "delete":
        del target[path[-1]]
    else:
        target[path[-1]] = data.draw(JSON_VALUES)
    d = tmp_path_factory.mktemp("fuzz") / "c"
    shutil.copytree(src, d)
    (d / "llmprune.json").write_text(json.dumps(meta))
    try:
        model = load_pretrained(d)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert _same(_state(model), reference)
