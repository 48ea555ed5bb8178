"""Eviction in a transformers KV cache, the straightforward way: what tests and benchmarks compare vLLM against.

After tokens leave a `DynamicCache`, the model goes on at the true (logical) positions, so RoPE is unchanged,
while the cache is written at its new, shorter (physical) length: what the plugin does inside vLLM.
"""

from __future__ import annotations

import torch


def keep_in_cache(cache, keep: torch.Tensor) -> None:
    """Keep only the indexed tokens of every layer: `keep` is [n] (the same tokens everywhere) or
    [layers, kv_heads, n] (per layer and KV head, as the scoring policies choose)."""
    for layer, layer_keep in zip(cache.layers, keep if keep.dim() == 3 else [keep] * len(cache.layers)):
        if layer_keep.dim() == 1:
            layer.keys, layer.values = layer.keys[:, :, layer_keep], layer.values[:, :, layer_keep]
        else:
            index = layer_keep[None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)


def continue_after_eviction(model, cache, tokens: torch.Tensor, logical_start: int) -> torch.Tensor:
    """Logits [len(tokens), vocab] of `tokens` fed at logical positions logical_start, ... onto `cache`."""
    physical = cache.get_seq_length()
    count = tokens.shape[0]
    with torch.no_grad():
        return model(tokens[None], past_key_values=cache, use_cache=True,
                     position_ids=torch.arange(logical_start, logical_start + count)[None],
                     cache_position=torch.arange(physical, physical + count)).logits[0]


def generate_with_streaming(model, prompt_ids: list[int], budget: int, interval: int, sinks: int,
                            max_new_tokens: int, stop_ids: frozenset[int] = frozenset()) -> list[int]:
    """Greedy tokens with StreamingLLM eviction (sinks + most recent) on the plugin's schedule: once after the
    prompt when it exceeds the budget, then back to the budget whenever the cache reaches budget + interval.
    Stops after `max_new_tokens` or a token of `stop_ids` (kept in the output, as vLLM returns it)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    logical = len(prompt_ids)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True).logits[0, -1]
    generated, prompt_done = [], False
    while len(generated) < max_new_tokens:
        generated.append(int(logits.argmax()))
        if generated[-1] in stop_ids:
            break
        physical = cache.get_seq_length()
        # The scheduler's rule (core/scheduler.py): once after the prompt, then at budget + interval.
        if (not prompt_done and physical > budget) or (prompt_done and physical >= budget + interval):
            recent = torch.arange(physical - (budget - sinks), physical)
            keep_in_cache(cache, torch.cat([torch.arange(sinks), recent]))
        prompt_done = True
        logits = continue_after_eviction(model, cache, torch.tensor([generated[-1]]), logical)[-1]
        logical += 1
    return generated
