"""The worker vLLM starts when compression is on (`parallel_config.worker_cls`): vLLM's CPU worker with the
compressing model runner in place of its own."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from infokv_vllm import vllm_patches
from infokv_vllm.attention.cpu import ScoringCPUAttentionBackend
from infokv_vllm.config import CompressionConfig
from infokv_vllm.kv.model_runner import CompressingCPUModelRunner
from infokv_vllm.scoring import make_policy
from infokv_vllm.scoring.base import ATTENTION


class CompressingCPUWorker(CPUWorker):
    def init_device(self) -> None:
        with vllm_patches.cpu_model_runner_class(CompressingCPUModelRunner):
            super().init_device()
        assert isinstance(self.model_runner, CompressingCPUModelRunner), type(self.model_runner)

    def load_model(self, *args, **kwargs) -> None:
        compression = CompressionConfig.from_additional_config(self.vllm_config.additional_config)
        if ATTENTION not in make_policy(compression).signals:
            return super().load_model(*args, **kwargs)
        backend = ScoringCPUAttentionBackend
        with vllm_patches.cpu_attention_backend(f"{backend.__module__}.{backend.__qualname__}"):
            return super().load_model(*args, **kwargs)
