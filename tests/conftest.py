"""Shared fixtures: tiny random models of every supported family, built in-process from configs,
and a tiny byte-level BPE tokenizer, so that no test needs the network."""

from __future__ import annotations

import random

import pytest
import torch

VOCAB = 300


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

# model types with no registered adapter, pruned through discovery (tiny configs of transformers'
# own classes); value: config keys this type needs besides the common ones
DISCOVERED = {
    "gemma3_text": {}, "gemma2": {}, "phi3": {}, "olmo2": {}, "smollm3": {}, "granite": {},
    "glm4": {}, "gpt_neox": {}, "starcoder2": {}, "lfm2": {},
    "falcon": {"head_dim": None, "new_decoder_architecture": False, "parallel_attn": True},
    # hybrid: a linear-attention (gated delta net) layer and a full-attention one
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"]},
}

# mixture-of-experts types (fused 3D expert parameters in transformers 5): 4 experts, 2 per token
MOE = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2,
                "layer_types": ["sliding_attention", "full_attention"]},
    "llama4_text": {"num_local_experts": 4, "num_experts_per_tok": 1,
                    "intermediate_size_mlp": 128, "interleave_moe_layer_step": 1},
    # multi-latent attention (low-rank q and kv projections), a dense first layer, then MoE with
    # a shared expert and grouped routing
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1,
                    "topk_group": 1, "first_k_dense_replace": 1, "moe_intermediate_size": 32,
                    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8},
    # hybrid: a mamba layer with experts, then an attention layer with a dense MLP
    "jamba": {"num_experts": 4, "num_experts_per_tok": 2, "attn_layer_period": 2,
              "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 0,
              "use_mamba_kernels": False},
}



def family_config(model_type: str):
    """A tiny config of any model type transformers knows (two layers, hidden 64, vocab 300)."""
    from transformers import AutoConfig

    keys = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, head_dim=16,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    keys.update(DISCOVERED.get(model_type) or MOE.get(model_type) or {})
    return AutoConfig.for_model(model_type, **{k: v for k, v in keys.items() if v is not None})


def family_model(model_type: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_config(model_type), dtype=torch.float32).eval()


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
