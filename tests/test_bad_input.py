"""Bad input, faults and concurrent runs (issue 23): every user error is exit code 2 and one line
on stderr, with no traceback and nothing left at the output path; remote code runs only when the
caller asks; one run per output."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from llmprune.cli import main
from llmprune.io.lock import lock_path, output_lock


def one_line_error(argv, capsys) -> str:
    """Run the CLI in-process; assert exit 2 and one stderr line without a traceback; return it."""
    rc = main(["-q", *map(str, argv)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def leftovers(out) -> list[str]:
    """What a run left at (or beside) output path ``out``."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)
                  or p.name.startswith(f".{out.name}"))


# ----------------------------------------------------------------------------- remote code
RECIPE = "model: {ckpt}\nstages:\n  - magnitude: {{sparsity: 0.5}}\n"


@pytest.mark.parametrize("extra,sets", [
    ("trust_remote_code: true\n", []),
    ("", ["--set", "trust_remote_code=true"]),
])
def test_a_recipe_cannot_enable_remote_code(extra, sets, tmp_path, checkpoint_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(ckpt=checkpoint_dir) + extra)
    out = tmp_path / "out"
    line = one_line_error(["run", recipe, *sets, "--output", out], capsys)
    assert "trust_remote_code" in line and "--trust-remote-code" in line
    assert leftovers(out) == []


def test_run_passes_the_command_line_trust_flag_on(tmp_path, checkpoint_dir, monkeypatch):
    import llmprune.runs.prune as runs_prune

    seen = {}

    def fake(model, recipe, output, **kwargs):
        seen.update(kwargs)
        return {"layers": {}, "sparsity": 0.5}

    monkeypatch.setattr(runs_prune, "prune_checkpoint", fake)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(ckpt=checkpoint_dir))
    for flags, want in (([], False), (["--trust-remote-code"], True)):
        assert main(["-q", "run", str(recipe), *flags, "--output", str(tmp_path / "o")]) == 0
        assert seen["trust_remote_code"] is want


# ----------------------------------------------------------------------------- locks
def _prune_args(ckpt, out, *extra):
    return ["magnitude", "--model", ckpt, "--sparsity", "0.5", "--output", out, *extra]


HOLDER = ("import sys; from llmprune.io.lock import output_lock\n"
          "with output_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()\n")


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_a_second_run_on_a_locked_output_refuses_at_once(stream, tmp_path, checkpoint_dir,
                                                         capsys):
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    # the first run, still working, in another process
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        partial.mkdir()  # its streaming work directory
        (partial / "progress.json").write_text("{}")
        line = one_line_error(_prune_args(checkpoint_dir, out, *stream), capsys)
        assert "in use by" in line and f"run {first.pid} on" in line
        assert (partial / "progress.json").exists()  # the other run's work is never deleted
        assert lock_path(out).exists()
    finally:
        first.communicate("", timeout=60)
    assert first.returncode == 0
    assert not lock_path(out).exists() and not out.exists()


def test_the_lock_is_released_on_an_exception(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output_lock(out) as lock:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
            raise RuntimeError
    assert not lock_path(out).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, checkpoint_dir, capsys):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                          "started": 0}))
    assert main(["-q", *map(str, _prune_args(checkpoint_dir, out))]) == 0
    assert (out / "model.safetensors").exists() and not lock_path(out).exists()


def test_another_hosts_lock_is_never_broken(tmp_path, checkpoint_dir, capsys):
    out = tmp_path / "out"
    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    line = one_line_error(_prune_args(checkpoint_dir, out), capsys)
    assert "elsewhere" in line and f"remove {lock}" in line
    assert lock.exists() and not out.exists()


