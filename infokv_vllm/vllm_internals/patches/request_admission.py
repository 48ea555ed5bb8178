"""Every request is admitted or refused (HTTP 400) by `admit_request` before it reaches the engine: where vLLM
turns a prompt into an engine request (`InputProcessor.process_inputs`, every entry point), and earlier where the
API server creates a rendered prompt's output stream (`AsyncLLM.generate`).

The chat and completions endpoints call `generate` (creating its async generator) before they start a streaming
response, but vLLM processes the request only when the stream first iterates it: a refusal would then arrive
inside an HTTP 200 stream. Admitting rendered prompts when the generator is created makes it an HTTP 400 on every
endpoint; `process_inputs` still admits whatever arrives otherwise.
"""

from __future__ import annotations

from typing import Callable

from infokv_vllm.admission import admit_request
from infokv_vllm.vllm_internals.patches import wrap


def apply() -> None:
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor

    def admitting_the_engine_request(original: Callable) -> Callable:
        def wrapper(self, *args, **kwargs):
            request = original(self, *args, **kwargs)
            admit_request(self.vllm_config, len(request.prompt_token_ids or ()), request.sampling_params)
            return request
        return wrapper

    wrap(InputProcessor, "process_inputs", admitting_the_engine_request)

    def admitting_a_rendered_prompt(original: Callable) -> Callable:
        def wrapper(self, prompt, sampling_params, *args, **kwargs):
            prompt_token_ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
            if (prompt_token_ids is not None and isinstance(sampling_params, SamplingParams)
                    and sampling_params.max_tokens is not None):
                admit_request(self.vllm_config, len(prompt_token_ids), sampling_params)
            return original(self, prompt, sampling_params, *args, **kwargs)
        return wrapper

    wrap(AsyncLLM, "generate", admitting_a_rendered_prompt)
