"""Tiny random-weight models of each architecture family the tests run through vLLM, written by transformers from
a config with SmolLM2's tokenizer (no model hub here).

Each family is one set of config fields over the same small shapes (2 layers, hidden size 128, 4 query / 2 KV
heads: the head counts divide 2 for tensor parallelism), so an engine starts in seconds and what differs between
families is what vLLM builds for them: Qwen3's q/k norms and head size apart from the hidden size, Qwen3-MoE's and
Mixtral's routed experts. Weights are large enough (initializer_range 0.1) that greedy outputs vary and depend on
the context, so evictions show. vLLM's CPU attention takes head sizes of 32 and more.
"""

from __future__ import annotations

from pathlib import Path

SHARED = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
              eos_token_id=2, initializer_range=0.1)

# transformers model_type and the fields that make each family itself
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(intermediate_size=256, head_dim=32)),
    # Real Qwen3 models have heads * head_dim larger than the hidden size (0.6B: 16 x 128 over 1,024); so here.
    "qwen3": ("qwen3", dict(intermediate_size=256, head_dim=64)),
    "qwen3-moe": ("qwen3_moe", dict(intermediate_size=256, head_dim=64, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=64, norm_topk_prob=True)),
    "mixtral": ("mixtral", dict(intermediate_size=64, head_dim=32, num_local_experts=4, num_experts_per_tok=2)),
    # A sliding-window layer, then a full-attention one (Gemma 3 has five to one). Gemma scales the embeddings by
    # the square root of the hidden size: smaller weights keep the outputs varied.
    "gemma3": ("gemma3_text", dict(intermediate_size=256, head_dim=32, sliding_window=16, initializer_range=0.02,
                                   layer_types=["sliding_attention", "full_attention"])),
    # gpt-oss: sliding-window and full-attention layers in turn, attention sinks, routed experts. vLLM's gpt-oss
    # always loads its own output head (real checkpoints are untied), so the weights must hold one.
    "gpt-oss": ("gpt_oss", dict(intermediate_size=64, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                                tie_word_embeddings=False)),
    # Qwen3-Next: a Gated DeltaNet (linear-attention) layer, then a full-attention one, routed and shared experts.
    # vLLM's CPU Gated DeltaNet takes bfloat16 only, and linear heads of 64 dimensions and more.
    "qwen3-next": ("qwen3_next", dict(intermediate_size=256, head_dim=64, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                      norm_topk_prob=True, layer_types=["linear_attention", "full_attention"],
                                      linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=64,
                                      linear_value_head_dim=64, linear_conv_kernel_dim=4,
                                      tie_word_embeddings=False)),
}


def write_tiny_model(family: str, tokenizer_dir: Path, target: Path, seed: int = 0, **shapes) -> Path:
    """Write the tiny `family` model (float32, weights drawn with `seed`) with `tokenizer_dir`'s tokenizer;
    `shapes` override its config fields (benchmarks scale a family up: layers, hidden size, window)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_type, fields = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**SHARED, **fields, **shapes})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).to(torch.float32).save_pretrained(target)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(target)
    return target

