"""Exports end to end on tiny models: compact round trips, dense exports, plain from_pretrained
refusing compact output, --pattern on foreign checkpoints, corruption, a SIGKILL midway, inspect."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import llmprune
from llmprune.cli import main
from llmprune.io.meta import MASKS_FILE
from llmprune.core.errors import CorruptCheckpointError

from tests.conftest import same_bits, tiny_model

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _prune(src, text_file, out, pattern):
    args = ["-q", "wanda", "--model", str(src), "--calib-data", str(text_file), "--nsamples", "4",
            "--seqlen", "32", "--output", str(out)]
    args += ["--pattern", pattern] if ":" in pattern else ["--sparsity", pattern]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, checkpoint_dir, text_file):
    base = tmp_path_factory.mktemp("pruned")
    return {p: _prune(checkpoint_dir, text_file, base / p.replace(":", "of"), p)
            for p in ("0.5", "2:4")}


def _dense_state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_compact_round_trip_is_bit_exact(pruned, tmp_path, pattern, dtype):
    out = tmp_path / "compact"
    assert main(["-q", "export", str(pruned[pattern]), "--format", "compact", "--dtype", dtype,
                 "--output", str(out)]) == 0
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["format"] == "llmprune-compact" and meta["format_version"] == 2
    assert meta["tensor_checksum"] == "xxh3_128"
    assert meta["recipe"]["method"] == "wanda"
    want_enc = "nm" if pattern == "2:4" else "bitmask"
    linears = {k: v for k, v in meta["tensors"].items() if "layers" in k and "proj" in k}
    assert linears and all(v["encoding"] == want_enc for v in linears.values())

    dense = _dense_state(pruned[pattern])
    for name, info in linears.items():  # recorded per tensor: the fraction of its weights pruned
        assert info["sparsity"] == pytest.approx(float((dense[name] == 0).float().mean()),
                                                 abs=1e-3), name
        assert info["sparsity"] == pytest.approx(0.5, abs=0.02), name
    model = llmprune.load_pretrained(out, sparse="dense")  # decoded bit for bit
    loaded = model.state_dict()
    for name, t in dense.items():
        assert same_bits(loaded[name], t.to(DT[dtype])), name

    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 16))
    ref = AutoModelForCausalLM.from_pretrained(pruned[pattern], dtype=DT[dtype]).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_compact_is_smaller_and_sized_as_documented(pruned, tmp_path):
    out = tmp_path / "c"
    assert main(["-q", "export", str(pruned["2:4"]), "--dtype", "bf16", "--output",
                 str(out)]) == 0
    meta = json.loads((out / "llmprune.json").read_text())
    for name, info in meta["tensors"].items():
        if info["encoding"] == "nm":
            assert info["bytes"] == info["dense_bytes"] * 0.5625, name
    assert meta["totals"]["tensor_bytes"] < meta["totals"]["dense_tensor_bytes"]


def test_plain_from_pretrained_refuses_compact(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "c"
    assert main(["-q", "export", str(pruned["0.5"]), "--output", str(out)]) == 0
    with pytest.raises(Exception, match=r"llmprune\.load_pretrained"):
        AutoModelForCausalLM.from_pretrained(out)


def test_shards_and_dense_export(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "c"
    assert main(["-q", "export", str(pruned["2:4"]), "--max-shard-size", "40KB", "--output",
                 str(out)]) == 0
    shards = sorted(out.glob("llmprune-*-of-*.safetensors"))
    assert len(shards) > 3
    for s in shards:  # tensor data within the limit, unless one tensor alone is bigger
        with safe_open(str(s), "pt") as f:
            held = json.loads(f.metadata()["llmprune_tensors"])
            data = sum(f.get_tensor(k).nbytes for k in f.keys())
        assert data <= 40_000 or len(held) == 1
    dense = _dense_state(pruned["2:4"])
    loaded = llmprune.load_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in dense.items())

    # compact -> dense again: a plain checkpoint, sharded, that from_pretrained loads
    back = tmp_path / "d"
    assert main(["-q", "export", str(out), "--format", "dense", "--max-shard-size", "100KB",
                 "--output", str(back)]) == 0
    assert (back / "model.safetensors.index.json").exists() and (back / MASKS_FILE).exists()
    again = AutoModelForCausalLM.from_pretrained(back).state_dict()
    assert all(torch.equal(again[k], v) for k, v in dense.items())
    # ... and its masks survive, so it compacts to the same bytes
    out2 = tmp_path / "c2"
    assert main(["-q", "export", str(back), "--output", str(out2)]) == 0
    m1 = json.loads((out / "llmprune.json").read_text())["tensors"]
    m2 = json.loads((out2 / "llmprune.json").read_text())["tensors"]
    assert {k: v["encoding"] for k, v in m1.items()} == {k: v["encoding"] for k, v in m2.items()}


def test_export_flag_on_a_solver_command(checkpoint_dir, text_file, tmp_path):
    out = tmp_path / "direct"
    assert main(["-q", "sparsegpt", "--model", str(checkpoint_dir), "--pattern", "2:4",
                 "--calib-data", str(text_file), "--nsamples", "4", "--seqlen", "32",
                 "--export", "compact", "--export-dtype", "bf16", "--output", str(out)]) == 0
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["format"] == "llmprune-compact" and meta["dtype"] == "bfloat16"
    assert meta["source_meta"]["recipe"]["method"] == "sparsegpt"
    model = llmprune.load_pretrained(out, sparse="dense")  # decoded bit for bit
    w = model.model.layers[0].mlp.down_proj.weight
    assert int((w.view(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert (out / "tokenizer.json").exists()


def test_eval_reads_compact(pruned, tmp_path, text_file, capsys):
    out = tmp_path / "c"
    assert main(["-q", "export", str(pruned["0.5"]), "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["-q", "eval", "--model", str(out), "--ppl", str(text_file), "--seqlen", "32",
                 "--max-windows", "2"]) == 0
    ppl_c = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["-q", "eval", "--model", str(pruned["0.5"]), "--ppl", str(text_file),
                 "--seqlen", "32", "--max-windows", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == ppl_c


# ----------------------------------------------------------------------------- no metadata
def _foreign_checkpoint(path: Path, tokenizer, nm_ok: bool) -> Path:
    """A plain checkpoint whose decoder linears were made 2:4 by someone else."""
    model = tiny_model("llama", seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.mlp.up_proj, layer.mlp.down_proj,
                        layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                        layer.mlp.gate_proj):
                g = lin.weight.view(lin.weight.shape[0], -1, 4)
                g[..., :2] = 0
        if not nm_ok:
            model.model.layers[1].mlp.up_proj.weight[5, 8:11] = 1.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_pattern_for_a_checkpoint_without_metadata(tmp_path, tokenizer, capsys):
    src = _foreign_checkpoint(tmp_path / "foreign", tokenizer, nm_ok=True)
    out = tmp_path / "c"
    assert main(["-q", "export", str(src), "--output", str(out)]) == 2  # masks needed
    assert "--pattern" in capsys.readouterr().err and not out.exists()
    assert main(["-q", "export", str(src), "--pattern", "2:4", "--output", str(out)]) == 0
    loaded = llmprune.load_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in load_file(src / "model.safetensors").items())

    bad = _foreign_checkpoint(tmp_path / "bad", tokenizer, nm_ok=False)
    capsys.readouterr()
    assert main(["-q", "export", str(bad), "--pattern", "2:4", "--output",
                 str(tmp_path / "c2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.layers.1.mlp.up_proj.weight is not 2:4" in err
    assert not (tmp_path / "c2").exists()


def test_weights_changed_after_pruning_are_refused(pruned, tmp_path, capsys):
    import shutil

    src = tmp_path / "edited"
    shutil.copytree(pruned["0.5"], src)
    sd = load_file(src / "model.safetensors")
    w = sd["model.layers.0.mlp.up_proj.weight"]
    w[w == 0] = 0.5  # fill the pruned positions back in
    save_file(sd, str(src / "model.safetensors"), {"format": "pt"})
    assert main(["-q", "export", str(src), "--output", str(tmp_path / "c")]) == 2
    assert "nonzero weights where the pruning mask says pruned" in capsys.readouterr().err


# ----------------------------------------------------------------------------- damage
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_gives_one_clear_line(pruned, tmp_path, capsys, damage):
    out = tmp_path / "c"
    assert main(["-q", "export", str(pruned["2:4"]), "--max-shard-size", "100KB", "--output",
                 str(out)]) == 0
    shard = sorted(out.glob("llmprune-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        llmprune.load_pretrained(out)
    capsys.readouterr()
    assert main(["-q", "inspect", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and shard.name in err and "Traceback" not in err


@pytest.mark.parametrize("damage", [None, "flip"])
def test_version_1_exports_with_sha256_still_load(pruned, tmp_path, monkeypatch, damage):
    """Format version 1 stored a sha256 per tensor and no ``tensor_checksum`` field; such an
    export (written here with sha256 and the field removed) loads bit for bit, and a flipped
    bit in its data is still caught, by sha256."""
    import hashlib

    import llmprune.io.checksums as checksums

    monkeypatch.setattr(checksums, "TENSOR_CHECKSUM", "sha256")
    out = tmp_path / "v1"
    assert main(["-q", "export", str(pruned["2:4"]), "--dtype", "bf16", "--output", str(out)]) == 0
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta.pop("tensor_checksum") == "sha256"
    meta["format_version"] = 1
    (out / "llmprune.json").write_text(json.dumps(meta))
    name = "model.layers.0.mlp.down_proj.weight"
    shard = out / meta["tensors"][name]["shard"]
    with safe_open(str(shard), "pt") as f:  # the stored sha256 is that of the stored bytes
        values = f.get_tensor(name + ".values")
    assert meta["tensors"][name]["sha256"]["values"] == \
        hashlib.sha256(values.view(torch.int16).numpy().tobytes()).hexdigest()
    monkeypatch.setattr(checksums, "TENSOR_CHECKSUM", "xxh3_128")
    if damage:
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0x01  # in the data, past the header
        shard.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError, match="sha256 checksum"):
            llmprune.load_pretrained(out)
        return
    loaded = llmprune.load_pretrained(out, sparse="dense").state_dict()
    for key, t in _dense_state(pruned["2:4"]).items():
        assert same_bits(loaded[key], t.to(torch.bfloat16)), key


def test_sigkill_midway_leaves_nothing_that_looks_complete(pruned, tmp_path):
    out = tmp_path / "killed"
    child = Path(__file__).resolve().parent / "fault_child.py"
    cmd = [sys.executable, str(child), "pause-after-shard", "60", "--", "-q", "export",
           str(pruned["0.5"]), "--max-shard-size", "30KB", "--output", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the first shard is on disk; the export is midway
        assert "wrote shard 1" in line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    leftovers = list(tmp_path.glob(".killed.tmp-*"))
    assert leftovers and not (leftovers[0] / "llmprune.json").exists()
    with pytest.raises(llmprune.UserError):
        llmprune.load_pretrained(leftovers[0])
    # the next run completes and sweeps the dead run's temporary directory away
    t = time.monotonic()
    assert main(["-q", "export", str(pruned["0.5"]), "--output", str(out)]) == 0
    assert (out / "llmprune.json").exists() and not list(tmp_path.glob(".killed.tmp-*"))
    assert time.monotonic() - t < 60


# ----------------------------------------------------------------------------- inspect
def test_inspect_tables_and_nm_check(pruned, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["-q", "export", str(pruned["2:4"]), "--dtype", "bf16", "--output",
                 str(out)]) == 0
    capsys.readouterr()
    assert main(["-q", "inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj.weight" in table and "N:M check: ok" in table
    assert main(["-q", "inspect", str(pruned["2:4"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["pruned_tensors"] == 14 and report["totals"]["nm_violations"] == 0
    assert abs(report["totals"]["pruned_sparsity"] - 0.5) < 1e-6

    # a dense checkpoint whose metadata says 2:4 but one group keeps three weights
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pruned["2:4"], bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.self_attn.o_proj.weight"][3, :4] = 1.0
    save_file(sd, str(bad / "model.safetensors"), {"format": "pt"})
    capsys.readouterr()
    assert main(["-q", "inspect", str(bad)]) == 1
    assert "NOT 2:4" in capsys.readouterr().out


def test_load_pretrained_with_kernels(pruned, tmp_path):
    from llmprune.sparse.linear import SparseLinear

    out = tmp_path / "c"
    assert main(["-q", "export", str(pruned["2:4"]), "--output", str(out)]) == 0
    plain = llmprune.load_pretrained(out)
    fast = llmprune.load_pretrained(out, kernels="auto")
    assert any(isinstance(m, SparseLinear) for m in fast.modules())
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, fast(ids).logits)  # auto on CPU runs dense
    with pytest.raises(llmprune.UserError, match="kernels must be"):
        llmprune.load_pretrained(out, kernels="fast")


@pytest.mark.parametrize("expected", [None, 1, 500])
def test_shard_writer_files_are_plain_safetensors(tmp_path, monkeypatch, expected):
    """The writer reserves room for each shard's header before the data; a header that outgrows
    it (expected=1 with 120 long names) makes it rewrite the shard. Either way safetensors reads
    every tensor back, and the checksums are those of the tensors' bytes."""
    import xxhash
    import shutil

    from llmprune.io import compact
    from llmprune.io.shards import ShardWriter

    copies = []
    real_copy = shutil.copyfileobj
    monkeypatch.setattr(shutil, "copyfileobj", lambda *a: (copies.append(1), real_copy(*a)))
    gen = torch.Generator().manual_seed(0)
    made = {}
    writer = ShardWriter(tmp_path, "t", 10_000, {"format": "pt", "llmprune_format": "x"},
                          expected)
    for i in range(120):
        dtype = [torch.float32, torch.bfloat16, torch.uint8, torch.int32][i % 4]
        t = (torch.randn(i % 7 + 1, 13, generator=gen) * 50).to(dtype)
        name = f"model.layers.{i}.a_rather_long_module_name_to_grow_the_header.weight"
        made[name] = t
        writer.add(name, compact.Encoded("plain", {"": t}, tuple(t.shape)), {"i": i})
    names = writer.finish(None)
    assert len(names) > 1  # 10 kB shards
    assert bool(copies) == (expected == 1)  # the too-small hint forced one rewrite
    seen = {}
    for shard in names:
        path = tmp_path / shard
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        assert (8 + n) % 8 == 0  # data 8-byte aligned
        header = json.loads(raw[8: 8 + n])
        assert json.loads(header["__metadata__"]["llmprune_tensors"])  # per-tensor info
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                seen[key] = f.get_tensor(key)
    assert seen.keys() == made.keys()
    for name, t in made.items():
        assert torch.equal(seen[name], t) and seen[name].dtype == t.dtype
        want = xxhash.xxh3_128(t.numpy().tobytes() if t.dtype != torch.bfloat16
                               else t.view(torch.int16).numpy().tobytes()).hexdigest()
        assert writer.hashes[name] == want
