"""What compression sets and refuses when vLLM builds an engine's config: `prepare_engine_args` adjusts
`EngineArgs` first, `check_engine_config` then refuses, at start-up and with the reason, what compression cannot
work with.
"""

from __future__ import annotations

import os
from typing import Any

from infokv_vllm.config import CompressionConfig, CompressionConfigError, compression_of, flag_name
from infokv_vllm.core.adapter import PER_TENSOR_FP8_CACHES

SCHEDULER_CLS = "infokv_vllm.core.scheduler.CompressingScheduler"


def compression_on(vllm_config: Any) -> bool:
    """Whether an engine's config turns compression on."""
    return compression_of(vllm_config).enabled


def prepare_engine_args(engine_args: Any) -> CompressionConfig:
    """Adjust `EngineArgs` before vLLM builds its config; refuse options we cannot honour.

    Runs in the process that creates the engine config, before the engine core and workers are spawned, so
    environment variables set here reach them.
    """
    compression = CompressionConfig.from_additional_config(engine_args.additional_config)
    if not compression.enabled:
        return compression
    from infokv_vllm.platforms import adapter_for_current_platform

    adapter = adapter_for_current_platform()
    if adapter is None:
        from vllm.platforms import current_platform

        raise CompressionConfigError(
            f"infokv-vllm: the {current_platform.device_name} platform is not supported with "
            f"{flag_name('method')} {compression.method}: this version compresses on vLLM's CPU and CUDA "
            f"platforms only. Use {flag_name('method')} none there.")
    for option, ours in (("scheduler_cls", SCHEDULER_CLS), ("worker_cls", adapter.worker_cls)):
        theirs = getattr(engine_args, option)
        if theirs not in (None, "auto", ours):
            raise CompressionConfigError(
                f"infokv-vllm: --{option.replace('_', '-')} {theirs} cannot be combined with {flag_name('method')} "
                f"{compression.method}: compression brings its own {option} ({ours}).")
        setattr(engine_args, option, ours)
    adapter.prepare_engine_args(engine_args, compression)
    # Compression hooks into the V1 model runner (vllm/v1/worker/gpu_model_runner.py); Model Runner V2 has
    # other interfaces. The variable is inherited by the spawned engine core and copied to Ray workers.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return compression


def check_engine_config(vllm_config: Any) -> None:
    """Refuse, at start-up and with the reason, vLLM features that compression cannot work with."""
    compression = compression_of(vllm_config)
    if not compression.enabled:
        return
    method = f"{flag_name('method')} {compression.method}"

    def refuse(option: str, why: str) -> None:
        raise CompressionConfigError(f"infokv-vllm: {option} is not supported with {method}: {why}")

    if vllm_config.speculative_config is not None:
        refuse("speculative decoding (--speculative-config)",
               "draft tokens are verified against KV that compression may have evicted")
    if vllm_config.kv_transfer_config is not None:
        refuse("KV connectors (--kv-transfer-config)",
               "connectors move pages by logical position, compacted pages no longer follow it")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        refuse("pipeline parallelism (--pipeline-parallel-size > 1)",
               "compaction is applied per step on all layers of one rank")
    from infokv_vllm.platforms import adapter_for_current_platform

    # prepare_engine_args, which runs first, has refused platforms without an adapter.
    adapter_for_current_platform().check_engine_config(vllm_config, compression, refuse)
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in ("auto", "float16", "bfloat16", *PER_TENSOR_FP8_CACHES):
        from vllm.utils.torch_utils import kv_cache_uses_per_token_head_scales

        served = f"full-precision caches and per-tensor fp8 ({', '.join(PER_TENSOR_FP8_CACHES)}) are"
        if kv_cache_uses_per_token_head_scales(cache_dtype):
            refuse(f"--kv-cache-dtype {cache_dtype}", "vLLM keeps a scale per token and KV head in a cache beside "
                   f"the pages, which compaction does not move; {served}")
        refuse(f"--kv-cache-dtype {cache_dtype}", "compression reads keys and values element by element, and this "
               f"format packs them with block scales or rotations; {served}")
    model_config = vllm_config.model_config
    if model_config.runner_type != "generate":
        refuse(f"--runner {model_config.runner_type}", "only generative models keep a growing KV cache")
    if model_config.use_mla:
        refuse("MLA attention models", "their latent KV has no per-head layout to select from")
    if model_config.is_attention_free:
        refuse("attention-free models", "they keep no KV cache to compress")
    windowed = model_config.get_sliding_window() is not None
    if windowed and "full_attention" not in (getattr(model_config.hf_text_config, "layer_types", None) or ()):
        refuse("models whose every layer has sliding-window attention",
               "vLLM already drops their old KV pages; compression serves the full-attention layers of a model")
    if (windowed or model_config.is_hybrid) and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        refuse("--disable-hybrid-kv-cache-manager for models with sliding-window or linear-attention layers",
               "compression keeps the full-attention layers' KV in a KV cache group of their own, which vLLM's "
               "hybrid KV cache manager gives them, apart from the layers whose KV vLLM already bounds")
    if vllm_config.parallel_config.use_ubatching:
        refuse("micro-batching (--enable-dbo, --ubatch-size > 1)",
               "the kept lengths are set per request row of the whole batch, which micro-batches split")
    from infokv_vllm.scoring import POLICIES
    from infokv_vllm.signals import ATTENTION

    if compression.pool_wide and ATTENTION not in compression.policy.signals:
        with_attention = [name for name, policy in POLICIES.items() if ATTENTION in policy().signals]
        raise CompressionConfigError(
            f"infokv-vllm: {flag_name('pool_target')} is not supported with {method} (as configured): the "
            "pool-wide mode compares requests by the attention their observation windows give each page, which "
            f"this policy does not record; use one of {', '.join(with_attention)}", "pool_target")
    if compression.budget is not None and compression.budget >= model_config.max_model_len:
        raise CompressionConfigError(
            f"infokv-vllm: invalid {flag_name('budget')}: {compression.budget} is not smaller than the context "
            f"length (max_model_len={model_config.max_model_len}), so no request would ever be compressed. "
            f"Use a smaller budget or {flag_name('method')} none.")