def test_two_concurrent_runs_one_wins(tmp_path, checkpoint_dir):
    """Two real processes on the same --output: one writes it, the other refuses (exit 2)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llmprune", "-q", *map(str, _prune_args(checkpoint_dir, out))]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "in use by" in err or "already exists" in err
    assert (out / "model.safetensors").exists() and not lock_path(out).exists()


# ----------------------------------------------------------------------------- push
def test_push_uploads_only_regular_files_inside_the_folder(tmp_path, checkpoint_dir):
    import shutil

    from llmprune.io.hub import push

    src = tmp_path / "model"
    shutil.copytree(checkpoint_dir, src)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for upload")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("no")
    os.symlink(secret, src / "passwd")
    os.symlink(outside, src / "linked_dir")
    files = push(str(src), "user/name", dry_run=True)
    names = {f.path_in_repo for f in files}
    assert "passwd" not in names and not any(n.startswith("linked_dir") for n in names)
    assert "config.json" in names


def test_push_redacts_credentials_in_the_endpoint(tmp_path, checkpoint_dir, capsys,
                                                  monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://alice:s3cret@127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    line = one_line_error(["push", checkpoint_dir, "--repo-id", "user/name"], capsys)
    assert "s3cret" not in line and "alice" not in line
    assert "127.0.0.1:9" in line


# ----------------------------------------------------------------------------- non-finite weights
@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory, checkpoint_dir):
    """The tiny Llama checkpoint with one NaN in layer 1's q_proj."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("nan") / "ckpt"
    shutil.copytree(checkpoint_dir, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"][3, 5] = float("nan")
    save_file(tensors, path / "model.safetensors", {"format": "pt"})
    return path


@pytest.mark.parametrize("argv", [
    ["wanda", "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "16", "--calib-data", "{text}"],
    ["sparsegpt", "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "16", "--calib-data",
     "{text}"],
    ["wanda", "--sparsity", "0.5", "--nsamples", "2", "--seqlen", "16", "--calib-data", "{text}",
     "--stream"],
    ["magnitude", "--sparsity", "0.5", "--stream"],
])
def test_non_finite_weights_are_refused_naming_the_tensor(argv, nan_checkpoint, text_file,
                                                          tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(text=text_file) for a in argv]
    line = one_line_error([argv[0], "--model", nan_checkpoint, *argv[1:], "--output", out],
                          capsys)
    assert "model.layers.1.self_attn.q_proj.weight" in line and "NaN/Inf" in line
    assert leftovers(out) == []


def test_eval_and_load_pretrained_refuse_non_finite_weights(nan_checkpoint, text_file, capsys):
    from llmprune import load_pretrained
    from llmprune.core.errors import NonFiniteError

    line = one_line_error(["eval", "--model", nan_checkpoint, "--ppl", text_file, "--seqlen",
                           "16", "--max-windows", "2"], capsys)
    assert "q_proj" in line
    with pytest.raises(NonFiniteError, match="q_proj"):
        load_pretrained(nan_checkpoint)


def test_a_non_finite_evaluation_loss_is_an_error():
    import torch

    from llmprune.core.errors import NonFiniteError
    from llmprune.evaluate.ppl import perplexity

    class NaNModel(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, 10)
            logits[0, 0, 0] = float("nan")
            return type("Out", (), {"logits": logits})

    with pytest.raises(NonFiniteError, match="perplexity is undefined"):
        perplexity(NaNModel(), torch.zeros(64, dtype=torch.long), seqlen=16, progress=False)


# ----------------------------------------------------------------------------- corrupt files
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _break_header(path):
    data = bytearray(path.read_bytes())
    data[9] = ord("!")  # the header's second byte: no longer JSON
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _break_header])
@pytest.mark.parametrize("argv", [
    ["magnitude", "--model", "{ckpt}", "--sparsity", "0.5", "--output", "{out}"],
    ["magnitude", "--model", "{ckpt}", "--sparsity", "0.5", "--stream", "--output", "{out}"],
    ["eval", "--model", "{ckpt}", "--ppl", "{text}", "--seqlen", "16", "--max-windows", "1"],
])
def test_a_damaged_safetensors_file_is_one_line_naming_it(damage, argv, tmp_path, checkpoint_dir,
                                                         text_file, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, ckpt)
    damage(ckpt / "model.safetensors")
    out = tmp_path / "out"
    argv = [a.format(ckpt=ckpt, out=out, text=text_file) for a in argv]
    line = one_line_error(argv, capsys)
    assert str(ckpt / "model.safetensors") in line
    assert leftovers(out) == []


def test_load_pretrained_of_a_damaged_file_is_a_user_error(tmp_path, checkpoint_dir):
    import shutil

    from llmprune import load_pretrained
    from llmprune.core.errors import CorruptCheckpointError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, ckpt)
    _truncate(ckpt / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_pretrained(ckpt)


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory, checkpoint_dir):
    out = tmp_path_factory.mktemp("compact") / "c"
    assert main(["-q", "magnitude", "--model", str(checkpoint_dir), "--sparsity", "0.5",
                 "--export", "compact", "--output", str(out)]) == 0
    return out


def _edit_meta(**changes):
    def edit(d):
        meta = json.loads((d / "llmprune.json").read_text())
        meta.update(changes)
        (d / "llmprune.json").write_text(json.dumps(meta))
    return edit


