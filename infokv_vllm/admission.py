"""Per-request admission: a request that compression cannot serve is refused before it reaches the engine."""

from __future__ import annotations

from typing import Any

from infokv_vllm import logger
from infokv_vllm.config import CompressionConfigError, compression_of, flag_name, misspelt_request_settings


def admit_request(vllm_config: Any, prompt_len: int, params: Any) -> None:
    """Refuse a request (its prompt's length and vLLM's `SamplingParams`) that compression cannot serve: vLLM
    answers HTTP 400 naming the field, and goes on serving others.

    - Invalid per-request settings (`SamplingParams.extra_args`, the OpenAI API's `vllm_xargs`).
    - A request that cannot fit the KV pool. Compression lets `max_model_len` exceed the pool (see
      `CompressedAttentionSpec.max_memory_usage_bytes`); a request fits if its prompt plus the tokens it may
      generate do, or if compression bounds it and its prompt plus budget + interval do.

    `vllm_internals.patches.request_admission` calls it where vLLM turns a prompt into an engine request (every
    entry point), and earlier where the API server creates a request's output stream: a streaming response has
    started (HTTP 200) by the time vLLM processes the request, so a refusal there would arrive as an error event
    inside the stream.
    """
    from vllm.exceptions import VLLMValidationError

    server = compression_of(vllm_config)
    if params is None or not server.enabled:
        return  # with compression off, every request is vLLM's alone
    for key, ours in misspelt_request_settings(params.extra_args).items():
        logger.warning("infokv-vllm: vllm_xargs.%s is not a compression setting (did you mean %s?); it is left to "
                       "vLLM", key, ours)
    try:
        settings = server.for_request(params.extra_args)
    except CompressionConfigError as error:
        raise VLLMValidationError(str(error), parameter=f"vllm_xargs.{error.field}",
                                  value=(params.extra_args or {}).get(error.field)) from None
    num_blocks = vllm_config.cache_config.num_gpu_blocks
    if not num_blocks:
        return
    pool = (num_blocks - 1) * vllm_config.cache_config.block_size  # block 0 is vLLM's null block
    if prompt_len + params.max_tokens <= pool:
        return
    if settings.kv_bound is None:
        why = ("the request opts out of compression" if not settings.enabled else
               f"{flag_name('pool_target')} lets the batch decide each request's KV" if settings.pool_wide else
               "a budget ratio does not bound the request's KV")
        raise VLLMValidationError(
            f"infokv-vllm: the prompt ({prompt_len} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
            f"{pool} tokens the KV cache holds, and {why}; lower max_tokens to at most "
            f"{max(pool - prompt_len, 0)}",
            parameter="max_tokens", value=params.max_tokens)
    if prompt_len + settings.kv_bound > pool:
        raise VLLMValidationError(
            f"infokv-vllm: the prompt ({prompt_len} tokens) is too long for this server's KV cache: it holds "
            f"{pool} tokens, and a compressed request needs its prompt plus budget + decode interval "
            f"({settings.kv_bound}); prompts of at most {max(pool - settings.kv_bound, 0)} tokens fit",
            parameter="prompt", value=prompt_len)
