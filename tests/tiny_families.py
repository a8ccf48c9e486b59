"""Tiny random models of any model type transformers knows, built from configs (no download).

The one table of per-type config keys, shared by the tests (``tests/conftest.py``) and
``eval/bench_families.py``. Plain Python: no pytest, so the benchmark can import it.
"""

from __future__ import annotations

import torch

VOCAB = 300
EXPERTS = 4  # routed experts of every tiny MoE model

# model type -> config keys it needs besides the common ones (None: drop a common key)
DENSE = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "gemma": {}, "gemma2": {}, "gemma3_text": {}, "phi": {}, "phi3": {}, "olmo": {},
    "olmo2": {}, "olmo3": {}, "smollm3": {}, "granite": {}, "glm": {}, "glm4": {},
    "gpt_neox": {}, "starcoder2": {}, "cohere": {}, "cohere2": {}, "stablelm": {},
    "helium": {}, "exaone4": {}, "seed_oss": {}, "apertus": {}, "ernie4_5": {},
    "hunyuan_v1_dense": {}, "arcee": {}, "ministral": {}, "nemotron": {},
    "falcon": {"head_dim": None, "new_decoder_architecture": False, "parallel_attn": True},
}
HYBRID = {
    "lfm2": {},
    # a linear-attention (gated delta net) layer and a full-attention one
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"]},
    "falcon_h1": {},
}
# mixture-of-experts types (fused 3D expert parameters in transformers 5): 4 experts
MOE = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "decoder_sparse_step": 1},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "minimax": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "glm4_moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                 "first_k_dense_replace": 1, "moe_intermediate_size": 32},
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
KEYS = {**DENSE, **HYBRID, **MOE}
# other layouts of a model type: name -> (model type, config keys besides its own in KEYS)
VARIANTS = {
    # Falcon's query_key_value: "falcon" is multi-query (all q heads, then one k and one v head)
    # [heads, 3 (q, k, v), head_dim], with biases
    "falcon-classic": ("falcon", {"multi_query": False, "bias": True}),
    "falcon-grouped": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon-alibi": ("falcon", {"alibi": True}),  # ALiBi position biases instead of rotary
}


def tiny_config(model_type: str):
    """A tiny config of ``model_type`` (or of a name in VARIANTS): two layers, hidden 64,
    vocabulary 300."""
    from transformers import AutoConfig

    model_type, variant = VARIANTS.get(model_type, (model_type, {}))
    keys = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB,
                max_position_embeddings=256, head_dim=16, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    keys.update(KEYS[model_type])
    keys.update(variant)
    return AutoConfig.for_model(model_type, **{k: v for k, v in keys.items() if v is not None})


def tiny_family_model(model_type: str, seed: int = 0):
    """A random float32 model of :func:`tiny_config`, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()