def _mask_as_int8(d):
    """Relabel q_proj's keep bits U8 -> I8 in the shard header (same length, same bytes)."""
    shard = d / "llmprune-00001-of-00001.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    key = b'layers.0.self_attn.q_proj.weight.bitmask":{"dtype":"U8"'
    assert key in data[8:8 + n]
    shard.write_bytes(data.replace(key, key.replace(b"U8", b"I8"), 1))


@pytest.mark.parametrize("edit,verify,message", [
    (_edit_meta(dtype="bfloat16"), True, "dtype is 'bfloat16' but the weights are stored as"),
    (_edit_meta(dtype="float99"), True, "dtype 'float99' is not one of"),
    (_edit_meta(tensors=[]), True, "must be JSON objects"),
    (lambda d: (d / "llmprune.json").unlink(), True, "compact llmprune shards but no"),
    (_mask_as_int8, False, "bitmask is stored as int8, expected uint8"),
    (_mask_as_int8, True, "header sha256"),
])
def test_edited_compact_metadata_is_refused(edit, verify, message, compact_dir, tmp_path):
    import shutil

    from llmprune import load_pretrained
    from llmprune.core.errors import CorruptCheckpointError

    d = tmp_path / "c"
    shutil.copytree(compact_dir, d)
    edit(d)
    with pytest.raises(CorruptCheckpointError, match=message):
        load_pretrained(d, verify=verify)


def test_a_masks_file_of_the_wrong_dtype_is_refused(tmp_path, checkpoint_dir, capsys):
    from safetensors.torch import load_file, save_file

    from llmprune.core.errors import CorruptCheckpointError
    from llmprune.io.meta import MASKS_FILE, read_masks

    out = tmp_path / "out"
    assert main(["-q", "magnitude", "--model", str(checkpoint_dir), "--sparsity", "0.5",
                 "--output", str(out)]) == 0
    path = out / MASKS_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    masks = load_file(path)
    save_file({k: v.view(torch.int8) for k, v in masks.items()}, path, metadata)
    with pytest.raises(CorruptCheckpointError, match="expected uint8"):
        read_masks(out)
    line = one_line_error(["inspect", out], capsys)
    assert "expected uint8" in line


# ----------------------------------------------------------------------------- limits
@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory, tokenizer):
    from tests.tiny_families import tiny_family_model

    path = tmp_path_factory.mktemp("opt") / "tiny-opt"
    tiny_family_model("opt").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def unknown_type_dir(tmp_path_factory, checkpoint_dir):
    path = tmp_path_factory.mktemp("unknown") / "ckpt"
    path.mkdir()
    config = json.loads((checkpoint_dir / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "no-such-type"}))
    return path


LIMITS = [
    (["wanda", "--model", "{ckpt}", "--sparsity", "0.5", "--seqlen", "300", "--nsamples", "1",
      "--calib-data", "{text}"], "--seqlen 300 is longer than the 256 positions of this llama"),
    (["wanda", "--model", "{opt}", "--sparsity", "0.5", "--seqlen", "300", "--nsamples", "1",
      "--calib-data", "{text}"], "--seqlen 300 is longer than the 256 positions of this opt"),
    (["sparsegpt", "--model", "{ckpt}", "--sparsity", "0.5", "--seqlen", "300", "--nsamples",
      "1", "--calib-data", "{text}", "--stream"], "--seqlen 300 is longer than the 256"),
    (["magnitude", "--model", "{ckpt}", "--sparsity", "0.5", "--eval-ppl", "{text}",
      "--eval-seqlen", "257"], "--eval-seqlen 257 is longer than the 256"),
    (["eval", "--model", "{opt}", "--ppl", "{text}", "--seqlen", "400"],
     "--seqlen 400 is longer than the 256 positions of this opt"),
    (["magnitude", "--model", "{unknown}", "--sparsity", "0.5"], "no-such-type"),
    (["wanda", "--model", "{ckpt}", "--sparsity", "0.5", "--pattern", "5:4"], "--pattern"),
]


@pytest.mark.parametrize("argv,message", LIMITS)
def test_limits_are_checked_before_work_starts(argv, message, tmp_path, checkpoint_dir, opt_dir,
                                               unknown_type_dir, text_file, capsys):
    out = tmp_path / "out"
    argv = [a.format(ckpt=checkpoint_dir, opt=opt_dir, unknown=unknown_type_dir, text=text_file)
            for a in argv]
    if argv[0] != "eval":
        argv += ["--output", out]
    line = one_line_error(argv, capsys)
    assert message in line
    assert leftovers(out) == []


