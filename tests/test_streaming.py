"""The streaming engine (llmprune/streaming.py): the same bits as the in-memory engine, crash
resume after SIGKILL, refusals, and the memory plan against a hand count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmprune import cli
from llmprune.runs.prune import prune_checkpoint
from llmprune.core.errors import UserError
from llmprune.recipe import PruneRecipe
from llmprune.runs.streaming import prune_streaming

from tests.conftest import same_bits, tiny_config, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _save(path: Path, family: str, layers: int, tie: bool = False) -> Path:
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    config.num_hidden_layers = layers
    config.tie_word_embeddings = tie
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {"llama": _save(root / "llama", "llama", 3),
            "opt": _save(root / "opt", "opt", 3),
            "llama-tied": _save(root / "llama-tied", "llama", 2, tie=True),
            "llama4": _save(root / "llama4", "llama", 4)}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def _recipe(method, text_file, **kw):
    return PruneRecipe(method, sparsity=0.5, nsamples=6, seqlen=32, batch_size=4,
                       calib_data=str(text_file), **kw)


@pytest.mark.parametrize("family,method,offload", [
    ("llama", "wanda", "ram"), ("llama", "sparsegpt", "disk"), ("opt", "sparsegpt", "ram"),
    ("opt", "wanda", "disk"), ("llama-tied", "sparsegpt", "ram"), ("llama", "magnitude", "ram"),
])
def test_stream_is_bit_identical_to_in_memory(ckpts, text_file, tmp_path, family, method,
                                              offload):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(method, text_file)
    mem = prune_checkpoint(str(ckpts[family]), recipe, str(tmp_path / "mem"), progress=False)
    meta = prune_streaming(str(ckpts[family]), recipe, str(tmp_path / "str"), progress=False,
                           activations_offload=offload)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert sorted(a) == sorted(b)
    assert all(same_bits(a[k], b[k]) for k in a), [k for k in a if not same_bits(a[k], b[k])]
    ma = load_file(tmp_path / "mem" / "llmprune_masks.safetensors")
    mb = load_file(tmp_path / "str" / "llmprune_masks.safetensors")
    assert sorted(ma) == sorted(mb) and all(same_bits(ma[k], mb[k]) for k in ma)
    assert meta["layers"] == mem["layers"] and meta["sparsity"] == mem["sparsity"]
    # every pruned linear holds exactly half zeros (Wanda/magnitude per row, SparseGPT per
    # block of columns, both exact at 50% of these even widths)
    for name, info in meta["layers"].items():
        assert info["sparsity"] == 0.5
        assert (b[name + ".weight"] == 0).sum().item() == b[name + ".weight"].numel() // 2
    # a plain transformers load sees the streamed weights; nothing is left behind
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "str")
    for k, v in model.state_dict().items():
        if k in b:
            assert same_bits(v, b[k]), k
    assert not (tmp_path / "str.partial").exists()
    on_disk = json.loads((tmp_path / "str" / "llmprune.json").read_text())
    assert on_disk["recipe"] == recipe.to_dict()


def test_stream_compact_export_matches_in_memory(ckpts, text_file, tmp_path):
    from llmprune.loaders import load_pretrained

    recipe = _recipe("wanda", text_file, pattern="2:4")
    prune_checkpoint(str(ckpts["llama"]), recipe, str(tmp_path / "mem"), progress=False,
                     export="compact")
    prune_streaming(str(ckpts["llama"]), recipe, str(tmp_path / "str"), progress=False,
                    export="compact")
    a = load_pretrained(tmp_path / "mem").state_dict()
    b = load_pretrained(tmp_path / "str").state_dict()
    assert sorted(a) == sorted(b) and all(same_bits(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "str" / "llmprune.json").read_text())["format"] == \
        "llmprune-compact"


def _cli_args(ckpt, text_file, out, *extra):
    return ["-q", "sparsegpt", "--model", str(ckpt), "--sparsity", "0.5", "--nsamples", "6",
            "--seqlen", "32", "--batch-size", "4", "--calib-data", str(text_file),
            "--output", str(out), *extra]


@pytest.fixture(scope="module")
def reference(ckpts, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    assert cli.main(_cli_args(ckpts["llama4"], text_file, out, "--stream")) == 0
    return out


@pytest.mark.parametrize("kill,offload,resumed_after", [
    ("0", "ram", 0), ("1:mid", "disk", 0), ("3", "ram", 3)])
def test_sigkill_then_resume_is_bit_exact(ckpts, text_file, tmp_path, reference, kill, offload,
                                          resumed_after):
    out = tmp_path / "out"
    args = _cli_args(ckpts["llama4"], text_file, out, "--stream", "--activations-offload",
                     offload)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fault_child.py"),
                           "kill-after-layer", kill, "--", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed by SIGKILL, not an error
    work = tmp_path / "out.partial"
    assert not out.exists() and work.is_dir()
    # the work directory never looks like a finished checkpoint
    assert not (work / "config.json").exists() and not (work / "llmprune.json").exists()
    progress = json.loads((work / "progress.json").read_text())
    k = int(kill.split(":")[0])
    assert progress["completed"] == (k - 1 if kill.endswith(":mid") else k)
    # the killed run's lock stays behind, stale (its pid is dead): the next run takes it over
    from llmprune.io.lock import lock_path, pid_alive

    assert not pid_alive(json.loads(lock_path(out).read_text())["pid"])

    assert cli.main(args) == 2  # an interrupted run is not silently thrown away
    assert work.is_dir()
    assert cli.main([*args, "--resume"]) == 0
    assert not lock_path(out).exists()
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["streaming"]["resumed_after_layer"] == resumed_after
    a, b = _tensors(reference), _tensors(out)
    assert sorted(a) == sorted(b) and len(a) == 4 * 9 + 3
    assert all(same_bits(a[k], b[k]) for k in a), [k for k in a if not same_bits(a[k], b[k])]
    ma = load_file(reference / "llmprune_masks.safetensors")
    mb = load_file(out / "llmprune_masks.safetensors")
    assert sorted(ma) == sorted(mb) and all(same_bits(ma[k], mb[k]) for k in ma)
    assert not work.exists()


def _one_line_error(capsys, args, *needles):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_refusals(ckpts, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    base = _cli_args(ckpts["llama"], text_file, out)
    _one_line_error(capsys, [*base, "--max-memory", "10MB"], "--max-memory 10MB is too small",
                    "largest layer", "solver statistics")
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    _one_line_error(capsys, [*base, "--max-memory", "lots"], "--max-memory must look like")
    _one_line_error(capsys, [*base, "--stream", "--eval-ppl", str(text_file)], "--eval-ppl")
    _one_line_error(capsys, [*base, "--stream", "--allocation", "owl"], "owl")
    # an interrupted run's record (here: a run of the first layer only, which leaves it just as
    # a killed one does; the kill itself is tested above): refuse to clobber it, refuse to
    # resume another recipe or model
    prune_streaming(str(ckpts["llama"]), _recipe("sparsegpt", text_file), str(out),
                    progress=False, max_layers=1)
    assert json.loads((tmp_path / "out.partial" / "progress.json").read_text())["completed"] == 0
    _one_line_error(capsys, [*base, "--stream"], "--resume", "--overwrite")
    changed = [*base[:base.index("0.5")], "0.6", *base[base.index("0.5") + 1:]]
    _one_line_error(capsys, [*changed, "--resume"], "sparsity: 0.5 -> 0.6")
    other = _cli_args(ckpts["opt"], text_file, out)
    _one_line_error(capsys, [*other, "--resume"], "model")
    assert (tmp_path / "out.partial" / "progress.json").exists()  # untouched by the refusals
    assert cli.main([*base, "--stream", "--overwrite"]) == 0  # starts again from scratch
    assert (out / "llmprune.json").exists() and not (tmp_path / "out.partial").exists()


def test_memory_plan_hand_count(ckpts):
    """Tiny Llama: hidden 64, intermediate 128, 4 heads / 2 KV heads (head_dim 16), float32."""
    from transformers import AutoConfig

    from llmprune.io.safetensors import SafetensorsFiles, checkpoint_files
    from llmprune.models import adapter_for
    from llmprune.solvers import get_solver
    from llmprune.engine.streaming import meta_skeleton, memory_plan

    src = ckpts["llama"]
    skel = meta_skeleton(AutoConfig.from_pretrained(src), torch.float32, False)
    files = SafetensorsFiles(checkpoint_files(src))
    recipe = PruneRecipe("sparsegpt", sparsity=0.5, nsamples=8, seqlen=32, batch_size=4,
                         true_sequential=False)
    plan = memory_plan(files, skel, adapter_for(skel), recipe, get_solver("sparsegpt"), None,
                       "ram")
    # q 64x64 + k, v 32x64 + o 64x64 + gate, up 128x64 + down 64x128 + 2 norms of 64
    layer_params = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64
    assert plan.layer == layer_params * 4
    # The factorisation runs inside the Hessian, with [in, 2 x min(128, in)] panels. Besides
    # it, a solve holds one float32 copy of the group's weights, their mask and the mask's
    # inverted copy (bool), and the sweep's [rows, min(blocksize, in)] blocks (8 float32 ones).
    # down_proj (64x128): Hessian 128x128, the only statistic alive then;
    # gate+up (256x64): their 64x64 Hessian and down_proj's, both collected in the same pass.
    down = 64 * 128 * 4 + 2 * 64 * 128 + 2 * 128 * 128 * 4 + 8 * 64 * 128 * 4
    gate_up = 256 * 64 * 4 + 2 * 256 * 64 + 2 * 64 * 64 * 4 + 8 * 256 * 64 * 4
    assert 128 * 128 * 4 + down < (64 * 64 + 128 * 128) * 4 + gate_up
    assert plan.peak_group == "mlp.gate_proj,mlp.up_proj"
    assert plan.stats == (64 * 64 + 128 * 128) * 4
    assert plan.work == gate_up
    batch = 4 * 32 * 64 * 4
    assert plan.activations == 8 * 32 * 64 * 4 + batch
    assert plan.outside == (2 * 300 * 64 + 64) * 4  # embed, untied lm_head, final norm
    disk = memory_plan(files, skel, adapter_for(skel), recipe, get_solver("sparsegpt"), None,
                       "disk")
    assert disk.activations == 2 * batch
    wanda = memory_plan(files, skel, adapter_for(skel), recipe, get_solver("wanda"), None, "ram")
    # Wanda's peak: one member of gate/up at a time (128x64, the largest linear; down_proj's is
    # as large but fewer statistics are alive then), pruned in place: 6 float32 chunks of rows
    # (here the whole matrix) and the packed keep bits; the column norms of gate/up (64) and
    # down (128) are still alive
    assert wanda.peak_group == "mlp.gate_proj,mlp.up_proj"
    assert wanda.stats == (64 + 128) * 4
    assert wanda.work == 6 * 128 * 64 * 4 + 128 * 64 // 8
    # true-sequential: each group's statistics are collected just before its solve, so only
    # the solved group's column norms are alive: down_proj's (128) then, with the same work
    ts = memory_plan(files, skel, adapter_for(skel), replace(recipe, true_sequential=True),
                     get_solver("wanda"), None, "ram")
    assert ts.peak_group == "mlp.down_proj" and ts.stats == 128 * 4
    assert ts.work == wanda.work


def test_memory_plan_bounds_groups_not_yet_watched(tmp_path):
    """A discovered family (smollm3, laid out as the tiny Llama above): before any weight runs
    its input groups are unknown, and the plan bounds them: statistics of every linear alive
    (non-true-sequential), and the work of all linears reading 64-wide inputs as one group
    (q, k, v, o, gate, up: 448 rows). Once layer 0's groups are watched, the plan is the Llama
    hand count (gate+up the peak)."""
    from transformers import AutoConfig

    from llmprune.engine.streaming import meta_skeleton, memory_plan
    from llmprune.io.safetensors import SafetensorsFiles, checkpoint_files
    from llmprune.models import adapter_for
    from llmprune.solvers import get_solver

    from .tiny_families import tiny_family_model

    model = tiny_family_model("smollm3")
    model.save_pretrained(tmp_path)
    skel = meta_skeleton(AutoConfig.from_pretrained(tmp_path), torch.float32, False)
    files = SafetensorsFiles(checkpoint_files(tmp_path))
    recipe = PruneRecipe("sparsegpt", sparsity=0.5, nsamples=8, seqlen=32, batch_size=4,
                         true_sequential=False)
    adapter = adapter_for(skel)
    bound = memory_plan(files, skel, adapter, recipe, get_solver("sparsegpt"), None, "ram")
    # SparseGPT's work, as in test_memory_plan_hand_count: float32 weights, two bool masks,
    # the factorisation's two [in, in] panels, 8 float32 [rows, min(128, in)] blocks
    width64 = 448 * 64 * 4 + 2 * 448 * 64 + 2 * 64 * 64 * 4 + 8 * 448 * 64 * 4
    assert bound.stats == (6 * 64 * 64 + 128 * 128) * 4
    assert bound.work == width64
    assert bound.peak_group == ("self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,"
                                "self_attn.o_proj,mlp.gate_proj,mlp.up_proj")
    layer0 = adapter.layers(model)[0]
    ids = torch.randint(0, 300, (1, 8))
    adapter.groups_of(layer0, lambda: model(input_ids=ids))  # watched as a calibration run does
    exact = memory_plan(files, skel, adapter, recipe, get_solver("sparsegpt"), None, "ram")
    gate_up = 256 * 64 * 4 + 2 * 256 * 64 + 2 * 64 * 64 * 4 + 8 * 256 * 64 * 4
    assert exact.peak_group == "mlp.gate_proj,mlp.up_proj"
    assert (exact.stats, exact.work) == ((64 * 64 + 128 * 128) * 4, gate_up)
    assert bound.stats + bound.work >= exact.stats + exact.work


def test_stream_needs_a_local_safetensors_checkpoint(text_file, tmp_path):
    with pytest.raises(UserError, match="not found"):
        prune_streaming(str(tmp_path / "nope"), _recipe("wanda", text_file),
                        str(tmp_path / "out"), progress=False)


def test_leftover_of_a_finished_run_is_cleared(ckpts, text_file, tmp_path):
    """Killed between the final rename and removing OUTPUT.partial: the output is complete, so the
    leftover (recognised by the run id in both) is removed, and the output is kept."""
    out = tmp_path / "out"
    recipe = PruneRecipe("magnitude", sparsity=0.5)
    meta = prune_streaming(str(ckpts["llama"]), recipe, str(out), progress=False)
    work = tmp_path / "out.partial"
    work.mkdir()
    (work / "progress.json").write_text(json.dumps({"run_id": meta["streaming"]["run_id"]}))
    before = _tensors(out)
    with pytest.raises(UserError, match="already exists"):
        prune_streaming(str(ckpts["llama"]), recipe, str(out), progress=False, resume=True)
    assert not work.exists()
    assert all(same_bits(before[k], v) for k, v in _tensors(out).items())
    # another run's record is not taken for finished: it is refused, not removed
    work.mkdir()
    (work / "progress.json").write_text(json.dumps({"run_id": "another"}))
    with pytest.raises(UserError, match="--overwrite"):
        prune_streaming(str(ckpts["llama"]), recipe, str(out), progress=False, resume=True)
    assert work.exists()


def test_out_of_memory_is_one_line_and_resumable(ckpts, text_file, tmp_path, monkeypatch):
    import llmprune.runs.streaming as streaming

    recipe = _recipe("wanda", text_file)
    ref = tmp_path / "ref"
    prune_streaming(str(ckpts["llama"]), recipe, str(ref), progress=False)
    real = streaming.prune_layer

    def failing(layer, i, *args, **kwargs):
        if i == 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                               "allocate memory: you tried to allocate 201326592 bytes.")
        return real(layer, i, *args, **kwargs)
    monkeypatch.setattr(streaming, "prune_layer", failing)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"out of memory while pruning layer 1 .*--resume"):
        prune_streaming(str(ckpts["llama"]), recipe, str(out), progress=False)
    monkeypatch.setattr(streaming, "prune_layer", real)
    meta = prune_streaming(str(ckpts["llama"]), recipe, str(out), progress=False, resume=True)
    assert meta["streaming"]["resumed_after_layer"] == 0
    a, b = _tensors(ref), _tensors(out)
    assert sorted(a) == sorted(b) and all(same_bits(a[k], b[k]) for k in a)


def test_mapped_and_copied_tensors_equal_the_stored_ones(ckpts, tmp_path):
    """The capture maps the tensors outside the layers (SafetensorsFiles.map) and the final
    checkpoint copies them byte for byte (copy_bytes through a bounded buffer): both give exactly
    what safetensors itself loads, for every tensor of the checkpoint, also with a buffer smaller
    than a tensor; a truncated file is a clear error."""
    import io

    from llmprune.core.errors import CorruptCheckpointError
    from llmprune.io.safetensors import SafetensorsFiles, checkpoint_files

    src = ckpts["llama"]
    files = SafetensorsFiles(checkpoint_files(src))
    want = {}
    for path in checkpoint_files(src):
        want.update(load_file(path))
    small = SafetensorsFiles(checkpoint_files(src))
    small.COPY_CHUNK = 1000  # several reads per tensor
    for name, tensor in want.items():
        assert same_bits(files.map(name), tensor), name
        out = io.BytesIO()
        assert small.copy_bytes(name, out) == tensor.numel() * tensor.element_size()
        assert out.getvalue() == tensor.contiguous().view(torch.uint8).numpy().tobytes(), name
    broken = tmp_path / "model.safetensors"
    data = Path(checkpoint_files(src)[0]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    # refused when the headers are read, before any tensor is (issue 23)
    with pytest.raises(CorruptCheckpointError, match="cannot read .*truncated"):
        SafetensorsFiles([broken])
