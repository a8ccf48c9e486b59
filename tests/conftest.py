"""Shared fixtures: tiny random models of every supported family, built in-process from configs,
and a tiny byte-level BPE tokenizer, so that no test needs the network."""

from __future__ import annotations

import random

import pytest
import torch

from .tiny_families import VOCAB


def tiny_config(family: str):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=256)
    if family == "llama":
        return LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "mistral":
        return MistralConfig(intermediate_size=128, num_key_value_heads=2, sliding_window=None,
                             **common)
    if family == "qwen2":
        return Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
    if family == "opt":
        return OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **common)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "opt"]

# model types with no registered adapter, pruned through discovery in the tests (their configs,
# and MOE's, are in tests/tiny_families.py)
DISCOVERED = ["gemma3_text", "gemma2", "phi3", "olmo2", "smollm3", "granite", "glm4", "gpt_neox",
              "starcoder2", "lfm2", "falcon", "qwen3_5_text"]
MOE = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "llama4_text", "deepseek_v3", "jamba"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality: same dtype, shape and bytes (so -0.0 != +0.0 and NaN == NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_shrunk_equals_masked(model, mask, ids: torch.Tensor) -> None:
    """Logits of ``model`` with ``mask`` applied by zeroing equal those after physically slicing
    the masked heads and channels out (``structured.shrink_``, which modifies ``model``)."""
    from llmprune.structured.shrink import masked, shrink_

    with torch.no_grad(), masked(model, mask):
        want = model(input_ids=ids).logits
    shrink_(model, mask)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


def random_text(n_words: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "the", "of", "and", "city",
             "north", "music", "game", "war", "album", "king", "song", "year", "team", "park"]
    return " ".join(rng.choice(words) for _ in range(n_words))


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([random_text(2000, 1)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def calib_ids():
    torch.manual_seed(123)
    return torch.randint(0, VOCAB, (8, 32))


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, tokenizer):
    """A tiny Llama checkpoint on disk, with a tokenizer, as a user would have one."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(random_text(6000, 2))
    return path
