"""Every vLLM internal this plugin relies on: each private name, overridden method, wrapped function, instance
attribute and call shape, with the vLLM function and why.

`tests/test_compat.py` checks every entry against the installed vLLM (no engine), and that every method our
vLLM subclasses override is listed, so an upgrade fails loudly instead of silently running without compression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VllmInternal:
    target: str  # dotted path: module, then attributes
    why: str  # starts with "wrapped:" where a module of `patches` wraps the target, "overridden:" where we override it
    params: tuple[str, ...] | None = None  # leading parameter names of a callable target
    source_has: tuple[str, ...] = ()  # snippets the target's source must contain (attributes it sets, calls)
    fields: tuple[str, ...] = ()  # fields of a dataclass or NamedTuple target


_RUNNER = "vllm.v1.worker.gpu_model_runner.GPUModelRunner"
_MANAGER = "vllm.v1.core.single_type_kv_cache_manager.FullAttentionManager"
_SCHEDULER = "vllm.v1.core.sched.scheduler.Scheduler"

VLLM_INTERNALS: tuple[VllmInternal, ...] = (
    # --- engine arguments and CLI (cli.py, engine_config.py, admission.py; wrapped by vllm_internals/patches/) ---
    VllmInternal("vllm.engine.arg_utils.EngineArgs.add_cli_args", "wrapped: our --kv-* flag group joins the "
                 "engine flags of `vllm serve` and `vllm bench`", ("parser",)),
    VllmInternal("vllm.engine.arg_utils.EngineArgs.from_cli_args", "wrapped: it copies only EngineArgs' fields, so "
                 "our flags are folded into additional_config", ("cls", "args")),
    VllmInternal("vllm.engine.arg_utils.EngineArgs.create_engine_config", "wrapped: every entry point builds its "
                 "VllmConfig here; compression sets its classes and refuses what it cannot support", ("self",)),
    VllmInternal("vllm.engine.arg_utils.AsyncEngineArgs.add_cli_args", "general plugins are loaded before the "
                 "engine flags are built, so our CLI wrapper is in place in time",
                 source_has=("load_general_plugins()",)),
    VllmInternal("vllm.v1.engine.input_processor.InputProcessor.process_inputs", "wrapped: the request it "
                 "returns (prompt tokens, max_tokens, extra_args) is admitted or refused (HTTP 400) before it "
                 "reaches the engine", ("self", "request_id", "prompt", "params")),
    VllmInternal("vllm.v1.engine.async_llm.AsyncLLM.generate", "wrapped: a rendered prompt (`prompt_token_ids`) "
                 "is admitted when the API server creates its output stream, before a streaming response starts",
                 ("self", "prompt", "sampling_params")),
    VllmInternal("vllm.entrypoints.openai.chat_completion.serving.OpenAIServingChat._create_chat_completion",
                 "creates generate()'s stream before the response starts (errors raised there become HTTP 400)",
                 source_has=("self.engine_client.generate(", "self.chat_completion_stream_generator(")),
    VllmInternal("vllm.entrypoints.openai.completion.serving.OpenAIServingCompletion._create_completion",
                 "the same for completions", source_has=("self.engine_client.generate(",
                                                         "self.completion_stream_generator(")),
    VllmInternal("vllm.v1.engine.input_processor.InputProcessor.__init__", "wrapped: the frontend's config "
                 "(whose cache_config.num_gpu_blocks the engine handshake fills in) says whether the decoder built "
                 "next reads compression stats", source_has=("self.vllm_config",)),
    VllmInternal("vllm.v1.engine.async_llm.AsyncLLM.__init__", "wrapped: where compression is on, our metrics join "
                 "its stat loggers (a keyword argument); its InputProcessor is built before the engine client, whose "
                 "decoder reads EngineCoreOutputs' annotations", ("self", "vllm_config"),
                 source_has=("InputProcessor(self.vllm_config", "EngineCoreClient.make_async_mp_client(",
                             "custom_stat_loggers = list(stat_loggers or [])")),
    VllmInternal("vllm.v1.engine.llm_engine.LLMEngine.__init__", "the same for the offline engine",
                 source_has=("InputProcessor(self.vllm_config", "EngineCoreClient.make_client(")),
    VllmInternal("vllm.v1.engine.EngineCoreRequest", "what admission reads",
                 fields=("prompt_token_ids", "sampling_params")),
    VllmInternal("vllm.v1.kv_cache_interface.FullAttentionSpec.max_memory_usage_bytes", "overridden: vLLM's "
                 "start-up check sizes one request with it", ("self", "vllm_config")),
    VllmInternal("vllm.entrypoints.cli.serve.ServeSubcommand.cmd", "wrapped: with compression on, `vllm serve` "
                 "exits with status 1 after its engine core died (vLLM exits 0)", ("args",)),
    VllmInternal("vllm.v1.engine.core_client.BackgroundResources.validate_alive", "wrapped: the engine core's "
                 "fatal-error message arrives here (EngineDeadError), which marks the process for the exit status "
                 "above", ("self", "frames"),
                 source_has=("EngineCoreProc.ENGINE_CORE_DEAD", "raise EngineDeadError()")),
    VllmInternal("vllm.v1.engine.EngineCoreOutputs", "annotation `scheduler_stats` widened where compression is "
                 "on: the frontend's msgspec decoder drops undeclared fields, our compression stats among them",
                 fields=("scheduler_stats",)),
    # --- worker and runner (platforms/cpu.py, core/runner.py) ---
    VllmInternal("vllm.v1.worker.cpu_worker.CPUWorker.init_device", "builds its runner through the module global "
                 "`CPUModelRunner`, swapped for ours during the call", source_has=("CPUModelRunner(self.vllm_config",)),
    VllmInternal("vllm.v1.worker.cpu_worker.CPUModelRunner", "the module global swapped above"),
    VllmInternal("vllm.v1.worker.cpu_worker.CPUWorker.determine_available_memory", "overridden: the KV memory "
                 "reported is net of the signal planes and probe scores kept per block", ("self",)),
    VllmInternal("vllm.v1.worker.gpu_worker.Worker.determine_available_memory", "overridden: the same on CUDA",
                 ("self",)),
    VllmInternal(f"{_RUNNER}.load_model", "overridden: the model is built under the platform's scoring attention "
                 "backend, and decoder layers are wrapped before vLLM compiles", ("self",)),
    VllmInternal(f"{_RUNNER}.get_kv_cache_spec", "overridden: layers report CompressedAttentionSpec", ("self",)),
    VllmInternal(f"{_RUNNER}.initialize_kv_cache", "overridden: compactor and signal planes are built on the "
                 "allocated caches, except the minimal cache of a profiling call", ("self", "kv_cache_config",
                                                                                  "is_profiling")),
    VllmInternal(f"{_RUNNER}._init_minimal_kv_cache_for_profiling", "the GPU runner's CUDA-graph memory profile "
                 "initialises a throw-away cache first, marked as such",
                 source_has=("self.initialize_kv_cache(minimal_config, is_profiling=True)",)),
    VllmInternal(f"{_RUNNER}.execute_model", "overridden: compactions are applied before the forward",
                 ("self", "scheduler_output")),
    VllmInternal(f"{_RUNNER}.sample_tokens", "overridden: the worker's report joins the output", ("self",)),
    VllmInternal("vllm.v1.worker.gpu_model_runner.AsyncGPUModelRunnerOutput.__init__", "under asynchronous "
                 "scheduling sample_tokens returns this wrapper; the report joins the output it wraps, which "
                 "get_output() hands the scheduler", source_has=("self._model_runner_output = model_runner_output",)),
    VllmInternal("vllm.v1.worker.gpu_model_runner.AsyncGPUModelRunnerOutput.get_output", "returns the wrapped "
                 "output (the report rides on it)", ("self",), source_has=("output = self._model_runner_output",)),
    VllmInternal(f"{_RUNNER}._prepare_inputs", "overridden: the compressed group's slot_mapping is shifted to the "
                 "kept length after vLLM prepares the step", ("self", "scheduler_output", "num_scheduled_tokens")),
    VllmInternal(f"{_RUNNER}._build_attention_metadata", "builds each KV cache group's metadata from one "
                 "CommonAttentionMetadata (shared seq_lens) through the group's AttentionGroup.build_metadata",
                 source_has=("seq_lens=self.seq_lens[:num_reqs_padded]", "cm = copy(cm_base)",
                             "attn_group.build_metadata(", "cm.slot_mapping = slot_mappings[kv_cache_gid]")),
    VllmInternal("vllm.v1.worker.utils.AttentionGroup.build_metadata", "overridden (core/kept_lengths.py): the "
                 "compressed group's metadata is built at the kept lengths; the runner's attn_groups are vLLM's "
                 "objects, given that class", ("self", "common_attn_metadata", "ubatch_idx", "common_prefix_len")),
    VllmInternal("vllm.v1.attention.backend.CommonAttentionMetadata", "the lengths the compressed group's copy "
                 "replaces", fields=("seq_lens", "seq_lens_cpu_upper_bound", "max_seq_len",
                                     "_num_computed_tokens_cache")),
    VllmInternal("vllm.v1.attention.backend.CommonAttentionMetadata.replace", "copies the metadata with the kept "
                 "lengths", ("self",)),
    VllmInternal("vllm.v1.worker.block_table.BlockTable.compute_slot_mapping", "the compressed group's slots, "
                 "recomputed at the kept positions", ("self", "num_reqs", "query_start_loc", "positions")),
    VllmInternal(f"{_RUNNER}._model_forward", "overridden: the observation window is open during the forward",
                 ("self",)),
    VllmInternal(f"{_RUNNER}.__init__", "step buffers the length shift edits and the signals read",
                 source_has=("self.seq_lens =", "self.optimistic_seq_lens_cpu =", "self.positions =",
                             "self.query_start_loc =", "self.max_num_tokens =", "self.execute_model_state",
                             "self.requests")),
    VllmInternal("vllm.v1.worker.gpu_model_runner.ExecuteModelState", "the forward's hidden states and sampled "
                 "logits, measured for token entropy", fields=("logits", "hidden_states")),
    VllmInternal("vllm.v1.worker.block_table.MultiGroupBlockTable.add_row", "the worker's block table mirrors "
                 "the shortened block list after a compaction", ("self", "block_ids", "row_idx")),
    VllmInternal("vllm.v1.worker.gpu_input_batch.InputBatch.__init__", "batch rows of the step's requests",
                 source_has=("self.req_id_to_index", "self.block_table =", "self._req_ids")),
    VllmInternal("vllm.model_executor.models.utils.extract_layer_index", "maps attention layers to decoder layers",
                 ("layer_name",)),
    # --- attention (recording_backends.py, platforms/, swaps.attention_backends) ---
    VllmInternal("vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.forward", "wrapped by the recording "
                 "impl, which reads the metadata's seq_lens, query_start_loc and block_table",
                 ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output")),
    VllmInternal("vllm.v1.attention.backends.cpu_attn.CPUAttentionMetadata", "what the recording impl reads",
                 fields=("seq_lens", "query_start_loc", "block_table")),
    VllmInternal("vllm.v1.attention.selector._cached_get_attn_backend", "caches the backend per process; cleared "
                 "around the compressing worker's model build"),
    VllmInternal("vllm.v1.attention.backends.registry.AttentionBackendEnum.CPU_ATTN", "the only backend vLLM's CPU "
                 "platform selects; pointed at the recording backend during the model build"),
    VllmInternal("vllm.v1.attention.backends.registry.AttentionBackendEnum.FLASH_ATTN", "CUDA: pointed at the "
                 "scoring FlashAttention backend during the model build"),
    VllmInternal("vllm.v1.attention.backends.registry.AttentionBackendEnum.TRITON_ATTN", "CUDA: pointed at the "
                 "scoring Triton backend during the model build"),
    VllmInternal("vllm.v1.attention.backends.triton_attn.TritonAttentionImpl.forward", "wrapped by the recording "
                 "impl; same page view as FlashAttention",
                 ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"),
                 source_has=("kv_cache = kv_cache.transpose(1, 2)", "kv_cache.split(hs, dim=-1)")),
    VllmInternal("vllm.v1.attention.backends.flash_attn.FlashAttentionMetadata", "what the recording impl reads",
                 fields=("seq_lens", "query_start_loc", "block_table")),
    VllmInternal("vllm.v1.attention.backends.triton_attn.TritonAttentionMetadata", "what the recording impl reads",
                 fields=("seq_lens", "query_start_loc", "block_table")),
    VllmInternal("vllm.v1.attention.backends.flash_attn.FlashAttentionImpl.forward", "wrapped by the recording "
                 "impl; its pages are a logical [blocks, kv_heads, block_size, 2 * head_size] view, keys first "
                 "(HeadMajorPageLayout)",
                 ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"),
                 source_has=("kv_cache.transpose(1, 2).split(self.head_size, dim=-1)",)),
    VllmInternal("vllm.v1.worker.gpu_worker.Worker._make_model_runner", "overridden: the CUDA worker builds the "
                 "compressing V1 runner", ("self",)),
    VllmInternal("vllm.config.compilation.CompilationConfig", "CUDA: cudagraph_mode is set to PIECEWISE, so "
                 "attention (and the window accumulation in it) runs outside CUDA graphs; the runner finds each KV "
                 "cache group's attention layers (and their caches) in static_forward_context",
                 fields=("cudagraph_mode", "static_forward_context")),
    VllmInternal("vllm.v1.worker.gpu_worker.Worker.__init__", "the CUDA worker refuses Model Runner V2, which it "
                 "would build when use_v2_model_runner is set", source_has=("self.use_v2_model_runner =",)),
    VllmInternal("vllm.v1.worker.gpu_input_batch.CachedRequestState", "the runner's per-request block ids, "
                 "shortened after a compaction", fields=("block_ids",)),
    VllmInternal("vllm._custom_ops.cpu_attn_reshape_and_cache", "writes a marked page to probe the CPU page layout "
                 "(fp8 caches: with scale 1.0, its default)",
                 ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa", "k_scale", "v_scale",
                  "kv_cache_dtype")),
    VllmInternal("vllm.v1.attention.backends.cpu_attn.CPUAttentionMetadataBuilder._set_isa_to_layers", "the "
                 "instruction set the CPU page layout is probed with, set on each attention layer",
                 source_has=("layer.isa = self.isa",)),
    # --- fp8 KV caches (core/adapter.py: LayerQuantization; platforms/) ---
    VllmInternal("vllm.model_executor.layers.attention.attention.Attention.__init__", "each layer's model dtype "
                 "(the probe's inputs), its cache dtype string, and its query quantizer (None unless its backend "
                 "takes fp8 queries)",
                 source_has=("self.kv_cache_dtype = kv_cache_dtype", "self.dtype = dtype", "self.query_quant = None")),
    VllmInternal("vllm.model_executor.layers.attention.attention.Attention.forward", "hands the backend fp8 "
                 "queries, quantized with _q_scale, on this condition, which LayerQuantization repeats",
                 source_has=("if self.impl.supports_quant_query_input:",
                             "query, _ = self.query_quant(query, self._q_scale)")),
    VllmInternal("vllm.model_executor.layers.attention.attention.set_default_quant_scales", "the per-tensor scales "
                 "an fp8 cache is read with (1.0 unless the checkpoint gives some; the quantization method's "
                 "process_weights_after_loading sets those, before the KV cache is allocated)",
                 source_has=("layer._k_scale_float = ", "layer._v_scale_float = ", "layer.register_buffer(\"_q_scale\"")),
    VllmInternal("vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl.do_kv_cache_update", "CPU_ATTN "
                 "stores key / _k_scale_float and value / _v_scale_float in an fp8 cache",
                 source_has=("k_scale=layer._k_scale_float", "v_scale=layer._v_scale_float")),
    VllmInternal("vllm.platforms.interface.Platform.fp8_dtype", "CUDA: the fp8 type FLASH_ATTN and TRITON_ATTN view "
                 "and write an fp8 cache's bytes as", ("cls",)),
    VllmInternal("vllm.utils.torch_utils.kv_cache_uses_per_token_head_scales", "start-up refuses the cache dtypes "
                 "whose scales are per token and KV head, by vLLM's own test", ("kv_cache_dtype",)),
    # --- scheduler and KV cache manager (core/scheduler.py, core/block_manager.py) ---
    VllmInternal(f"{_SCHEDULER}.schedule", "overridden: compactions are decided before vLLM allocates slots; "
                 "vLLM sends the copy-on-write copies our manager records (prefix-cache hits of compressed "
                 "requests) to the workers, holding both ends until that step has run", ("self",),
                 source_has=("self.kv_cache_manager.take_kv_cache_block_copies()",
                             "self._free_cow_retained_blocks(")),
    VllmInternal("vllm.config.scheduler.SchedulerConfig.get_scheduler_cls", "a custom scheduler class is used as "
                 "named, asynchronous scheduling or not (vLLM picks AsyncScheduler only for its default): "
                 "CompressingScheduler.__new__ picks our async variant", ("self",),
                 source_has=("return resolve_obj_by_qualname(self.scheduler_cls)",)),
    VllmInternal("vllm.v1.engine.core.EngineCore.__init__", "the scheduler class is called with vllm_config as a "
                 "keyword, which CompressingScheduler.__new__ reads", source_has=("vllm_config=vllm_config,",)),
    VllmInternal("vllm.v1.core.sched.async_scheduler.AsyncScheduler._update_after_schedule", "the async variant "
                 "of our scheduler inherits vLLM's output placeholders", ("self", "scheduler_output")),
    VllmInternal(f"{_SCHEDULER}.__init__", "the requests and the running list decisions are made for, and the KV "
                 "cache manager they go through", source_has=("self.requests:", "self.running:",
                                                              "self.kv_cache_manager = KVCacheManager(")),
    VllmInternal("vllm.v1.core.kv_cache_manager.KVCacheManager.__init__", "the scheduler reaches the one "
                 "single-type manager (coordinator.single_type_managers) and the free-block count (block_pool)",
                 source_has=("self.coordinator = get_kv_cache_coordinator(",
                             "self.block_pool = self.coordinator.block_pool")),
    VllmInternal("vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.__init__", "one manager per KV cache "
                 "group: ours for the full-attention layers, vLLM's for a model's sliding-window and state layers",
                 source_has=("self.single_type_managers = tuple(",)),
    VllmInternal("vllm.v1.core.single_type_kv_cache_manager.SingleTypeKVCacheManager.get_num_blocks_to_allocate",
                 "memory pressure counts the blocks a running request's next tokens need in the groups left to "
                 "vLLM", ("self", "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
                          "num_local_computed_tokens", "num_tokens_main_model")),
    VllmInternal("vllm.v1.core.single_type_kv_cache_manager.SingleTypeKVCacheManager.__init__", "the blocks each "
                 "request holds (req_to_blocks; out-of-window ones replaced by the null block)",
                 source_has=("self.req_to_blocks",)),
    VllmInternal("vllm.v1.core.kv_cache_utils.KVCacheBlock", "the null block that stands for a freed "
                 "out-of-window block", fields=("is_null",)),
    VllmInternal("vllm.v1.core.block_pool.BlockPool.get_num_free_blocks", "memory pressure compares it with the "
                 "blocks the next step needs", ("self",)),
    VllmInternal("vllm.v1.core.block_pool.BlockPool.__init__", "the pool-wide mode's target is a share of the "
                 "pool's blocks (num_gpu_blocks, the null block among them)", source_has=("self.num_gpu_blocks =",)),
    VllmInternal("vllm.v1.core.block_pool.BlockPool.free_blocks", "a compaction returns the request's tail blocks",
                 ("self", "ordered_blocks")),
    VllmInternal("vllm.v1.request.Request.num_tokens_with_spec", "memory pressure: the tokens a request computes "
                 "next (with num_output_placeholders)"),
    VllmInternal("vllm.v1.request.Request.__init__", "memory pressure reads the output placeholders of a request",
                 source_has=("self.num_output_placeholders =",)),
    VllmInternal(f"{_SCHEDULER}.update_from_output", "overridden: the worker's report is read",
                 ("self", "scheduler_output", "model_runner_output")),
    VllmInternal(f"{_SCHEDULER}.make_stats", "overridden: compression stats join vLLM's", ("self",)),
    VllmInternal(f"{_SCHEDULER}._free_request", "overridden: per-request compression state is dropped",
                 ("self", "request")),
    VllmInternal(f"{_SCHEDULER}._preempt_request", "overridden: a preempted request's probe state is dropped "
                 "and it is logged (its recompute is compressed afresh); counted by the tests and benchmarks",
                 ("self", "request")),
    VllmInternal("vllm.v1.core.sched.output.SchedulerOutput", "what the workers need to forget, zero and copy",
                 fields=("scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
                         "finished_req_ids", "preempted_req_ids", "kv_cache_block_copies")),
    VllmInternal("vllm.v1.core.sched.output.NewRequestData", "a new request's blocks start with its prefix-cache "
                 "hit (num_computed_tokens)", fields=("req_id", "block_ids", "num_computed_tokens")),
    VllmInternal("vllm.v1.core.sched.output.CachedRequestData", "resumed requests and their new blocks (a resumed "
                 "request's list starts with its prefix-cache hit)",
                 fields=("req_ids", "resumed_req_ids", "new_block_ids", "num_computed_tokens")),
    VllmInternal("vllm.v1.core.kv_cache_utils.KVCacheBlockCopy", "a copy-on-write copy the workers make",
                 fields=("src_block_id", "dst_block_id")),
    VllmInternal(f"{_RUNNER}._update_states", "vLLM copies the KV of copy-on-write blocks here, after our "
                 "compactions and before the forward", source_has=("copy_kv_cache_blocks_inplace(",)),
    VllmInternal(f"{_MANAGER}.get_num_blocks_to_allocate", "overridden: counts by physical length",
                 ("self", "request_id", "num_tokens", "new_computed_blocks", "total_computed_tokens",
                  "num_local_computed_tokens", "num_tokens_main_model")),
    VllmInternal(f"{_MANAGER}.allocate_new_blocks", "overridden: counts by physical length",
                 ("self", "request_id", "num_tokens", "num_tokens_main_model")),
    VllmInternal(f"{_MANAGER}.pop_blocks_for_free", "overridden: a freed request forgets its evicted count",
                 ("self", "request_id")),
    VllmInternal(f"{_MANAGER}.add_local_computed_blocks", "overridden: a compressed request copies its "
                 "prefix-cache hit blocks", ("self", "request_id", "new_computed_blocks",
                                             "num_local_computed_tokens")),
    VllmInternal(f"{_MANAGER}.cache_blocks", "overridden: blocks are hashed once computed, never after a "
                 "compaction", ("self", "request", "num_tokens")),
    VllmInternal("vllm.v1.core.single_type_kv_cache_manager.SingleTypeKVCacheManager._apply_cow", "vLLM's "
                 "copy-on-write of a prefix-cache hit block: redirects the request's block, queues the copy, holds "
                 "both ends", ("self", "request_id", "block_idx", "source_block", "cow_block")),
    VllmInternal("vllm.v1.core.kv_cache_coordinator.KVCacheCoordinator.cache_blocks", "a request's computed blocks "
                 "are hashed before its first compaction", ("self", "request", "num_computed_tokens")),
    VllmInternal("vllm.v1.core.block_pool.BlockPool.is_block_writable", "a block that is neither cached nor "
                 "shared may be compacted in place", ("self", "block")),
    VllmInternal("vllm.v1.core.block_pool.BlockPool.get_new_blocks", "private copies of cached or shared blocks",
                 ("self", "num_blocks")),
    VllmInternal("vllm.v1.core.block_pool.BlockPool.evict_blocks", "a cached block only its request holds loses "
                 "its hash when no free block is left to copy it into", ("self", "block_ids")),
    VllmInternal("vllm.v1.core.kv_cache_utils.KVCacheBlock", "ids, references and hashes the manager reads",
                 fields=("block_id", "ref_cnt")),
    VllmInternal("vllm.v1.core.single_type_kv_cache_manager.SingleTypeKVCacheManager.__init__", "the block lists "
                 "a compaction shortens, and the pool it frees their tails into",
                 source_has=("self.req_to_blocks", "self.num_cached_block", "self.block_pool = block_pool",
                             "self.enable_caching = enable_caching")),
    VllmInternal("vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry._ensure_registered", "the built-in specs "
                 "register only while the registry is empty, so they are registered before ours"),
    VllmInternal("vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry.register", "maps CompressedAttentionSpec to "
                 "CompactingAttentionManager"),
    # --- Ray on CPU (platforms/cpu_ray.py, swaps.ray_on_cpu) ---
    VllmInternal("vllm.platforms.cpu.CpuPlatform.ray_device_key", "empty, so vLLM refuses Ray on CPU; Ray's "
                 "\"CPU\" resource while our executor starts"),
    VllmInternal("vllm.v1.executor.ray_executor_v2.RayWorkerProc", "the module global the executor builds its "
                 "worker actors from; our CPU actor class while it starts"),
    VllmInternal("vllm.v1.executor.ray_executor_v2.RayWorkerProc.get_node_and_physical_gpu_ids", "overridden: "
                 "Ray lists no accelerator ids for CPUs", ("self",)),
    VllmInternal("vllm.v1.executor.ray_executor_v2.RayWorkerProc.initialize_worker", "overridden: the actor pins "
                 "itself to its cores first", ("self", "local_rank", "env_vars", "distributed_init_method",
                                               "driver_env_vars", "assigned_physical_gpu_ids")),
    VllmInternal("vllm.v1.executor.ray_executor_v2.RayWorkerProc.__init__", "the rank and parallel config read",
                 source_has=("self._init_kwargs = dict(", "rank=rank", "self._parallel_config =")),
    VllmInternal("vllm.v1.executor.ray_executor_v2.RayExecutorV2._get_actor_resource_kwargs", "overridden: Ray "
                 "refuses \"CPU\" inside an actor's `resources`"),
    VllmInternal("vllm.v1.executor.ray_executor_v2.RayExecutorV2._build_runtime_env", "overridden: the actors' "
                 "OpenMP thread count", ("self",)),
    VllmInternal("vllm.v1.executor.ray_executor_v2.RayExecutorV2._init_executor", "overridden: started with the "
                 "CPU device key and actor class in place", ("self",),
                 source_has=("ray.remote(RayWorkerProc)", "initialize_ray_cluster(")),
    VllmInternal("vllm.v1.executor.ray_executor_v2.RayExecutorV2.shutdown", "overridden: the placement group "
                 "vLLM created is removed", ("self",)),
    VllmInternal("vllm.v1.executor.ray_utils.initialize_ray_cluster", "refuses a platform whose ray_device_key "
                 "is empty; creates the placement group unless parallel_config has one, and stores it there",
                 source_has=("device_str = current_platform.ray_device_key",
                             "parallel_config.placement_group = ")),
)


def resolve(target: str) -> Any:
    """The object at a dotted path (module part, then attributes)."""
    import importlib

    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = obj.__dict__[name] if isinstance(obj, type) and name in obj.__dict__ else getattr(obj, name)
        return obj
    raise ImportError(target)