def test_sigterm_releases_the_lock_and_leaves_nothing(tmp_path, checkpoint_dir):
    """A run stopped by SIGTERM midway (here: an export between two shards) unwinds: exit 130,
    its lock and temporary directory removed, no output."""
    import signal
    from pathlib import Path

    src = tmp_path / "pruned"
    assert main(["-q", "magnitude", "--model", str(checkpoint_dir), "--sparsity", "0.5",
                 "--output", str(src)]) == 0
    out = tmp_path / "out"
    child = Path(__file__).resolve().parent / "fault_child.py"
    proc = subprocess.Popen([sys.executable, str(child), "pause-after-shard", "60", "--", "-q",
                             "export", str(src), "--max-shard-size", "30KB", "--output",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert "wrote shard 1" in proc.stdout.readline()
        assert lock_path(out).exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted" in proc.stderr.read()
    assert leftovers(out) == []


def test_an_output_written_by_another_run_meanwhile_is_never_replaced(tmp_path):
    """Both runs checked --output before either wrote it; the second to reach the rename finds
    it under the lock and refuses instead of replacing it (without --overwrite)."""
    from llmprune.core.errors import OutputExistsError
    from llmprune.io.output import atomic_dir

    out = tmp_path / "out"
    with atomic_dir(out, False) as tmp:  # the first run
        (tmp / "a").write_text("first")
    with pytest.raises(OutputExistsError, match="already exists"):
        with atomic_dir(out, False) as tmp:
            (tmp / "a").write_text("second")
    assert (out / "a").read_text() == "first" and leftovers(out) == ["out"]
    with atomic_dir(out, True) as tmp:  # --overwrite replaces it
        (tmp / "a").write_text("third")
    assert (out / "a").read_text() == "third"


# ----------------------------------------------------------------------------- recipe values
@pytest.mark.parametrize("stage,message", [
    ('sparsity: "abc"', "sparsity must be float or None, got 'abc'"),
    ("sparsity: [1]", "sparsity must be float or None, got [1]"),
    ("sparsity: .nan", "got nan"),
    ("sparsity: 0.5, nsamples: 2.5", "nsamples must be int, got 2.5"),
    ("sparsity: 0.5, seqlen: true", "seqlen must be int, got True"),
    ("pattern: 4", "pattern must be str or None, got 4"),
    ('pattern: "5:4"', "--pattern"),
])
def test_recipe_values_of_the_wrong_type_or_range(stage, message, tmp_path, checkpoint_dir,
                                                  capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {checkpoint_dir}\nstages:\n  - wanda: {{{stage}}}\n")
    out = tmp_path / "out"
    assert message in one_line_error(["run", recipe, "--output", out], capsys)
    assert leftovers(out) == []


def test_streaming_checks_the_tensors_outside_the_layers_in_chunks(tmp_path, checkpoint_dir,
                                                                    text_file, capsys):
    """The embedding is checked through a buffer smaller than it (never mapped whole)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from llmprune.core.errors import NonFiniteError
    from llmprune.io.safetensors import SafetensorsFiles

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.embed_tokens.weight"][-1, -1] = float("inf")
    save_file(tensors, ckpt / "model.safetensors", {"format": "pt"})
    files = SafetensorsFiles([ckpt / "model.safetensors"])
    files.COPY_CHUNK = 1024  # several chunks; the Inf is in the last one
    with pytest.raises(NonFiniteError, match="model.embed_tokens.weight has 1 NaN/Inf"):
        files.check_finite("model.embed_tokens.weight")
    files.check_finite("model.norm.weight")
    out = tmp_path / "out"
    line = one_line_error(["wanda", "--model", ckpt, "--sparsity", "0.5", "--nsamples", "2",
                           "--seqlen", "16", "--calib-data", text_file, "--stream", "--output",
                           out], capsys)
    assert "model.embed_tokens.weight" in line and leftovers(out) == []


def test_the_finite_check_has_no_false_alarm_on_large_values():
    """Half-precision weights whose sum overflows are still finite."""
    import torch

    from llmprune.core.finite import check_finite

    big = torch.full((64, 64), 60000.0, dtype=torch.float16)
    assert not bool(big.sum().isfinite())
    check_finite("w", big, "here")
    big[1, 2] = float("-inf")
    with pytest.raises(Exception, match="w has 1 NaN/Inf"):
        check_finite("w", big, "here")
