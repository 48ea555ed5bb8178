"""Random-weight Llama models in the shapes of real ones, for GPU throughput benchmarks where no model hub exists.

Throughput depends on a model's shapes (layers, heads, hidden sizes), not on what its weights learned, so a
random model in Llama-3.1-8B's shapes measures what an 8B model costs a GPU. The GPU machines have no model hub
and take 64 MiB per call, so the model is written on the machine itself, one tensor at a time, generated on the
GPU (an 8B model is 16 GB of bfloat16: generating it on the CPU would take minutes), in safetensors shards, with
a tokenizer copied from a local model directory (SmolLM2's: its vocabulary sets the embedding's rows).

    python -m infokv_testing.random_models llama-3.1-8b --tokenizer DIR --out DIR [--device cuda]

Greedy outputs of a random model are not text; benchmarks that use one must fix output lengths (`ignore_eos`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
SHARD_BYTES = 4 * 2**30


@dataclass(frozen=True)
class LlamaShapes:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072


SHAPES = {
    "llama-3.1-8b": LlamaShapes(4096, 14336, 32, 32, 8, 128),  # Meta's config.json for Llama-3.1-8B
    # vLLM's CPU attention takes head sizes of 32 and more
    "tiny": LlamaShapes(128, 256, 2, 4, 2, 32, max_position_embeddings=4096),
}


def tensor_shapes(shapes: LlamaShapes, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every weight of transformers' LlamaForCausalLM (untied embeddings), by name."""
    hidden, heads, kv_heads, dim = (shapes.hidden_size, shapes.num_attention_heads, shapes.num_key_value_heads,
                                    shapes.head_dim)
    names = {"model.embed_tokens.weight": (vocab_size, hidden)}
    for layer in range(shapes.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        names.update({
            prefix + "self_attn.q_proj.weight": (heads * dim, hidden),
            prefix + "self_attn.k_proj.weight": (kv_heads * dim, hidden),
            prefix + "self_attn.v_proj.weight": (kv_heads * dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, heads * dim),
            prefix + "mlp.gate_proj.weight": (shapes.intermediate_size, hidden),
            prefix + "mlp.up_proj.weight": (shapes.intermediate_size, hidden),
            prefix + "mlp.down_proj.weight": (hidden, shapes.intermediate_size),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        })
    names["model.norm.weight"] = (hidden,)
    names["lm_head.weight"] = (vocab_size, hidden)
    return names


def write_random_llama(shapes: LlamaShapes, tokenizer_dir: Path, target: Path, device: str = "cpu",
                       dtype: str = "bfloat16", seed: int = 0, std: float = 0.02) -> Path:
    """Write a random Llama (normal(0, std) matrices, unit norms) with `tokenizer_dir`'s tokenizer to `target`."""
    import torch
    from safetensors.torch import save_file

    tokenizer = json.loads((tokenizer_dir / "config.json").read_text())
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, target / name)
    vocab_size = tokenizer["vocab_size"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": shapes.hidden_size, "intermediate_size": shapes.intermediate_size,
        "num_hidden_layers": shapes.num_hidden_layers, "num_attention_heads": shapes.num_attention_heads,
        "num_key_value_heads": shapes.num_key_value_heads, "head_dim": shapes.head_dim,
        "max_position_embeddings": shapes.max_position_embeddings, "rope_theta": shapes.rope_theta,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": dtype,
        "bos_token_id": tokenizer.get("bos_token_id"), "eos_token_id": tokenizer.get("eos_token_id"),
    }
    (target / "config.json").write_text(json.dumps(config, indent=1))
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, shape in tensor_shapes(shapes, vocab_size).items():
        if len(shape) == 1:
            tensor = torch.ones(shape, dtype=torch_dtype)
        else:
            tensor = (torch.randn(shape, generator=generator, device=device) * std).to(torch_dtype).cpu()
        if shard_bytes and shard_bytes + tensor.nbytes > SHARD_BYTES:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    index = {}
    for number, shard in enumerate(shards, 1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(target / file_name), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file_name))
    total = sum(tensor.nbytes for shard in shards for tensor in shard.values())
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shapes", choices=sorted(SHAPES))
    parser.add_argument("--tokenizer", type=Path, required=True, help="a model directory with a tokenizer")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu", help="where the weights are generated (cuda: seconds)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    if (args.out / "model.safetensors.index.json").exists():
        print(f"{args.out} (already written)")
        return
    print(write_random_llama(SHAPES[args.shapes], args.tokenizer, args.out, args.device, args.dtype))


if __name__ == "__main__":
    main()
