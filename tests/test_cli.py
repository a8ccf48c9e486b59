"""The command line, end to end on a tiny checkpoint: successful runs and every bad input."""

import json
import subprocess
import sys

import pytest
import torch

from llmprune.cli import main


def run_cli(*args, cwd=None):
    """Run the real console entry point in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "llmprune", "-q", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _digest(path):
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_prune_writes_loadable_checkpoint(tmp_path, checkpoint_dir, text_file):
    out = tmp_path / "pruned"
    source_before = _digest(checkpoint_dir)
    rc, stdout, stderr = run_cli("sparsegpt", "--model", checkpoint_dir, "--sparsity", "0.5",
                                 "--nsamples", "4", "--seqlen", "32", "--calib-data", text_file,
                                 "--output", out, "--eval-ppl", text_file, "--eval-seqlen", "32",
                                 "--max-windows", "4")
    assert rc == 0, stderr
    assert "dense perplexity:" in stdout and "pruned perplexity:" in stdout
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["recipe"]["method"] == "sparsegpt" and meta["recipe"]["nsamples"] == 4
    assert len(meta["layers"]) == 14
    assert all(v["sparsity"] == pytest.approx(0.5, abs=0.01) for v in meta["layers"].values())
    assert len(meta["calibration"]["text_sha256"]) == 64
    assert {"llmprune", "torch", "transformers"} <= set(meta["versions"])
    assert meta["timings"]["prune"] > 0
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary directory left behind
    assert _digest(checkpoint_dir) == source_before  # the source checkpoint is never touched

    rc, stdout, stderr = run_cli("eval", "--model", out, "--ppl", text_file, "--seqlen", "32",
                                 "--max-windows", "4")
    assert rc == 0, stderr
    ppl = float(stdout.strip().splitlines()[-1].split("perplexity:")[1])
    assert ppl == pytest.approx(meta["eval"]["pruned_perplexity"], rel=1e-4)


def test_magnitude_needs_no_data_and_overwrite(tmp_path, checkpoint_dir):
    out = tmp_path / "mag"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    rc, _, stderr = run_cli("magnitude", "--model", checkpoint_dir, "--pattern", "2:4",
                            "--output", out)
    assert rc == 2 and "already exists" in stderr and "--overwrite" in stderr
    assert (out / "keep.txt").exists()
    rc, _, stderr = run_cli("magnitude", "--model", checkpoint_dir, "--pattern", "2:4",
                            "--output", out, "--overwrite")
    assert rc == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    meta = json.loads((out / "llmprune.json").read_text())
    assert meta["calibration"] is None and meta["target"] == "2:4"


BAD = [
    (["wanda", "--model", "/no/such/model", "--sparsity", "0.5"], "not found"),
    (["wanda", "--model", "{ckpt}", "--sparsity", "1.0"], "[0, 1)"),
    (["wanda", "--model", "{ckpt}", "--sparsity", "-0.2"], "[0, 1)"),
    (["wanda", "--model", "{ckpt}", "--pattern", "2-4"], "malformed --pattern"),
    (["wanda", "--model", "{ckpt}", "--pattern", "3:5", "--calib-data", "{text}",
      "--nsamples", "2", "--seqlen", "16"], "does not divide"),
    (["wanda", "--model", "{ckpt}", "--sparsity", "0.5", "--calib-data", "{text}",
      "--nsamples", "100000", "--seqlen", "256"], "fewer than nsamples x seqlen"),
    (["wanda", "--model", "{gpt2}", "--sparsity", "0.5"],
     "cannot find decoder layers in GPT2LMHeadModel"),
    (["wanda", "--model", "{ckpt}", "--sparsity", "0.5", "--seqlen", "32", "--calib-data",
      "/no/file.txt"],
     "neither a file"),
    (["sparsegpt", "--model", "{ckpt}", "--sparsity", "0.5", "--device", "cuda"], "CUDA"),
]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(path)
    return path


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(args, message, tmp_path, checkpoint_dir,
                                                      text_file, gpt2_dir, capsys):
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    args = [a.format(ckpt=checkpoint_dir, text=text_file, gpt2=gpt2_dir) for a in args]
    rc = main(["-q", *args, "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_argparse_errors_are_one_line(capsys):
    assert main(["wanda", "--model", "x", "--sparsity", "abc", "--output", "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sparsity" in err[0]


def test_help_explains_every_flag():
    for cmd in ("magnitude", "wanda", "sparsegpt", "eval"):
        proc = subprocess.run([sys.executable, "-m", "llmprune", cmd, "--help"],
                              capture_output=True, text=True)
        assert proc.returncode == 0
        flags = [tok for tok in proc.stdout.split() if tok.startswith("--")]
        assert "--model" in flags
        # every option line in the help carries an explanation
        for line in proc.stdout.splitlines():
            s = line.strip()
            if s.startswith("--") and "  " not in s:
                idx = proc.stdout.splitlines().index(line)
                assert proc.stdout.splitlines()[idx + 1].startswith(" " * 10), line


@pytest.mark.parametrize("command, extra", [
    ("bonsai", ["--sparsity", "0.2"]),
    ("loraprune", ["--sparsity", "0.2"]),
    ("perp", []),
])
def test_flag_defaults_are_the_config_defaults(command, extra):
    """A command run without its method's flags builds the same config as the Python API's
    defaults (the flags are made from the config's options)."""
    from llmprune.cli.app import build_parser
    from llmprune.cli.common import config_from_args
    from llmprune.retrain.perp import PerpConfig
    from llmprune.structured.bonsai import BonsaiConfig, Target
    from llmprune.structured.loraprune import LoRAPruneConfig

    args = build_parser().parse_args([command, "--model", "m", "--output", "o", *extra])
    if command == "perp":
        assert config_from_args(PerpConfig, args) == PerpConfig()
        assert PerpConfig().train == ("norms", "lora") and PerpConfig().steps == 200
        return
    cls = BonsaiConfig if command == "bonsai" else LoRAPruneConfig
    target = Target(sparsity=0.2)
    assert config_from_args(cls, args, target=target, uniform=True) == cls(target)
    if cls is LoRAPruneConfig:
        assert cls(target).steps == 200 and args.steps == 200
