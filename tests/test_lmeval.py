"""lm-eval for real, through `llmprune eval --tasks`, on a small local task shipped with the tests;
the accuracy must equal scoring the task by hand with the model's own log-likelihoods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmprune.cli import main

DATA = Path(__file__).parent / "data" / "lmeval" / "tiny_mc.jsonl"
TASK = "llmprune_tiny_mc"


@pytest.fixture
def task_dir(tmp_path):
    d = tmp_path / "tasks"
    d.mkdir()
    (d / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return d


def _docs():
    return [json.loads(line) for line in DATA.read_text().splitlines()]


@torch.no_grad()
def _hand_scores(model, tokenizer, docs):
    """acc and acc_norm by the definitions: the choice with the highest summed log-probability of
    its tokens after the question (separated by one space); acc_norm divides by the choice's
    length in characters."""
    acc = acc_norm = 0
    for doc in docs:
        ctx = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        lls = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
            lls.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        acc += int(max(range(len(lls)), key=lambda i: lls[i]) == doc["answer"])
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"])]
        acc_norm += int(max(range(len(norm)), key=lambda i: norm[i]) == doc["answer"])
    return acc / len(docs), acc_norm / len(docs)


def _run(model_arg, task_dir, tmp_path, limit=None):
    out = tmp_path / "res.json"
    args = ["-q", "eval", "--model", str(model_arg), "--tasks", TASK, "--include-path",
            str(task_dir), "--json", str(out)]
    if limit:
        args += ["--limit", str(limit)]
    assert main(args) == 0
    return json.loads(out.read_text())


def test_lm_eval_matches_hand_scoring_tiny(checkpoint_dir, task_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = _run(checkpoint_dir, task_dir, tmp_path)
    r = res["lm_eval"]["results"][TASK]
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir).eval()
    acc, acc_norm = _hand_scores(model, AutoTokenizer.from_pretrained(checkpoint_dir), _docs())
    assert r["acc,none"] == pytest.approx(acc) and r["acc_norm,none"] == pytest.approx(acc_norm)
    assert res["lm_eval"]["lm_eval_version"] == "0.4.13"
    assert "perplexity" not in res  # --tasks alone runs no perplexity
    table = capsys.readouterr().out
    assert f"| {TASK} |" in table and "acc_norm" in table


def test_results_merge_into_llmprune_json(checkpoint_dir, text_file, task_dir, tmp_path):
    out = tmp_path / "pruned"
    assert main(["-q", "magnitude", "--model", str(checkpoint_dir), "--sparsity", "0.5",
                 "--output", str(out)]) == 0
    assert main(["-q", "eval", "--model", str(out), "--tasks", TASK, "--include-path",
                 str(task_dir), "--ppl", str(text_file), "--seqlen", "32",
                 "--max-windows", "2"]) == 0
    evals = json.loads((out / "llmprune.json").read_text())["evaluations"]
    assert f"lm_eval/{TASK}" in evals and "acc,none" in evals[f"lm_eval/{TASK}"]["results"]
    assert any(k.startswith("perplexity/") for k in evals)


def test_unknown_task_is_one_line(checkpoint_dir, task_dir, capsys):
    assert main(["-q", "eval", "--model", str(checkpoint_dir), "--tasks", "llmprune_tiny_mcq",
                 "--include-path", str(task_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and TASK in err  # suggests the nearest task


@pytest.mark.real_model
def test_lm_eval_matches_hand_scoring_smollm2(task_dir, tmp_path):
    from llmprune.loaders import load_model

    res = _run("smollm2-135m", task_dir, tmp_path, limit=12)
    r = res["lm_eval"]["results"][TASK]
    model, tok, _ = load_model("smollm2-135m")
    acc, acc_norm = _hand_scores(model, tok, _docs()[:12])
    assert r["acc,none"] == pytest.approx(acc) and r["acc_norm,none"] == pytest.approx(acc_norm)
    assert acc > 0.5  # a real model gets most of these simple facts right
